"""
End-to-end tracking: the real ``twistd mailrelay`` with an HTTP listener.

A tracked HTML message goes in over submission (STARTTLS + AUTH), comes
out at the sink rewritten (pixel, redirect links, List-Unsubscribe), and
the test then acts as the reader: it fetches the pixel and a link from the
relay's HTTP listener, and posts an RFC 8058 one-click unsubscribe.  What
the reader did must show in ``mailrelay stats``, in the JSON API and in
the suppression list.

The HTTP listener is on a port picked here (bound, then closed) because
``[tracking] base_url`` must name it before the relay starts.
"""

from __future__ import annotations

import atexit
import email
import email.policy
import json
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.relay import RelayProcess
from tests.test_delivery_e2e import RelayFixture, World, free_port, received, txt_value, until

HTML = (
    "<html><body><p>Your order shipped.</p>"
    '<p><a href="https://shop.example.com/orders/42">See your order</a></p>'
    "</body></html>\r\n"
)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are what the test checks, so urllib must not follow them."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request without following redirects: (status, headers, body); HTTP errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def html_part(data: bytes) -> str:
    """The decoded text/html body of a delivered copy (the transfer encoding undone)."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    part = msg.get_body(preferencelist=("html",))
    assert part is not None, "no HTML part in the delivered copy"
    return str(part.get_content())  # type: ignore[attr-defined]


class HTTPRelayFixture(RelayFixture):
    """
    ``RelayFixture`` with an HTTP listener on a known port, ``[tracking]
    base_url`` pointing at it, and an API key; ``account_settings`` are
    passed to ``mailrelay account set`` before the relay starts.
    """

    account_settings: ClassVar[tuple[str, ...]] = ()
    api_key: ClassVar[str]
    http_port: ClassVar[int]
    extra_config: ClassVar[str] = ""

    async def relay_up(self) -> None:
        cls = type(self)
        if "relay" in cls.__dict__:
            return
        world = World()
        http_port = free_port(socket.SOCK_STREAM)
        directory = Path(tempfile.mkdtemp(prefix="mailrelay-e2e-"))
        atexit.register(shutil.rmtree, directory, True)
        extra = world.config(**cls.delivery) + f'[tracking]\nbase_url = "http://127.0.0.1:{http_port}"\n'
        relay = RelayProcess(
            directory,
            extra=extra + cls.extra_config,
            listeners={
                "smtp": ["tcp:0:interface=127.0.0.1"],
                "submission": ["tcp:0:interface=127.0.0.1"],
                "http": [f"tcp:{http_port}:interface=127.0.0.1"],
            },
        )
        atexit.register(relay.kill)

        def setup() -> tuple[Any, str]:
            relay.mailrelay("account", "create", "shop", stdin="shop-password\n")
            if cls.account_settings:
                relay.mailrelay("account", "set", "shop", *cls.account_settings)
            added = relay.mailrelay("domain", "add", "shop", "example.com")
            relay.mailrelay("domain", "verify", "example.com", "--force")
            key = relay.mailrelay(
                "api-key",
                "create",
                "shop",
                *(
                    f"--scope={s}"
                    for s in ("stats:read", "events:read", "suppressions:read", "webhooks:write", "webhooks:read")
                ),
            )
            return added, key["key"]

        added, key = await deferToThread(setup)
        for record in added["dns_records"]:
            if "._domainkey." in record["name"]:
                world.dkim[record["name"].rstrip(".").encode() + b"."] = txt_value(record["value"])
        cls.world, cls.relay, cls.api_key, cls.http_port = world, relay, key, http_port

    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def api(self, path: str) -> Any:
        """``GET /api/v1<path>`` with the class's API key; the parsed JSON of a 200."""
        status, _, body = await deferToThread(
            http, "GET", self.base() + "/api/v1" + path, None, {"Authorization": f"Bearer {self.api_key}"}
        )
        assert status == 200, (status, body)
        return json.loads(body)

    async def poll(self, fetch: Any, check: Any, what: str, tries: int = 50, pause: float = 0.2) -> Any:
        """Call ``fetch`` (a coroutine function) until ``check(value)`` holds; events are written in batches."""
        value = None
        for _ in range(tries):
            value = await fetch()
            if check(value):
                return value
            await deferLater(reactor, pause, lambda: None)  # type: ignore[arg-type]
        raise AssertionError(f"timed out waiting for {what}; last: {value!r}")

    async def settled(self, qid: str) -> None:
        """
        Wait until the delivery is recorded: ``delivered`` among the events,
        then the ``recipients`` row (written in batches every second), which
        tracking tokens and VERP addresses are resolved with.  A reader who
        acts sooner gets a recipient-less event (or a 404 for unsubscribe).
        """
        await self.events_of(qid, {"delivered"})
        await deferLater(reactor, 1.5, lambda: None)  # type: ignore[arg-type]

    async def send_html(self, rcpt: str, subject: str = "Shipped") -> str:
        """A multipart/alternative message with an HTML part and one link; the queue id."""
        boundary = "b1"
        body = (
            f'--{boundary}\r\nContent-Type: text/plain; charset="utf-8"\r\n\r\nYour order shipped.\r\n'
            f'--{boundary}\r\nContent-Type: text/html; charset="utf-8"\r\n\r\n{HTML}'
            f"--{boundary}--\r\n"
        )
        extra = f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"\r\n'
        return await self.send([rcpt], subject=subject, extra=extra, body=body)


class TrackingTests(HTTPRelayFixture, TestCase):
    """Opens, clicks and one-click unsubscribes, through real sockets end to end."""

    timeout = 90
    account_settings = ("--open-tracking", "on", "--click-tracking", "on", "--unsubscribe-link", "on")

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.prepare())

    async def test_open_and_click_counted(self) -> None:
        """The pixel answers a GIF and the link a 302 to the original URL; stats and API count one of each."""
        qid = await self.send_html("olivia@example.net")
        copies = await until(lambda: received(self.sink, "olivia@example.net"), what="olivia's copy")
        await self.settled(qid)
        html = html_part(copies[0].data)
        base = re.escape(self.base())
        pixels = re.findall(base + r"/o/[A-Za-z0-9_\-.=~]+", html)
        links = re.findall(base + r"/c/[A-Za-z0-9_\-.=~]+", html)
        self.assertEqual(len(pixels), 1, html)
        self.assertEqual(len(links), 1, html)
        self.assertNotIn('href="https://shop.example.com/orders/42"', html)

        status, headers, gif = await deferToThread(http, "GET", pixels[0])
        self.assertEqual((status, gif[:6]), (200, b"GIF89a"))
        status, headers, _ = await deferToThread(http, "GET", links[0])
        self.assertEqual((status, headers.get("Location")), (302, "https://shop.example.com/orders/42"))

        def counted(totals: dict[str, Any]) -> bool:
            return bool(totals.get("opens") == 1 and totals.get("clicks") == 1)

        async def cli_totals() -> dict[str, Any]:
            return dict((await deferToThread(self.relay.mailrelay, "stats", "shop"))["totals"])

        totals = await self.poll(cli_totals, counted, "one open and one click in mailrelay stats")
        self.assertEqual((totals["unique_opens"], totals["unique_clicks"]), (1, 1))

        async def api_totals() -> dict[str, Any]:
            return dict((await self.api("/stats"))["totals"])

        await self.poll(api_totals, counted, "one open and one click in GET /api/v1/stats")
        events = (await self.api("/events?type=opened&type=clicked&order=asc"))["data"]
        self.assertEqual(
            sorted((e["type"], e["recipient"], e["queue_id"]) for e in events),
            [("clicked", "olivia@example.net", qid), ("opened", "olivia@example.net", qid)],
        )
        clicked = next(e for e in events if e["type"] == "clicked")
        self.assertEqual(clicked["detail"]["url"], "https://shop.example.com/orders/42")

    async def test_one_click_unsubscribe_suppresses(self) -> None:
        """An RFC 8058 POST to List-Unsubscribe suppresses the address: the next send is not delivered."""
        first = await self.send_html("ursula@example.net")
        copies = await until(lambda: received(self.sink, "ursula@example.net"), what="ursula's copy")
        await self.settled(first)
        msg = email.message_from_bytes(copies[0].data, policy=email.policy.default)
        self.assertEqual(str(msg["List-Unsubscribe-Post"]), "List-Unsubscribe=One-Click")
        urls = re.findall(r"<(https?://[^>]+)>", str(msg["List-Unsubscribe"]))
        url = [u for u in urls if u.startswith(self.base() + "/u/")]
        self.assertEqual(len(url), 1, msg["List-Unsubscribe"])

        status, _, _ = await deferToThread(
            http,
            "POST",
            url[0],
            b"List-Unsubscribe=One-Click",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(status, 200)

        async def suppressed() -> list[dict[str, Any]]:
            found = await deferToThread(self.relay.mailrelay, "suppression", "list", "shop")
            return [s for s in found if s["address"] == "ursula@example.net"]

        found = await self.poll(suppressed, bool, "ursula's suppression")
        self.assertEqual(found[0]["reason"], "unsubscribe")

        qid = await self.send(["ursula@example.net"], subject="Again")
        events = await self.events_of(qid, {"suppressed"})
        self.assertEqual([e["recipient"] for e in events["suppressed"]], ["ursula@example.net"])
        await deferLater(reactor, 1.0, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(len(received(self.sink, "ursula@example.net")), 1)
