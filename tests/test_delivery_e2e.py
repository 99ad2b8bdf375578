"""
End-to-end delivery: the real ``twistd mailrelay`` on loopback, with a DNS
server and a sink SMTP server running in this test process.

Test domains have MX records pointing at 127.0.0.1, and the relay is told
to use this process's DNS server (``[dns] nameservers``) and to deliver to
the sink's port (``[delivery] remote_port``), with retries of 1-2 seconds.
Mail goes in through the submission port with smtplib and comes out at the
sink, where the tests look at what arrived: once, DKIM-signed, with a VERP
return path, no control headers; retried; bounced with a DSN; suppressed.

trial checks the reactor for leftover sockets after each class, and there
is no class-level tear-down, so each test starts the DNS server and the
sink itself and stops them at its end, on ports fixed per class (the relay
keeps its configuration).  Blocking calls (smtplib, the ``mailrelay``
command, starting twistd) run in threads so the DNS server and the sink
keep answering the relay meanwhile.
"""

from __future__ import annotations

import argparse
import atexit
import email
import email.policy
import io
import re
import shutil
import smtplib
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.cli.main import Context, build_parser
from mailrelay.config import load_config
from mailrelay.processing.tokens import parse_verp
from tests.support.dns_server import _UDPServer
from tests.support.relay import RelayProcess
from tests.support.sink import ReceivedMessage, Sink, SinkProtocol

SENDER = "hello@example.com"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SlowSinkProtocol(SinkProtocol):
    """Holds back the final reply to DATA of messages for ``slow-`` recipients while ``sink.stall`` is set."""

    _holding = False

    def _data_line(self, line: bytes) -> None:
        if line == b".\r\n" and getattr(self.sink, "stall", False) and any(r.startswith("slow-") for r in self._rcpts):
            self._holding = True
            try:
                super()._data_line(line)
            finally:
                self._holding = False
            return
        super()._data_line(line)

    def _reply(self, reply: Any) -> None:
        if self._holding:
            return  # never answered: the relay waits until it is killed
        super()._reply(reply)


class _Factory(Factory):
    """Builds sink connections and remembers them, so a test can close them all at its end."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.connections: list[SinkProtocol] = []

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        p = SlowSinkProtocol(self.sink)
        p.factory = self
        self.connections.append(p)
        return p


class World:
    """The DNS zone, and the DNS server and sink of the current test."""

    def __init__(self) -> None:
        self.dns_port = free_port(socket.SOCK_DGRAM)
        self.sink_port = free_port(socket.SOCK_STREAM)
        mx = {"MX": [(10, "mx.test")]}
        self.zone: dict[str, Any] = {
            "mx.test": {"A": ["127.0.0.1"]},
            "nullmx.example": {"MX": [(0, ".")]},
            **{
                d: dict(mx)
                for d in (
                    "example.com",
                    "example.net",
                    "retry.example",
                    "fail.example",
                    "verbs.example",
                    "crash.example",
                )
            },
        }
        self.dkim: dict[bytes, bytes] = {}

    def config(self, **delivery: Any) -> str:
        settings = {"remote_port": self.sink_port, "retry_min": 1, "retry_max": 2, **delivery}
        lines = [
            "[delivery]",
            *(f"{k} = {v}" for k, v in settings.items()),
            "[dns]",
            f'nameservers = ["127.0.0.1:{self.dns_port}"]',
            "timeout = 1.0",
        ]
        return "\n".join(lines) + "\n"

    async def up(self, test: TestCase) -> Sink:
        """DNS and sink for one test; both go away (connections too) when it ends."""
        udp = reactor.listenUDP(self.dns_port, _UDPServer(self.zone, 30), interface="127.0.0.1")  # type: ignore[attr-defined]
        sink = Sink()
        sink.stall = False  # type: ignore[attr-defined]
        factory = _Factory(sink)
        tcp = reactor.listenTCP(self.sink_port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

        async def down() -> None:
            await udp.stopListening()
            await tcp.stopListening()
            for p in factory.connections:
                if p.transport is not None and p.transport.connected:  # type: ignore[attr-defined]
                    p.transport.abortConnection()  # type: ignore[attr-defined]
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]

        test.addCleanup(lambda: Deferred.fromCoroutine(down()))
        return sink


async def until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` (every 50 ms) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]


def received(sink: Sink, rcpt: str) -> list[ReceivedMessage]:
    return [m for m in sink.messages if rcpt in m.rcpt_to]


def txt_value(value: str) -> bytes:
    chunks = re.findall(r'"((?:[^"\\]|\\.)*)"', value)
    return ("".join(chunks) if chunks else value).encode()


class RelayFixture:
    """One relay per class (started by its first test), with an account and a verified, DKIM-keyed domain."""

    relay: ClassVar[RelayProcess]
    world: ClassVar[World]
    delivery: ClassVar[dict[str, Any]] = {}

    async def relay_up(self) -> None:
        cls = type(self)
        if "relay" in cls.__dict__:
            return
        world = World()
        directory = Path(tempfile.mkdtemp(prefix="mailrelay-dlv-"))
        atexit.register(shutil.rmtree, directory, True)
        relay = RelayProcess(
            directory,
            extra=world.config(**cls.delivery),
            listeners={"smtp": ["tcp:0:interface=127.0.0.1"], "submission": ["tcp:0:interface=127.0.0.1"]},
        )
        atexit.register(relay.kill)

        def setup() -> Any:
            relay.mailrelay("account", "create", "shop", stdin="shop-password\n")
            added = relay.mailrelay("domain", "add", "shop", "example.com")
            relay.mailrelay("domain", "verify", "example.com", "--force")
            return added

        added = await deferToThread(setup)
        for record in added["dns_records"]:
            if "._domainkey." in record["name"]:
                world.dkim[record["name"].rstrip(".").encode() + b"."] = txt_value(record["value"])
        cls.world, cls.relay = world, relay

    async def start(self) -> None:
        await deferToThread(self.relay.start)

    async def prepare(self) -> None:
        """The relay (once per class), and this test's DNS server and sink."""
        await self.relay_up()
        self.sink = await self.world.up(self)  # type: ignore[arg-type]
        if self.relay.process is None or self.relay.process.poll() is not None:
            await self.start()

    async def send(
        self,
        recipients: list[str],
        subject: str = "Order 1",
        extra: str = "",
        body: str = "Thank you for your order.\r\n",
    ) -> str:
        message = (f"From: Shop <{SENDER}>\r\nTo: {recipients[0]}\r\nSubject: {subject}\r\n{extra}\r\n{body}").encode()
        port = self.relay.port("submission")

        def go() -> str:
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            try:
                client.starttls(context=tls_context())
                client.login("shop", "shop-password")
                client.mail(SENDER)
                for r in recipients:
                    code, text = client.rcpt(r)
                    assert code == 250, text
                code, text = client.data(message)
                assert code == 250, text
                return text.split()[-1].decode()
            finally:
                client.quit()

        return await deferToThread(go)

    async def events_of(self, qid: str, wanted: set[str]) -> dict[str, list[dict[str, Any]]]:
        """The stored events of one message (``mailrelay events``), once every type in ``wanted`` is there."""
        found: dict[str, list[dict[str, Any]]] = {}
        for _ in range(60):
            listed = await deferToThread(self.relay.mailrelay, "events", "shop", "--queue-id", qid)
            found = {}
            for e in listed:
                found.setdefault(e["type"], []).append(e)
            if wanted <= set(found):
                break
            await deferLater(reactor, 0.2, lambda: None)  # type: ignore[arg-type]
        return found

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        return self.world.dkim.get(name)

    def secret(self) -> bytes:
        return (self.relay.data / "tracking.secret").read_bytes().strip()

    async def queue(self, *argv: str) -> Any:
        """A ``mailrelay --json queue ...`` verb run in this process against the daemon's control socket."""
        parser = argparse.ArgumentParser()
        parser.add_argument("--json", action="store_true")
        from mailrelay.cli.queue import register

        register(parser.add_subparsers(dest="noun", required=True))
        args = parser.parse_args(["--json", "queue", *argv])
        out = io.StringIO()
        config = load_config(self.relay.config)
        await args.verb(Context(args, config, None, reactor, io.StringIO(), out))  # type: ignore[arg-type]
        import json

        return json.loads(out.getvalue())


class DeliveryTests(RelayFixture, TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.prepare())

    async def test_delivered_once_signed_with_verp(self) -> None:
        """One copy arrives: DKIM-valid, VERP return path naming the message, no control headers."""
        qid = await self.send(
            ["alice@example.net"], extra='X-MT-ATTR: {"tags": ["welcome"]}\r\nX-Mailrelay-Tags: t1\r\n'
        )
        copies = await until(lambda: received(self.sink, "alice@example.net"), what="alice's copy")
        copy = copies[0]
        info = parse_verp(copy.mail_from, self.secret())
        self.assertEqual((info.queue_id, info.recipient, info.domain), (qid, 0, "bounces.relay.test"))
        self.assertTrue(copy.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
        self.assertTrue(dkim.verify(copy.data, dnsfunc=self.dnsfunc))
        head = copy.data.split(b"\r\n\r\n")[0].lower()
        self.assertNotIn(b"x-mt-attr", head)
        self.assertNotIn(b"x-mailrelay-", head)
        self.assertIn(b"message-id: <", head)
        events = await self.events_of(qid, {"queued", "delivered"})
        delivered = events["delivered"]
        self.assertEqual(len(delivered), 1)
        self.assertEqual(
            (delivered[0]["recipient"], delivered[0]["transmission_id"], delivered[0]["detail"]["mx_host"]),
            ("alice@example.net", qid, "mx.test"),
        )
        self.assertIn("welcome", delivered[0]["tags"])
        await deferLater(reactor, 2.0, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(len(received(self.sink, "alice@example.net")), 1)
        with self.assertRaises(Exception) as e:
            await self.queue("show", qid)
        self.assertIn("no message", str(e.exception))  # finished: gone from the queue

    async def test_deferred_then_delivered(self) -> None:
        """A recipient refused twice with 451 is retried after the backoff and delivered once."""
        await self.send(["defer2-bob@retry.example"])
        await until(lambda: received(self.sink, "defer2-bob@retry.example"), what="the retried copy")
        rcpts = [c for c in self.sink.commands if c.upper().startswith("RCPT TO:<DEFER2-BOB@")]
        self.assertEqual(len(rcpts), 3)
        self.assertEqual(len(received(self.sink, "defer2-bob@retry.example")), 1)

    async def test_bounce_notice_and_suppression(self) -> None:
        """A 550 5.1.1 returns a DSN to the sender's address at the sink, and the address is suppressed."""
        qid = await self.send(["fail-carol@fail.example"], subject="Bounce me")
        notices = await until(
            lambda: [m for m in received(self.sink, SENDER) if b"fail-carol" in m.data], what="the bounce notice"
        )
        notice = notices[0]
        self.assertEqual(notice.mail_from, "")
        msg = email.message_from_bytes(notice.data, policy=email.policy.default)
        self.assertEqual(
            (msg.get_content_type(), msg.get_param("report-type")), ("multipart/report", "delivery-status")
        )
        self.assertIn(b"Final-Recipient: rfc822; fail-carol@fail.example", notice.data)
        self.assertIn(b"Status: 5.1.1", notice.data)
        self.assertIn(b"Subject: Bounce me", notice.data)  # the original headers come back
        self.assertIn(qid.encode(), notice.data)

        def suppressed() -> Any:
            return [
                s
                for s in self.relay.mailrelay("suppression", "list", "shop")
                if s["address"] == "fail-carol@fail.example"
            ]

        for _ in range(40):
            found = await deferToThread(suppressed)
            if found:
                break
            await deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]
        self.assertEqual([(s["reason"], "5.1.1" in (s["detail"] or "")) for s in found], [("hard_bounce", True)])
        events = await self.events_of(qid, {"bounced"})
        self.assertEqual(
            [(e["recipient"], e["detail"]["class"]) for e in events["bounced"]], [("fail-carol@fail.example", "hard")]
        )

    async def test_null_mx_bounces_at_once(self) -> None:
        """A domain with a null MX (RFC 7505) bounces without any retry: the notice comes at once."""
        start = time.monotonic()
        await self.send(["dave@nullmx.example"])
        notices = await until(
            lambda: [m for m in received(self.sink, SENDER) if b"dave@nullmx.example" in m.data],
            what="the null MX notice",
        )
        self.assertIn(b"Status: 5.1.10", notices[0].data)
        self.assertLess(time.monotonic() - start, 5)

    async def test_queue_verbs(self) -> None:
        """list, show, explain, hold, release, retry and delete against the running daemon."""
        qid = await self.send(["defer-erin@verbs.example"])
        await until(lambda: [c for c in self.sink.commands if "DEFER-ERIN" in c.upper()], what="a first attempt")
        listed = await self.queue("list", "--destination", "verbs.example")
        self.assertEqual([m["queue_id"] for m in listed["messages"]], [qid])
        shown = await self.queue("show", qid)
        detail = shown["recipients_detail"][0]
        self.assertEqual((detail["address"], detail["status"]), ("defer-erin@verbs.example", "deferred"))
        self.assertIn("4.7.1", detail["last_reply"])
        explained = await self.queue("explain", qid)
        self.assertTrue(any("deferred" in r for r in explained["reasons"]))
        self.assertEqual((await self.queue("hold", qid))["queue_ids"], [qid])
        self.assertEqual((await self.queue("list", "--state", "held"))["total"], 1)
        tries = len([c for c in self.sink.commands if "DEFER-ERIN" in c.upper()])
        await deferLater(reactor, 2.5, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(len([c for c in self.sink.commands if "DEFER-ERIN" in c.upper()]), tries)  # held: no tries
        self.assertEqual((await self.queue("release", qid))["queue_ids"], [qid])
        self.assertEqual((await self.queue("retry", qid))["queue_ids"], [qid])
        await until(lambda: len([c for c in self.sink.commands if "DEFER-ERIN" in c.upper()]) > tries, what="the retry")
        dry = await self.queue("delete", "--destination", "verbs.example", "--dry-run")
        self.assertEqual(dry["queue_ids"], [qid])
        self.assertEqual((await self.queue("delete", qid, "--silent"))["queue_ids"], [qid])
        self.assertEqual((await self.queue("list", "--destination", "verbs.example"))["total"], 0)

    async def test_registered_command(self) -> None:
        """Once cli/main.py registers the noun, `mailrelay queue list` works as a command of its own."""
        nouns = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        if "queue" not in nouns:
            raise SkipTest("cli/main.py does not register mailrelay.cli.queue yet")
        listed = await deferToThread(self.relay.mailrelay, "queue", "list")
        self.assertIn("messages", listed)


class CrashTests(RelayFixture, TestCase):
    """kill -9 while a delivery is under way, then restart: at least once, never twice."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.prepare())

    async def test_kill_during_delivery(self) -> None:
        """Recipients recorded delivered before the crash are never sent again; the one in flight is."""
        self.sink.stall = True  # type: ignore[attr-defined]
        rcpts = ["a1@crash.example", "a2@crash.example", "slow-c@crash.example"]
        qid = await self.send(rcpts)
        await until(lambda: all(received(self.sink, r) for r in rcpts), what="all three copies on the wire")

        async def recorded() -> bool:
            shown = await self.queue("show", qid)
            states = {r["address"]: r["status"] for r in shown["recipients_detail"]}
            return states["a1@crash.example"] == states["a2@crash.example"] == "delivered"

        for _ in range(100):
            if await recorded():
                break
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
        # show reads the spool's memory; give the group commit its fsync before pulling the plug.
        await deferLater(reactor, 0.3, lambda: None)  # type: ignore[arg-type]
        self.relay.kill()  # slow-c's DATA is complete, its 250 never came
        self.sink.stall = False  # type: ignore[attr-defined]
        await self.start()
        await until(lambda: len(received(self.sink, "slow-c@crash.example")) >= 2, what="the redelivery")
        await deferLater(reactor, 2.5, lambda: None)  # type: ignore[arg-type]  # retries would have come by now
        self.assertEqual(len(received(self.sink, "a1@crash.example")), 1)
        self.assertEqual(len(received(self.sink, "a2@crash.example")), 1)
        self.assertEqual((await self.queue("list"))["total"], 0)
