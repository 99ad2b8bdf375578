"""
End-to-end webhooks: the real ``twistd mailrelay`` POSTs the events of a
delivered message to receivers running in this test process (twisted.web
on loopback), signed as docs/api.md tells receivers to verify.

Webhook URLs on loopback are refused by the API unless the operator allows
private addresses, and the relay has no configuration key for that yet
(``allow_private_webhooks`` is not passed by ``service._add_web``).  So the
test registers through the API when the relay accepts the URL, and
otherwise writes the webhook rows into the relay's SQLite database itself,
before any event of the account exists (the dispatcher reads an account's
webhooks on its first event).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import time
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.test_delivery_e2e import received, until
from tests.test_tracking_e2e import HTTPRelayFixture, http

SECRET = "whsec_e2e_test_secret_0123456789"


def verify(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    """The receiver's check, as docs/api.md shows it."""
    fields = dict(item.split("=", 1) for item in header.split(","))
    t = int(fields["t"])
    if abs(time.time() - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


class _Site(Site):
    """Remembers its connections: the relay keeps them alive, and trial wants them closed."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.append(channel)
        return channel


class Receiver(Resource):
    """Records every POST; answers ``fail_first`` 500s before answering 200."""

    isLeaf = True

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__()
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes, int]] = []

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()  # type: ignore[union-attr]
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        status = 500 if len(self.requests) < self.fail_first else 200
        self.requests.append((headers, body, status))
        request.setResponseCode(status)
        return b"no" if status == 500 else b"ok"

    def accepted_events(self) -> list[dict[str, Any]]:
        """The events of the POSTs answered 200."""
        return [e for h, b, s in self.requests if s == 200 for e in json.loads(b)["events"]]


class WebhookTests(HTTPRelayFixture, TestCase):
    """Signed, retried webhook deliveries from the running relay."""

    timeout = 120
    receivers: ClassVar[dict[str, Receiver]]

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.prepare())

    async def listen(self, receiver: Receiver) -> str:
        """Serve ``receiver``; at the test's end close the port and the relay's kept-alive connections."""
        site = _Site(receiver)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]

        async def down() -> None:
            await port.stopListening()  # type: ignore[misc]
            for channel in site.channels:
                transport = getattr(getattr(channel, "_channel", channel), "transport", None)
                if transport is not None and transport.connected:
                    transport.abortConnection()
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]

        self.addCleanup(lambda: Deferred.fromCoroutine(down()))
        return f"http://127.0.0.1:{port.getHost().port}/hook"  # type: ignore[attr-defined]

    async def register(self, url: str) -> int:
        """Through ``POST /api/v1/webhooks`` if the relay takes a loopback URL; else in its database."""
        body = json.dumps({"url": url}).encode()
        status, _, answer = await deferToThread(
            http,
            "POST",
            self.base() + "/api/v1/webhooks",
            body,
            {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        if status == 201:
            created = json.loads(answer)
            self.secrets[int(created["id"])] = created["secret"]
            return int(created["id"])
        self.assertEqual(status, 422, answer)  # refused as a non-public address: see the module docstring

        def insert() -> int:
            db = sqlite3.connect(self.relay.data / "mailrelay.sqlite3")
            try:
                with db:
                    account = db.execute("SELECT id FROM accounts WHERE name = 'shop'").fetchone()[0]
                    cursor = db.execute(
                        "INSERT INTO webhooks (account_id, url, event_types, secret, failing, created_at)"
                        " VALUES (?, ?, '', ?, 0, ?)",
                        (account, url, SECRET, time.time()),
                    )
                    return int(cursor.lastrowid or 0)
            finally:
                db.close()

        webhook_id = await deferToThread(insert)
        self.secrets[webhook_id] = SECRET
        return webhook_id

    async def test_signed_events_and_retries(self) -> None:
        """
        A healthy receiver gets the message's events signed (valid HMAC,
        fresh timestamp); one answering 500 at first gets the same batch again
        (same delivery id) and then the events.
        """
        self.secrets: dict[int, str] = {}
        good, flaky = Receiver(), Receiver(fail_first=1)
        good_id = await self.register(await self.listen(good))
        flaky_id = await self.register(await self.listen(flaky))
        qid = await self.send(["webhook-wendy@example.net"])
        await until(lambda: received(self.sink, "webhook-wendy@example.net"), what="the copy")

        def delivered(r: Receiver) -> Any:
            return [e for e in r.accepted_events() if e["type"] == "delivered" and e["queue_id"] == qid]

        found = await until(lambda: delivered(good), timeout=30, what="the delivered event at the good receiver")
        self.assertEqual(found[0]["recipient"], "webhook-wendy@example.net")
        for headers, body, _ in good.requests:
            self.assertTrue(verify(self.secrets[good_id], headers["x-mailrelay-signature"], body), headers)
            self.assertFalse(verify("whsec_wrong", headers["x-mailrelay-signature"], body))
            self.assertEqual(headers["x-mailrelay-webhook"], str(good_id))
            self.assertEqual(json.loads(body)["delivery_id"], headers["x-mailrelay-delivery"])
        types = [e["type"] for e in good.accepted_events() if e["queue_id"] == qid]
        self.assertLess(types.index("queued"), types.index("delivered"))

        # The first retry comes after retry_base (30 s) with jitter: between 15 and 30 s.
        await until(lambda: delivered(flaky), timeout=60, what="the retried batch at the flaky receiver")
        statuses = [s for _, _, s in flaky.requests]
        self.assertEqual(statuses[0], 500)
        self.assertIn(200, statuses)
        first, retried = flaky.requests[0][0], flaky.requests[1][0]
        self.assertEqual(first["x-mailrelay-delivery"], retried["x-mailrelay-delivery"])
        for headers, body, _ in flaky.requests:
            self.assertTrue(verify(self.secrets[flaky_id], headers["x-mailrelay-signature"], body))
        ids = [e["id"] for e in flaky.accepted_events()]
        self.assertEqual(len(ids), len(set(ids)))
