"""
The tracking endpoints (open pixel, click redirect, unsubscribe) and
``/metrics``, through StubTreq over a real store on both engines.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyChannel
from zope.interface.verify import verifyObject

from mailrelay.events.model import EventType
from mailrelay.interfaces import IEventSink
from mailrelay.metrics import Metrics
from mailrelay.processing.tokens import TokenSigner
from mailrelay.web.common import LimitedRequest, client_ip, limited_request_factory, parse_networks
from mailrelay.web.pages import PAGE_CSP, STYLE, mask_address
from mailrelay.web.tracking import PIXEL, classify_proxy
from tests.test_web_support import ListSink, Web

QUEUE_ID = "a1b2c3d4e5f6"
APPLE_MPP = "Mozilla/5.0"
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.3.1"


async def add_message(
    web: Web,
    queue_id: str = QUEUE_ID,
    recipients: tuple[str, ...] = ("Bob@Example.com",),
    list_id: int | None = None,
    account_id: int | None = None,
) -> None:
    """The rows the SMTP and delivery stages write for an accepted message."""
    account = account_id or web.account_id
    await web.store.pool.execute(
        "t",
        "INSERT INTO messages (queue_id, account_id, transmission_id, message_id_header, mail_from, subject,"
        " list_id, tags, size, recipients, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            queue_id,
            account,
            "tx-" + queue_id,
            "<m1@shop.example>",
            "shop@shop.example",
            "Hi",
            list_id,
            "welcome,spring",
            100,
            len(recipients),
            1.0,
        ),
    )
    for index, address in enumerate(recipients):
        await web.store.pool.execute(
            "t",
            "INSERT INTO recipients (queue_id, rcpt_index, address, state, updated_at) VALUES (?, ?, ?, ?, ?)",
            (queue_id, index, address, "delivered", 1.0),
        )


def tamper(token: str) -> str:
    """The token with one character changed in its middle."""
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


class TrackingTestsMixin:
    engine: str

    async def web(self, **options: Any) -> Web:
        web = await Web.create(self, self.engine, **options)  # type: ignore[arg-type]
        await add_message(web)
        return web

    async def test_open_pixel(self) -> None:
        """A GIF that is never cached; the first open is marked first, the repeat not; proxies are named."""
        web = await self.web()
        t: Any = self
        token = web.signer.open(web.account_id, QUEUE_ID, 0)
        first = await web.request("GET", f"/o/{token}", headers={"User-Agent": [THUNDERBIRD]})
        t.assertEqual(first.status, 200)
        t.assertEqual(first.body, PIXEL)
        t.assertEqual(first.header("content-type"), "image/gif")
        t.assertEqual(first.header("cache-control"), "no-store")
        t.assertEqual(first.header("referrer-policy"), "no-referrer")
        await web.request("GET", f"/o/{token}", headers={"User-Agent": [GMAIL_PROXY]})
        t.assertEqual([e.type for e in web.sink.events], [EventType.OPENED, EventType.OPENED])
        one, two = web.sink.events
        t.assertEqual(
            (one.recipient, one.queue_id, one.transmission_id), ("Bob@Example.com", QUEUE_ID, "tx-" + QUEUE_ID)
        )
        t.assertEqual(one.tags, ("welcome", "spring"))
        t.assertEqual((one.detail["first"], one.detail["proxy"]), (True, None))
        t.assertEqual(one.detail["user_agent"], THUNDERBIRD)
        t.assertEqual(one.detail["ip"], "127.0.0.1")
        t.assertEqual((two.detail["first"], two.detail["proxy"]), (False, "google_image_proxy"))
        t.assertEqual(web.metrics.http_events.labels(type="opened")._value.get(), 2)

    async def test_first_open_from_events_table(self) -> None:
        """An open already stored (another node, before a restart) makes the next one a repeat."""
        web = await self.web()
        t: Any = self
        await web.store.pool.execute(
            "t",
            "INSERT INTO events (ts, account_id, type, queue_id, recipient) VALUES (?, ?, ?, ?, ?)",
            (1.0, web.account_id, "opened", QUEUE_ID, "Bob@Example.com"),
        )
        await web.request("GET", f"/o/{web.signer.open(web.account_id, QUEUE_ID, 0)}")
        t.assertFalse(web.sink.events[0].detail["first"])

    async def test_open_unknown_recipient(self) -> None:
        """A valid token whose message is not (or no longer) stored still gets the pixel and an event."""
        web = await self.web()
        t: Any = self
        answer = await web.request("GET", f"/o/{web.signer.open(web.account_id, 'ffff0000', 3)}")
        t.assertEqual(answer.body, PIXEL)
        event = web.sink.events[0]
        t.assertIsNone(event.recipient)
        t.assertEqual(event.detail["rcpt_index"], 3)

    async def test_head_is_not_an_open(self) -> None:
        """HEAD (link checkers) answers like GET without recording an open or a click."""
        web = await self.web()
        t: Any = self
        answer = await web.request("HEAD", f"/o/{web.signer.open(web.account_id, QUEUE_ID, 0)}")
        t.assertEqual(answer.status, 200)
        click = await web.request(
            "HEAD", f"/c/{web.signer.click(web.account_id, QUEUE_ID, 0, 1, 'https://a.example/')}"
        )
        t.assertEqual(click.status, 302)
        t.assertEqual(web.sink.events, [])

    async def test_forged_tokens(self) -> None:
        """Damaged, forged, wrong-kind or foreign-secret tokens get 404 and no event, never a redirect."""
        web = await self.web()
        t: Any = self
        click = web.signer.click(web.account_id, QUEUE_ID, 0, 2, "https://shop.example/sale")
        other = TokenSigner(b"another secret of 32 bytes......").click(
            web.account_id, QUEUE_ID, 0, 2, "https://evil.example/"
        )
        for path in (
            f"/c/{tamper(click)}",
            f"/c/{click[:-3]}",
            f"/c/{other}",
            "/c/",
            f"/c/{web.signer.open(web.account_id, QUEUE_ID, 0)}",
            f"/c/{click}/extra",
            f"/o/{tamper(web.signer.open(web.account_id, QUEUE_ID, 0))}",
            "/o/%ff%fe",
            f"/u/{tamper(web.signer.unsubscribe(web.account_id, QUEUE_ID, 0))}",
        ):
            answer = await web.request("GET", path)
            t.assertEqual(answer.status, 404, path)
            t.assertIsNone(answer.header("location"), path)
        t.assertEqual(web.sink.events, [])
        t.assertGreaterEqual(web.metrics.http_rejected.labels(kind="click")._value.get(), 5)

    async def test_click(self) -> None:
        """302 to exactly the signed URL, no referrer; a clicked event with the URL, link index and first flag."""
        web = await self.web()
        t: Any = self
        url = "https://shop.example/sale?x=1&y=<2>#top"
        token = web.signer.click(web.account_id, QUEUE_ID, 0, 4, url)
        answer = await web.request("GET", f"/c/{token}", headers={"User-Agent": [THUNDERBIRD]})
        t.assertEqual(answer.status, 302)
        t.assertEqual(answer.header("location"), url)
        t.assertEqual(answer.header("referrer-policy"), "no-referrer")
        t.assertEqual(answer.header("cache-control"), "no-store")
        await web.request("GET", f"/c/{token}")
        first, second = web.sink.events
        t.assertEqual(first.type, EventType.CLICKED)
        t.assertEqual((first.detail["url"], first.detail["link"], first.detail["first"]), (url, 4, True))
        t.assertFalse(second.detail["first"])
        t.assertEqual(first.recipient, "Bob@Example.com")

    async def test_unsubscribe_page(self) -> None:
        """GET shows an escaped, script-free page with one POST button; it suppresses nobody."""
        web = await self.web()
        t: Any = self
        token = web.signer.unsubscribe(web.account_id, QUEUE_ID, 0)
        answer = await web.request("GET", f"/u/{token}")
        t.assertEqual(answer.status, 200)
        page = answer.body.decode()
        t.assertIn('<form method="post">', page)
        t.assertIn('name="List-Unsubscribe" value="One-Click"', page)
        t.assertIn("<button", page)
        t.assertIn('<html lang="en">', page)
        t.assertIn("B***b@example.com", page)
        t.assertNotIn("<script", page)
        t.assertEqual(answer.header("content-security-policy"), PAGE_CSP)
        t.assertIn("default-src 'none'", PAGE_CSP)
        t.assertEqual(answer.header("referrer-policy"), "no-referrer")
        t.assertEqual(answer.header("x-frame-options"), "DENY")
        t.assertEqual(web.sink.events, [])
        t.assertEqual(await web.store.suppressions.list(web.account_id), [])

    async def test_one_click_unsubscribe(self) -> None:
        """RFC 8058 POST: an account-wide suppression and one event; a repeat changes nothing and still 200."""
        web = await self.web()
        t: Any = self
        token = web.signer.unsubscribe(web.account_id, QUEUE_ID, 0)
        body = b"List-Unsubscribe=One-Click"
        headers = {"Content-Type": ["application/x-www-form-urlencoded"]}
        answer = await web.request("POST", f"/u/{token}", body=body, headers=headers)
        t.assertEqual(answer.status, 200)
        t.assertIn("will no longer receive", answer.body.decode())
        again = await web.request("POST", f"/u/{token}", body=body, headers=headers)
        t.assertEqual(again.status, 200)
        found = await web.store.suppressions.list(web.account_id)
        t.assertEqual([(s.address, s.reason, s.scope) for s in found], [("bob@example.com", "unsubscribe", "account")])
        t.assertEqual([e.type for e in web.sink.events], [EventType.UNSUBSCRIBED])
        t.assertEqual(web.sink.events[0].detail["scope"], "account")
        t.assertTrue(web.sink.events[0].detail["one_click"])

    async def test_unsubscribe_from_list(self) -> None:
        """Mail sent to a mailing list unsubscribes from that list only; its name is escaped on the page."""
        web = await self.web()
        t: Any = self
        news = await web.store.lists.create(web.account_id, "<b>News</b> & more", guid="news-1")
        await add_message(web, "beef0001", ("carol@example.com",), list_id=news.id)
        token = web.signer.unsubscribe(web.account_id, "beef0001", 0)
        page = (await web.request("GET", f"/u/{token}")).body.decode()
        t.assertIn("&lt;b&gt;News&lt;/b&gt; &amp; more", page)
        t.assertNotIn("<b>News", page)
        answer = await web.request("POST", f"/u/{token}", body=b"")
        t.assertEqual(answer.status, 200)
        found = await web.store.suppressions.list(web.account_id)
        t.assertEqual([s.scope for s in found], ["list:news-1"])
        t.assertEqual(await web.store.suppressions.suppressed(web.account_id, ["carol@example.com"]), {})

    async def test_unsubscribe_unknown_message(self) -> None:
        """A valid token for a message the relay no longer knows: 404 page, nothing suppressed."""
        web = await self.web()
        t: Any = self
        token = web.signer.unsubscribe(web.account_id, "dead0000", 0)
        t.assertEqual((await web.request("GET", f"/u/{token}")).status, 404)
        t.assertEqual((await web.request("POST", f"/u/{token}", body=b"")).status, 404)
        foreign = web.signer.unsubscribe(web.account_id + 1, QUEUE_ID, 0)
        t.assertEqual((await web.request("POST", f"/u/{foreign}", body=b"")).status, 404)
        t.assertEqual(await web.store.suppressions.list(web.account_id), [])

    async def test_unsubscribe_body_limit(self) -> None:
        """An unsubscribe POST with a huge body is refused with 413 and suppresses nobody."""
        web = await self.web()
        t: Any = self
        token = web.signer.unsubscribe(web.account_id, QUEUE_ID, 0)
        answer = await web.request("POST", f"/u/{token}", body=b"x" * 100_000)
        t.assertEqual(answer.status, 413)
        t.assertEqual(await web.store.suppressions.list(web.account_id), [])

    async def test_forwarded_for_trusted_proxy_only(self) -> None:
        """X-Forwarded-For counts only when the peer is a trusted proxy."""
        web = await self.web(trusted_proxies=["127.0.0.0/8"])
        plain = await self.web()
        t: Any = self
        token = web.signer.open(web.account_id, QUEUE_ID, 0)
        headers = {"X-Forwarded-For": ["17.1.2.3, 203.0.113.9"]}
        await web.request("GET", f"/o/{token}", headers=headers)
        await plain.request("GET", f"/o/{token}", headers=headers)
        t.assertEqual(web.sink.events[0].detail["ip"], "203.0.113.9")
        t.assertEqual(plain.sink.events[0].detail["ip"], "127.0.0.1")

    async def test_metrics_endpoint(self) -> None:
        """/metrics serves the registry in the text format; a restricted scrape from elsewhere is 403."""
        web = await self.web()
        t: Any = self
        web.metrics.messages_accepted.labels(listener="submission").inc(3)
        web.metrics.set_queue_sizes(lambda: {"active": 2, "deferred": 5})
        answer = await web.request("GET", "/metrics")
        t.assertEqual(answer.status, 200)
        text = answer.body.decode()
        t.assertIn('mailrelay_messages_accepted_total{listener="submission"} 3.0', text)
        t.assertIn('mailrelay_queue_messages{state="deferred"} 5.0', text)
        t.assertIn('mailrelay_queue_messages{state="hold"} 0.0', text)
        t.assertTrue((answer.header("content-type") or "").startswith("text/plain"))
        closed = await self.web(metrics_allowed=["10.0.0.0/8"])
        t.assertEqual((await closed.request("GET", "/metrics")).status, 403)
        health = await web.request("GET", "/healthz")
        t.assertEqual(health.json()["status"], "ok")
        t.assertEqual((await web.request("GET", "/nothing")).status, 404)


class SQLiteTrackingTests(TrackingTestsMixin, TestCase):
    engine = "sqlite"


class PostgresTrackingTests(TrackingTestsMixin, TestCase):
    engine = "postgresql"


class ProxyClassificationTests(SynchronousTestCase):
    def test_known_fetchers(self) -> None:
        """Apple MPP, Gmail's proxy and prefetch, Yahoo's proxy and Microsoft's scanners are named."""
        self.assertEqual(classify_proxy(APPLE_MPP, "198.51.100.1"), "apple_mpp")
        self.assertEqual(classify_proxy(THUNDERBIRD, "17.58.1.1"), "apple_mpp")
        self.assertEqual(classify_proxy(GMAIL_PROXY, "66.249.1.1"), "google_image_proxy")
        prefetch = (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
        )
        self.assertEqual(classify_proxy(prefetch, None), "gmail_prefetch")
        self.assertEqual(
            classify_proxy("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy", None), "yahoo_proxy"
        )
        self.assertEqual(classify_proxy("Mozilla/5.0 BingPreview/1.0b", None), "microsoft_prefetch")

    def test_people(self) -> None:
        """Ordinary mail clients and browsers are not proxies."""
        self.assertIsNone(classify_proxy(THUNDERBIRD, "203.0.113.5"))
        self.assertIsNone(classify_proxy("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)", "2001:db8::1"))
        self.assertIsNone(classify_proxy("", None))
        self.assertIsNone(classify_proxy("Microsoft Outlook 16.0", "not an ip"))


class PageTests(SynchronousTestCase):
    def test_mask(self) -> None:
        """Masked addresses keep the first and last character of the local part only."""
        self.assertEqual(mask_address("jonathan@example.com"), "j***n@example.com")
        self.assertEqual(mask_address("jo@example.com"), "j***@example.com")

    def test_csp_allows_only_the_style(self) -> None:
        """The page CSP allows exactly the one inline style by hash, no scripts, posts to self only."""
        import base64
        import hashlib

        digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
        self.assertIn(f"style-src 'sha256-{digest}'", PAGE_CSP)
        self.assertNotIn("script-src", PAGE_CSP)
        self.assertIn("form-action 'self'", PAGE_CSP)


class RequestLimitTests(SynchronousTestCase):
    def test_large_body_not_stored(self) -> None:
        """A body over max_body keeps at most max_body + 1 bytes, declared length or not."""
        factory = limited_request_factory(1000)
        request = factory(DummyChannel())
        request.gotLength(10_000_000)
        request.handleContentChunk(b"x" * 5000)
        assert request.content is not None
        self.assertLessEqual(len(request.content.getvalue()), 1001)
        chunked: LimitedRequest = factory(DummyChannel())
        chunked.gotLength(None)
        for _ in range(100):
            chunked.handleContentChunk(b"y" * 100)
        assert chunked.content is not None
        chunked.content.seek(0)
        self.assertEqual(len(chunked.content.read()), 1001)
        small = factory(DummyChannel())
        small.gotLength(5)
        small.handleContentChunk(b"hello")
        assert small.content is not None
        small.content.seek(0)
        self.assertEqual(small.content.read(), b"hello")

    def test_client_ip(self) -> None:
        """Without trusted proxies the peer is the client, whatever X-Forwarded-For says."""
        factory = limited_request_factory(1000)
        request = factory(DummyChannel())
        request.requestHeaders.addRawHeader(b"x-forwarded-for", b"1.2.3.4")
        self.assertNotEqual(client_ip(request), "1.2.3.4")
        self.assertEqual(client_ip(request, parse_networks(["192.168.0.0/16"])), "1.2.3.4")


class FakesTests(SynchronousTestCase):
    def test_list_sink(self) -> None:
        """The test sink provides IEventSink, so the tests exercise the real seam."""
        verifyObject(IEventSink, ListSink())

    def test_metrics_isolated(self) -> None:
        """Two Metrics objects do not share counters (no global registry)."""
        a, b = Metrics(), Metrics()
        a.auth_failures.labels(mechanism="PLAIN").inc()
        self.assertEqual(b.auth_failures.labels(mechanism="PLAIN")._value.get(), 0)

    def test_connection_gauge_forgets_idle_destinations(self) -> None:
        """A destination's connection series disappears when its last connection closes."""
        m = Metrics()
        m.connection_opened("example.com")
        m.connection_opened("example.com")
        m.connection_closed("example.com")
        self.assertEqual(m.destination_connections.labels(destination="example.com")._value.get(), 1)
        m.connection_closed("example.com")
        samples = [
            s
            for metric in m.registry.collect()
            if metric.name == "mailrelay_destination_connections"
            for s in metric.samples
        ]
        self.assertEqual(samples, [])
