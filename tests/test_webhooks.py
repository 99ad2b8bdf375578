"""
Webhook delivery: batching, signatures, retries with backoff on an
injected clock, giving up after a day, ordering; the storage of endpoints
and attempts on both engines; StubTreq and a real loopback receiver.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mailrelay.events.model import Event, EventType
from mailrelay.events.sink import EventSink
from mailrelay.events.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    AgentClient,
    WebhookDispatcher,
    event_id,
    retry_delay,
    sign,
    verify_signature,
)
from mailrelay.metrics import Metrics
from mailrelay.storage.errors import NotFound, StorageError
from mailrelay.storage.webhooks import Webhook, Webhooks, check_url
from tests.support.db import fresh_store
from tests.test_web_support import Web, check_schema

SECRET = "whsec_test"


def event(n: int, type: EventType = EventType.DELIVERED, account: int = 1, queue_id: str = "q1") -> Event:
    return Event(type, 1_700_000_000.0 + n, account, queue_id=queue_id, recipient=f"r{n}@example.com")


class FakeSource:
    """The storage side of the dispatcher, in memory."""

    def __init__(self, *hooks: Webhook) -> None:
        self.hooks = {h.id: h for h in hooks}
        self.attempts: list[tuple[int, float, int | None, str | None, int]] = []
        self.loads = 0

    async def list(self, account_id: int) -> list[Webhook]:
        self.loads += 1
        return [h for h in self.hooks.values() if h.account_id == account_id]

    async def set_failing(self, webhook_id: int, failing: bool) -> None:
        self.hooks[webhook_id] = attrs.evolve(self.hooks[webhook_id], failing=failing)

    async def record_attempt(
        self, webhook_id: int, ts: float, status: int | None, error: str | None, events: int
    ) -> None:
        self.attempts.append((webhook_id, ts, status, error, events))


@attrs.define
class FakeResponse:
    code: int
    body: bytes = b""


class FakeHTTP:
    """A treq-like client whose answers the test decides: a status, or a Deferred it fires later."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, Mapping[str, Sequence[str]], dict[str, Any]]] = []
        self.answers: list[int | Deferred[Any]] = []
        self.default = 200

    def post(self, url: str, data: bytes, headers: Mapping[str, Sequence[str]], **kwargs: Any) -> Deferred[Any]:
        self.requests.append((url, data, headers, kwargs))
        answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, Deferred):
            return answer
        return succeed(FakeResponse(answer, b"nope" if answer >= 300 else b""))

    def content(self, response: FakeResponse) -> Deferred[bytes]:
        return succeed(response.body)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body, _, _ in self.requests]


def hook(id: int = 7, account: int = 1, types: frozenset[str] = frozenset(), failing: bool = False) -> Webhook:
    return Webhook(
        id=id,
        account_id=account,
        url=f"https://hooks.example.com/{id}",
        event_types=types,
        secret=SECRET,
        failing=failing,
        created_at=0.0,
    )


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.http = FakeHTTP()
        self.metrics = Metrics()

    def dispatcher(self, source: FakeSource, **options: Any) -> WebhookDispatcher:
        options.setdefault("jitter", lambda: 0.0)
        return WebhookDispatcher(source, self.http, self.clock, self.metrics, **options)

    def test_batch_signed_and_recorded(self) -> None:
        """Events wait for the batch interval, go out in one signed POST in order, and the attempt is recorded."""
        source = FakeSource(hook())
        d = self.dispatcher(source)
        for n in range(3):
            d.receive(event(n))
        self.assertEqual(self.http.requests, [])
        self.clock.advance(1.0)
        self.assertEqual(len(self.http.requests), 1)
        url, body, headers, kwargs = self.http.requests[0]
        self.assertEqual(url, "https://hooks.example.com/7")
        self.assertFalse(kwargs["allow_redirects"])
        payload = json.loads(body)
        check_schema("WebhookPayload", payload)
        self.assertEqual(
            [e["recipient"] for e in payload["events"]], ["r0@example.com", "r1@example.com", "r2@example.com"]
        )
        self.assertEqual(payload["events"][0]["id"], event_id(event(0)))
        signature = headers[SIGNATURE_HEADER][0]
        self.assertTrue(signature.startswith(f"t={int(self.clock.seconds())},v1="))
        self.assertTrue(verify_signature(SECRET, signature, body, now=self.clock.seconds()))
        self.assertEqual(headers["Content-Type"], ["application/json"])
        self.assertEqual(source.attempts, [(7, self.clock.seconds(), 200, None, 3)])
        self.assertEqual(self.metrics.webhook_events_delivered._value.get(), 3)
        self.assertEqual(d.pending(7), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_batch_goes_at_once(self) -> None:
        """max_batch events are posted without waiting for the interval."""
        d = self.dispatcher(FakeSource(hook()), max_batch=5)
        for n in range(12):
            d.receive(event(n))
        self.assertEqual([len(b["events"]) for b in self.http.bodies()], [5, 5])
        self.clock.advance(1.0)
        self.assertEqual([len(b["events"]) for b in self.http.bodies()], [5, 5, 2])

    def test_event_types_and_accounts(self) -> None:
        """An endpoint gets only its account's events of the types it asked for."""
        source = FakeSource(hook(1, types=frozenset({"bounced"})), hook(2), hook(3, account=2))
        d = self.dispatcher(source)
        d.receive([event(0, EventType.DELIVERED), event(1, EventType.BOUNCED), event(2, account=2)])
        self.clock.advance(1.0)
        by_url = {url: [e["type"] for e in json.loads(body)["events"]] for url, body, _, _ in self.http.requests}
        self.assertEqual(
            by_url,
            {
                "https://hooks.example.com/1": ["bounced"],
                "https://hooks.example.com/2": ["delivered", "bounced"],
                "https://hooks.example.com/3": ["delivered"],
            },
        )

    def test_retry_same_batch_then_the_rest_in_order(self) -> None:
        """A failed batch is retried unchanged after the backoff; later events wait behind it, in order."""
        source = FakeSource(hook())
        d = self.dispatcher(source, retry_base=30.0)
        self.http.answers = [500, 503]
        d.receive([event(0), event(1)])
        self.clock.advance(1.0)
        d.receive(event(2))
        self.clock.advance(1.0)
        self.assertEqual(len(self.http.requests), 1)  # event 2 waits behind the failed batch
        self.clock.advance(14.0)  # first retry after 30 * 0.5 s
        self.assertEqual(len(self.http.requests), 2)
        self.clock.advance(29.0)  # second retry after 60 * 0.5 s
        self.assertEqual(len(self.http.requests), 2)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        bodies = self.http.bodies()
        self.assertEqual(len(bodies), 4)
        self.assertEqual(bodies[0], bodies[1])
        self.assertEqual(bodies[1], bodies[2])
        self.assertEqual(self.http.requests[0][2][DELIVERY_HEADER], self.http.requests[2][2][DELIVERY_HEADER])
        order = [e["recipient"] for b in bodies[2:] for e in b["events"]]
        self.assertEqual(order, ["r0@example.com", "r1@example.com", "r2@example.com"])
        self.assertEqual([a[2] for a in source.attempts], [500, 503, 200, 200])
        self.assertIn("HTTP 500: nope", source.attempts[0][3])
        self.assertEqual(self.metrics.webhook_posts.labels(result="http_error")._value.get(), 2)

    def test_redirect_is_a_failure(self) -> None:
        """A 3xx answer is not an acknowledgement: the batch is retried, never sent to the new location."""
        source = FakeSource(hook())
        d = self.dispatcher(source)
        self.http.answers = [302]
        d.receive(event(0))
        self.clock.advance(1.0)
        self.assertEqual(source.attempts[0][2], 302)
        self.assertIn("HTTP 302", source.attempts[0][3] or "")
        self.assertEqual(d.pending(7), 1)
        self.clock.advance(15.0)
        self.assertEqual([r[0] for r in self.http.requests], ["https://hooks.example.com/7"] * 2)
        self.assertEqual(d.pending(7), 0)

    def test_timeout_is_a_failure(self) -> None:
        """No answer within the timeout: the request is cancelled, recorded without status, and retried."""
        source = FakeSource(hook())
        d = self.dispatcher(source, timeout=10.0)
        never: Deferred[Any] = Deferred()
        self.http.answers = [never]
        d.receive(event(0))
        self.clock.advance(1.0)
        self.clock.advance(10.0)
        self.assertTrue(never.called)  # cancelled
        self.assertEqual(source.attempts[0][2], None)
        self.assertIn("no answer within 10 s", source.attempts[0][3])
        self.clock.advance(15.0)
        self.assertEqual(source.attempts[-1][2], 200)

    def test_gives_up_after_a_day(self) -> None:
        """Failing for retry_for seconds marks the endpoint failing; it then gets nothing until re-enabled."""
        source = FakeSource(hook(), hook(8))
        d = self.dispatcher(source)
        self.http.default = 500
        d.receive([event(0), event(1)])
        self.clock.advance(1.0)
        for _ in range(40):
            self.clock.advance(3600.0)
        self.assertTrue(source.hooks[7].failing)
        self.assertTrue(source.hooks[8].failing)
        self.assertLessEqual(len(self.http.requests), 2 * 40)
        self.assertEqual(d.pending(7), 0)
        self.assertEqual(self.metrics.webhook_events_dropped.labels(reason="failing")._value.get(), 4)
        posted = len(self.http.requests)
        d.receive(event(5))
        self.clock.advance(10.0)
        self.assertEqual(len(self.http.requests), posted)
        # Re-enabled through the API: the dispatcher reloads and delivers again.
        self.http.default = 200
        source.hooks[7] = attrs.evolve(source.hooks[7], failing=False)
        d.invalidate(1)
        d.receive(event(6))
        self.clock.advance(1.0)
        self.assertEqual(self.http.bodies()[-1]["events"][0]["recipient"], "r6@example.com")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deleted_webhook_dropped(self) -> None:
        """A webhook deleted while its batch waits for a retry is forgotten, its timer cancelled."""
        source = FakeSource(hook())
        d = self.dispatcher(source)
        self.http.default = 500
        d.receive(event(0))
        self.clock.advance(1.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        del source.hooks[7]
        d.invalidate(1)
        d.receive(event(1))
        self.assertEqual(d.pending(7), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cache_and_invalidate(self) -> None:
        """Webhooks are read once per cache period, and again right after invalidate."""
        source = FakeSource(hook())
        d = self.dispatcher(source, cache_seconds=30.0)
        d.receive(event(0))
        d.receive(event(1))
        self.assertEqual(source.loads, 1)
        self.clock.advance(31.0)
        d.receive(event(2))
        self.assertEqual(source.loads, 2)
        d.invalidate(1)
        d.receive(event(3))
        self.assertEqual(source.loads, 3)

    def test_backlog_bounded(self) -> None:
        """Beyond max_backlog waiting events the oldest are dropped and counted."""
        d = self.dispatcher(FakeSource(hook()), max_backlog=5, max_batch=100)
        for n in range(8):
            d.receive(event(n))
        self.assertEqual(d.pending(7), 5)
        self.assertEqual(self.metrics.webhook_events_dropped.labels(reason="backlog")._value.get(), 3)
        self.clock.advance(1.0)
        self.assertEqual(next(e["recipient"] for e in self.http.bodies()[0]["events"]), "r3@example.com")

    def test_stop_cancels_timers(self) -> None:
        """After stop no timer is left and new events are ignored."""
        d = self.dispatcher(FakeSource(hook()))
        d.receive(event(0))
        d.stop()
        d.receive(event(1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.http.requests, [])


class SignatureTests(SynchronousTestCase):
    def test_verify(self) -> None:
        """The documented check accepts a fresh signature and refuses old, tampered or other-secret ones."""
        body = b'{"events":[]}'
        header = sign("s3cret", 1000, body)
        self.assertTrue(verify_signature("s3cret", header, body, now=1100))
        self.assertFalse(verify_signature("s3cret", header, body, now=1000 + 301))
        self.assertFalse(verify_signature("s3cret", header, body + b" ", now=1000))
        self.assertFalse(verify_signature("other", header, body, now=1000))
        self.assertFalse(verify_signature("s3cret", "v1=abc", body, now=1000))
        # The documented construction, spelled out: HMAC-SHA256 over "<t>.<body>".
        import hashlib
        import hmac

        expected = hmac.new(b"s3cret", b"1000." + body, hashlib.sha256).hexdigest()
        self.assertEqual(header, f"t=1000,v1={expected}")

    def test_retry_delay(self) -> None:
        """Delays double from the base up to the cap, scaled by jitter into [0.5, 1] of that."""
        self.assertEqual(
            [retry_delay(n, base=30, cap=3600, jitter=lambda: 1.0) for n in (1, 2, 3, 8, 20)], [30, 60, 120, 3600, 3600]
        )
        self.assertEqual(retry_delay(1, base=30, jitter=lambda: 0.0), 15)
        self.assertEqual(retry_delay(10_000, base=30, cap=3600, jitter=lambda: 0.5), 2700)

    def test_event_id_stable(self) -> None:
        """An event's id is the same every time (so retries carry it) and differs between events."""
        self.assertEqual(event_id(event(1)), event_id(event(1)))
        self.assertNotEqual(event_id(event(1)), event_id(event(2)))


class UrlCheckTests(SynchronousTestCase):
    def test_urls(self) -> None:
        """Public http(s) URLs pass; other schemes, credentials, private or loopback hosts (any spelling) do not."""
        self.assertEqual(check_url("https://hooks.example.com/x?y=1"), "https://hooks.example.com/x?y=1")
        for bad in (
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "http://127.0.0.1/",
            "http://[::1]/",
            "http://169.254.169.254/latest",
            "http://192.168.0.1/",
            "http://2130706433/",
            "http://127.1/",
            "http://0x7f000001/",
            "http://localhost/",
            "https:///x",
            "https://exa mple.com/",
        ):
            with self.assertRaises(StorageError, msg=bad):
                check_url(bad)
        self.assertEqual(check_url("http://127.0.0.1:9/x", allow_private=True), "http://127.0.0.1:9/x")


class Receiver(Resource):
    """A webhook endpoint: keeps what it gets, answers the codes it is given (200 when none)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, dict[bytes, list[bytes]]]] = []
        self.codes: list[int] = []
        self.arrived: Deferred[None] = Deferred()

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.received.append((body, {k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()}))
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        if not self.arrived.called:
            self.arrived.callback(None)
        return b"ok"


class StubTreqDispatcherTests(SynchronousTestCase):
    def test_through_stubtreq(self) -> None:
        """Through a real HTTP client and server in memory: a 500 is retried and the receiver verifies both."""
        from treq.testing import StubTreq

        receiver = Receiver()
        receiver.codes = [500]
        clock = Clock()
        clock.advance(1_000_000)
        source = FakeSource(hook())
        d = WebhookDispatcher(source, StubTreq(receiver), clock, jitter=lambda: 0.0)  # type: ignore[arg-type]
        d.receive([event(0), event(1)])
        clock.advance(1.0)
        clock.advance(15.0)
        self.assertEqual([a[2] for a in source.attempts], [500, 200])
        for body, headers in receiver.received:
            signature = headers[b"X-Mailrelay-Signature"][0].decode()
            self.assertTrue(verify_signature(SECRET, signature, body, now=clock.seconds()))
        self.assertEqual(receiver.received[0][0], receiver.received[1][0])


class LoopbackReceiverTests(TestCase):
    async def test_real_receiver(self) -> None:
        """One real POST over loopback TCP with the production client: the receiver gets the signed batch."""
        receiver = Receiver()
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = AgentClient(Agent(reactor, pool=pool))
        url = f"http://127.0.0.1:{port.getHost().port}/hook"  # type: ignore[attr-defined]
        source = FakeSource(attrs.evolve(hook(), url=url))
        d = WebhookDispatcher(source, client, reactor, batch_interval=0.01)
        self.addCleanup(d.stop)
        d.receive([event(0), event(1, EventType.OPENED)])
        await receiver.arrived
        for _ in range(200):
            if source.attempts:
                break
            await deferLater(reactor, 0.01, lambda: None)
        body, headers = receiver.received[0]
        self.assertTrue(
            verify_signature(SECRET, headers[b"X-Mailrelay-Signature"][0].decode(), body, now=reactor.seconds())
        )  # type: ignore[attr-defined]
        self.assertEqual([e["type"] for e in json.loads(body)["events"]], ["delivered", "opened"])
        self.assertEqual(source.attempts[0][2], 200)


class WebhookStorageTestsMixin:
    engine: str

    async def test_crud_and_attempts(self) -> None:
        """Endpoints round-trip per account; attempts list newest first and go with their webhook."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        t: Any = self
        hooks = Webhooks(store.pool, reactor)
        a = await store.accounts.create("a", None)
        b = await store.accounts.create("b", None)
        created = await hooks.create(a.id, "https://x.example/1", "sec", ["bounced", "opened"])
        t.assertEqual(created.event_types, frozenset({"bounced", "opened"}))
        t.assertFalse(created.failing)
        with t.assertRaises(StorageError):
            await hooks.create(a.id, "https://x.example/1", "sec", ["sent"])
        with t.assertRaises(NotFound):
            await hooks.get(b.id, created.id)
        t.assertEqual(await hooks.list(b.id), [])
        updated = await hooks.update(a.id, created.id, url="https://x.example/2", event_types=[], failing=True)
        t.assertEqual((updated.url, updated.event_types, updated.failing), ("https://x.example/2", frozenset(), True))
        await hooks.set_failing(created.id, False)
        t.assertFalse((await hooks.get(a.id, created.id)).failing)
        for i in range(3):
            await hooks.record_attempt(created.id, 10.0 + i, 200 if i == 2 else None, None if i == 2 else "x", i + 1)
        attempts = await hooks.attempts(a.id, created.id, limit=2)
        t.assertEqual([x.events for x in attempts], [3, 2])
        older = await hooks.attempts(a.id, created.id, before_id=attempts[-1].id)
        t.assertEqual([x.events for x in older], [1])
        t.assertEqual(await hooks.attempts(b.id, created.id), [])
        with t.assertRaises(NotFound):
            await hooks.delete(b.id, created.id)
        await hooks.delete(a.id, created.id)
        rows = await store.pool.execute("t", "SELECT COUNT(*) FROM webhook_attempts")
        t.assertEqual(int(rows[0][0]), 0)

    async def test_sink_to_endpoint(self) -> None:
        """Events stored by the real sink reach the endpoint, and the attempt shows in the API."""
        web = await Web.create(self, self.engine)  # type: ignore[arg-type]
        t: Any = self
        receiver = Receiver()
        from treq.testing import StubTreq

        dispatcher = WebhookDispatcher(
            web.webhooks,
            StubTreq(receiver),  # type: ignore[arg-type]
            reactor,
            batch_interval=0.01,
        )
        created = (await web.call("POST", "/webhooks", {"url": "https://hooks.example.com/in"})).json()
        sink = EventSink(web.store.pool, reactor, reactor, os.path.abspath(self.mktemp()))  # type: ignore
        sink.subscribe(dispatcher.receive)
        await sink.start()
        sink.emit(event(0, account=web.account_id))
        sink.emit(event(1, EventType.BOUNCED, account=web.account_id))
        sink.emit(event(2, account=web.account_id + 99))
        await sink.stop()
        await receiver.arrived
        for _ in range(500):
            attempts = (await web.call("GET", f"/webhooks/{created['id']}/attempts")).json()["data"]
            if attempts:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await dispatcher.stop()
        t.assertEqual([(a["status"], a["events"], a["ok"]) for a in attempts], [(200, 2, True)])
        body, headers = receiver.received[0]
        t.assertTrue(
            verify_signature(
                created["secret"], headers[b"X-Mailrelay-Signature"][0].decode(), body, now=reactor.seconds()
            )
        )  # type: ignore[attr-defined]
        t.assertEqual([e["type"] for e in json.loads(body)["events"]], ["delivered", "bounced"])

    async def _durable_setup(self) -> tuple[Web, int, EventSink]:
        """An account with one webhook (via the API) and a started sink, stopped at the test's end."""
        web = await Web.create(self, self.engine)  # type: ignore[arg-type]
        created = (await web.call("POST", "/webhooks", {"url": "https://hooks.example.com/in"})).json()
        sink = EventSink(web.store.pool, reactor, reactor, os.path.abspath(self.mktemp()))  # type: ignore
        await sink.start()
        return web, int(created["id"]), sink

    def _durable(self, web: Web, http: FakeHTTP) -> WebhookDispatcher:
        return WebhookDispatcher(web.webhooks, http, reactor, batch_interval=0.01, retry_base=3600.0, jitter=lambda: 0)

    async def _poll_until(self, condition: Any) -> None:
        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("timed out")

    async def test_undelivered_events_survive_a_restart(self) -> None:
        """
        A dispatcher stopped while its endpoint failed: a new one (a restart)
        sends those events, in order, from the events table; once they are
        acknowledged, a third sends nothing again.
        """
        t: Any = self
        web, webhook_id, sink = await self._durable_setup()
        down = FakeHTTP()
        down.default = 503
        first = self._durable(web, down)
        sink.subscribe(first.receive)
        for n, kind in enumerate((EventType.QUEUED, EventType.DELIVERED, EventType.OPENED)):
            sink.emit(event(n, kind, account=web.account_id))
        await sink.flush()
        await self._poll_until(lambda: down.requests)
        await first.stop()
        sink.unsubscribe(first.receive)
        t.assertEqual(len(down.requests), 1)  # the retry would come in an hour: the process ends first

        up = FakeHTTP()
        second = self._durable(web, up)
        await second.start()
        await self._poll_until(lambda: up.requests)
        await self._poll_until(lambda: not second.pending(webhook_id))
        await second.stop()
        t.assertEqual([e["type"] for b in up.bodies() for e in b["events"]], ["queued", "delivered", "opened"])
        t.assertEqual([e["id"] for e in up.bodies()[0]["events"]], [e["id"] for e in down.bodies()[0]["events"]])
        stored = await web.webhooks.get(web.account_id, webhook_id)
        newest = await web.store.pool.execute("t", "SELECT MAX(id) FROM events")
        t.assertEqual(stored.cursor, int(newest[0][0]))

        again = FakeHTTP()
        third = self._durable(web, again)
        await third.start()
        await deferLater(reactor, 0.1, lambda: None)
        await third.stop()
        await sink.stop()
        t.assertEqual(again.requests, [])

    async def test_one_node_delivers_at_a_time(self) -> None:
        """While one dispatcher holds an endpoint's lease, another sharing the database sends nothing."""
        t: Any = self
        web, _, sink = await self._durable_setup()
        slow: Deferred[Any] = Deferred()
        http_a, http_b = FakeHTTP(), FakeHTTP()
        http_a.answers.append(slow)
        a, b = self._durable(web, http_a), self._durable(web, http_b)
        sink.subscribe(a.receive)
        sink.subscribe(b.receive)
        sink.emit(event(0, account=web.account_id))
        await sink.flush()
        await self._poll_until(lambda: http_a.requests or http_b.requests)
        await deferLater(reactor, 0.1, lambda: None)
        t.assertEqual(len(http_a.requests) + len(http_b.requests), 1)
        slow.callback(FakeResponse(200))
        await a.stop()
        await b.stop()
        await sink.stop()
        t.assertEqual(len(http_a.requests) + len(http_b.requests), 1)


class SQLiteWebhookStorageTests(WebhookStorageTestsMixin, TestCase):
    engine = "sqlite"


class PostgresWebhookStorageTests(WebhookStorageTestsMixin, TestCase):
    engine = "postgresql"
