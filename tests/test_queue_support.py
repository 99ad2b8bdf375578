"""
Fakes for the queue's unit tests (spool, resolver, delivery client,
directory, event sink), and the tests that hold them to the real shapes:
the fake spool against ``mailrelay.spool.Spool`` (one delivery through the
real spool, with real files and threads), the others with
``verifyObject`` and signature checks.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.delivery.client import DeliveryClient
from mailrelay.delivery.model import (
    DeliveryResult,
    DeliveryStatus,
    Destination,
    DestinationError,
    MXHost,
    OutboundMessage,
)
from mailrelay.delivery.mx import MXResolver
from mailrelay.events.model import Event
from mailrelay.interfaces import IEventSink, ISpoolWriter
from mailrelay.processing.dkim import generate_rsa_key
from mailrelay.queue.manager import QueueManager, QueueSettings
from mailrelay.queue.render import AccountInfo, DomainInfo, Renderer, RenderSettings, StoreDirectory
from mailrelay.spool import RecipientState, Spool, SpooledMessage, UnknownMessage
from mailrelay.spool.ids import QueueIds
from mailrelay.types import Reply

SECRET = b"s" * 32
DELIVERED, DEFERRED, FAILED = DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED, DeliveryStatus.FAILED
OK = Reply(250, "2.0.0", "Ok: queued as X")
_KEY: list[bytes] = []


def rsa_key() -> bytes:
    """One 2048-bit key for the whole run (generating one costs ~100 ms)."""
    if not _KEY:
        _KEY.append(generate_rsa_key())
    return _KEY[0]


def message_bytes(
    sender: str = "hello@example.com",
    to: str = "a@example.net",
    subject: str = "Order 1",
    extra: str = "",
    body: str = "Thank you.\r\n",
) -> bytes:
    return (
        f"Received: from client by relay.test; Mon, 1 Jan 2024 00:00:00 GMT\r\nFrom: {sender}\r\nTo: {to}\r\n"
        f"Subject: {subject}\r\n{extra}\r\n{body}"
    ).encode()


def envelope(
    account_id: int | None = 7,
    route: str = "deliver",
    mail_from: str = "hello@example.com",
    controls: dict[str, Any] | None = None,
    roles: dict[str, str] | None = None,
    **more: Any,
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "v": 1,
        "route": route,
        "account_id": account_id,
        "account": "shop" if account_id else None,
        "mail_from": mail_from,
        "from": "hello@example.com",
        "subject": "Order 1",
        "message_id": None,
        "received_at": 1_700_000_000.0,
        "roles": roles or {},
        "controls": {"tags": ["t1"], **(controls or {})},
    }
    env.update(more)
    return env


# ---------------------------------------------------------------------------
# Spool
# ---------------------------------------------------------------------------


@attrs.define
class _Stored:
    envelope: Mapping[str, Any]
    recipients: tuple[str, ...]
    states: tuple[RecipientState, ...]
    body: bytes
    created: float
    held: bool = False


@implementer(ISpoolWriter)
class FakeWriter:
    def __init__(
        self, spool: FakeSpool, queue_id: str, envelope: Mapping[str, Any], recipients: tuple[str, ...]
    ) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.envelope = envelope
        self.recipients = recipients
        self.size = 0
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self.size += len(data)

    def commit(self) -> Deferred[str]:
        if self.spool.fail_commit:
            return fail(OSError("disk full"))
        self.spool.put(self.queue_id, self.envelope, self.recipients, b"".join(self._parts))
        return succeed(self.queue_id)

    def abort(self) -> None:
        self._parts = []


class FakeBody:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.closed = False

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(self.data[offset : offset + length])

    def close(self) -> None:
        self.closed = True


class FakeSpool:
    """
    The spool's queue-facing API in memory, with its rules: a final state
    never changes (``ValueError``), a message whose recipients are all final
    is finished and gone, unknown ids fail with ``UnknownMessage``.
    ``log`` lists every ``record`` call; ``on_record`` runs before it returns.
    """

    spill_threshold = 256 * 1024

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.stored: dict[str, _Stored] = {}
        self.log: list[tuple[str, dict[str, RecipientState]]] = []
        self.finished: list[str] = []
        self.fail_commit = False
        self.fail_record: Exception | None = None
        self.record_waits: list[Deferred[None]] | None = None  # when a list: record() waits for the test
        self.reads = 0
        self._ids = QueueIds(lambda n: bytes(itertools.islice(itertools.cycle(b"\x01\x02\x03"), n)))

    def put(
        self,
        queue_id: str,
        env: Mapping[str, Any],
        recipients: Sequence[str],
        body: bytes,
        states: Sequence[RecipientState] | None = None,
        created: float | None = None,
    ) -> str:
        rcpts = tuple(recipients)
        self.stored[queue_id] = _Stored(
            env,
            rcpts,
            tuple(states) if states else (RecipientState(),) * len(rcpts),
            body,
            self.clock.seconds() if created is None else created,
        )
        return queue_id

    def add(self, env: Mapping[str, Any], recipients: Sequence[str], body: bytes | None = None, **kw: Any) -> str:
        qid = self._ids(self.clock.seconds())
        return self.put(qid, env, recipients, body if body is not None else message_bytes(), **kw)

    def get(self, queue_id: str) -> SpooledMessage | None:
        s = self.stored.get(queue_id)
        if s is None:
            return None
        return SpooledMessage(queue_id, s.envelope, s.recipients, s.states, len(s.body), s.created, s.held)

    def messages(self) -> list[SpooledMessage]:
        return [m for m in (self.get(q) for q in sorted(self.stored)) if m is not None]

    def record(self, queue_id: str, outcomes: Mapping[str, RecipientState]) -> Deferred[None]:
        if self.fail_record is not None:
            return fail(self.fail_record)
        s = self.stored.get(queue_id)
        if s is None:
            return fail(UnknownMessage(queue_id))
        states = list(s.states)
        for rcpt, state in outcomes.items():
            i = s.recipients.index(rcpt)
            if states[i].is_final and states[i] != state:
                return fail(ValueError(f"{rcpt} is already final"))
            states[i] = state
        s.states = tuple(states)
        self.log.append((queue_id, dict(outcomes)))
        if all(x.is_final for x in states):
            del self.stored[queue_id]
            self.finished.append(queue_id)
        if self.record_waits is not None:
            d: Deferred[None] = Deferred()
            self.record_waits.append(d)
            return d
        return succeed(None)

    def hold(self, queue_id: str) -> Deferred[None]:
        if queue_id not in self.stored:
            return fail(UnknownMessage(queue_id))
        self.stored[queue_id].held = True
        return succeed(None)

    def release(self, queue_id: str) -> Deferred[None]:
        if queue_id not in self.stored:
            return fail(UnknownMessage(queue_id))
        self.stored[queue_id].held = False
        return succeed(None)

    def delete(self, queue_id: str) -> Deferred[None]:
        if self.stored.pop(queue_id, None) is None:
            return fail(UnknownMessage(queue_id))
        return succeed(None)

    def read_message(self, queue_id: str) -> Deferred[bytes]:
        self.reads += 1
        s = self.stored.get(queue_id)
        return succeed(s.body) if s is not None else fail(UnknownMessage(queue_id))

    def open_body(self, queue_id: str) -> FakeBody:
        self.reads += 1
        return FakeBody(self.stored[queue_id].body)

    def open_message(self, envelope: Mapping[str, Any], recipients: Sequence[str]) -> FakeWriter:
        return FakeWriter(self, self._ids(self.clock.seconds()), envelope, tuple(recipients))

    def disk_free_fraction(self) -> float:
        return 0.5

    def state(self, queue_id: str, rcpt: str) -> RecipientState | None:
        m = self.get(queue_id)
        return m.state_of(rcpt) if m is not None else None


# ---------------------------------------------------------------------------
# Resolver, client, directory, events
# ---------------------------------------------------------------------------


class FakeResolver:
    """Every domain resolves to one host, unless ``errors`` says otherwise."""

    def __init__(self) -> None:
        self.errors: dict[str, DestinationError] = {}
        self.calls: list[str] = []

    def resolve(self, domain: str) -> Deferred[Destination]:
        self.calls.append(domain)
        if domain in self.errors:
            return fail(self.errors[domain])
        return succeed(Destination(domain, (MXHost(f"mx.{domain}", 10, ("192.0.2.1",)),)))


Script = Callable[[str], tuple[DeliveryStatus, Reply]]


def by_local_part(rcpt: str) -> tuple[DeliveryStatus, Reply]:
    """The sink's scripting, in memory: fail-, block-, defer-, refused-... by local part."""
    local = rcpt.split("@")[0]
    if local.startswith("fail-"):
        return FAILED, Reply(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: User unknown")
    if local.startswith("block-"):
        return FAILED, Reply(554, "5.7.1", "Service unavailable; client host blocked using zen.spamhaus.org")
    if local.startswith("defer-"):
        return DEFERRED, Reply(451, "4.7.1", f"<{rcpt}>: try again later")
    if local.startswith("refused-"):
        return DEFERRED, Reply(451, "4.4.1", "Connection refused by mx[192.0.2.1]")
    return DELIVERED, OK


@attrs.define
class Sent:
    destination: Destination
    message: OutboundMessage
    data: bytes
    result: Deferred[list[DeliveryResult]]


class FakeClient:
    """
    Records every ``deliver`` call.  With ``hold = True`` the results wait
    until the test calls ``finish``; otherwise ``script`` answers at once.
    """

    def __init__(self, script: Script = by_local_part) -> None:
        self.script = script
        self.sent: list[Sent] = []
        self.hold = False
        self.closed = False

    def deliver(self, destination: Destination, message: OutboundMessage) -> Deferred[list[DeliveryResult]]:
        data = b"".join(message.body())  # type: ignore[arg-type]
        d: Deferred[list[DeliveryResult]] = Deferred()
        self.sent.append(Sent(destination, message, data, d))
        if not self.hold:
            d.callback(self.results(destination, message))
        return d

    def results(
        self, destination: Destination, message: OutboundMessage, script: Script | None = None
    ) -> list[DeliveryResult]:
        out = []
        for rcpt in message.recipients:
            status, reply = (script or self.script)(rcpt)
            out.append(DeliveryResult(rcpt, status, reply, mx_host=destination.hosts[0].name, ip="192.0.2.1"))
        return out

    @property
    def waiting(self) -> list[Sent]:
        return [s for s in self.sent if not s.result.called]

    def finish(self, sent: Sent, script: Script | None = None) -> None:
        sent.result.callback(self.results(sent.destination, sent.message, script))

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def recipients(self) -> list[str]:
        return [r for s in self.sent for r in s.message.recipients]


class FakeDirectory:
    def __init__(self) -> None:
        self.accounts: dict[int, AccountInfo] = {7: AccountInfo(7)}
        self.domains: dict[str, DomainInfo] = {}
        self.suppressions: dict[tuple[int, str], str] = {}
        self.suppressed_calls: list[tuple[int, tuple[str, ...], str | None]] = []
        self.added: list[tuple[int, str, str, str | None, float | None]] = []
        self.down = False

    async def account(self, account_id: int) -> AccountInfo | None:
        return self.accounts.get(account_id)

    async def sending_domain(self, domain: str) -> DomainInfo | None:
        return self.domains.get(domain)

    async def suppressed(self, account_id: int, addresses: Iterable[str], list_guid: str | None) -> dict[str, str]:
        addresses = tuple(addresses)
        self.suppressed_calls.append((account_id, addresses, list_guid))
        if self.down:
            raise ConnectionError("database is down")
        return {a: self.suppressions[(account_id, a)] for a in addresses if (account_id, a) in self.suppressions}

    async def suppress(
        self, account_id: int, address: str, reason: str, detail: str | None, expires_at: float | None
    ) -> None:
        self.added.append((account_id, address, reason, detail, expires_at))
        self.suppressions[(account_id, address)] = reason


@implementer(IEventSink)
class FakeEvents:
    """Keeps events; ``check`` runs on each as it is emitted (to see what was recorded by then)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.check: Callable[[Event], None] | None = None

    def emit(self, event: Event) -> None:
        if self.check is not None:
            self.check(event)
        self.events.append(event)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type.value == kind]


class Harness:
    """A manager on a ``Clock`` with every fake; ``settle()`` runs the reactor turns that are due now."""

    def __init__(self, feedback: Any = None, rng_value: float = 0.5, **settings: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = FakeSpool(self.clock)
        self.resolver = FakeResolver()
        self.client = FakeClient()
        self.directory = FakeDirectory()
        self.events = FakeEvents()
        self.feedback_calls: list[tuple[str, Mapping[str, Any], bytes]] = []
        defaults: dict[str, Any] = {
            "hostname": "relay.test",
            "bounce_domain": "bounces.relay.test",
            "retry_min": 60.0,
            "retry_max": 600.0,
            "max_age": 3600.0,
        }
        defaults.update(settings)
        self.settings = QueueSettings(**defaults)
        self.renderer = Renderer(
            self.directory, SECRET, RenderSettings("relay.test", "bounces.relay.test", "https://t.relay.test")
        )

        class _Rng:
            def random(self) -> float:
                return rng_value

        self.manager = QueueManager(
            clock=self.clock,
            spool=self.spool,
            resolver=self.resolver,
            client=self.client,
            renderer=self.renderer,
            directory=self.directory,
            events=self.events,
            settings=self.settings,
            feedback=feedback if feedback is not None else self._feedback,
            rng=_Rng(),  # type: ignore[arg-type]
        )

    def _feedback(self, queue_id: str, env: Mapping[str, Any], data: bytes) -> None:
        self.feedback_calls.append((queue_id, env, data))

    def settle(self, turns: int = 50) -> None:
        for _ in range(turns):
            if not [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]:
                return
            self.clock.advance(0)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def start(self) -> None:
        self.manager.start()
        self.settle()

    def submit(self, recipients: Sequence[str], env: dict[str, Any] | None = None, body: bytes | None = None) -> str:
        qid = self.spool.add(env if env is not None else envelope(), recipients, body)
        self.manager.add(qid)
        self.settle()
        return qid


# ---------------------------------------------------------------------------
# The fakes against the real things
# ---------------------------------------------------------------------------


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


class FakeShapeTests(SynchronousTestCase):
    def test_spool_methods(self) -> None:
        """The fake spool has the real spool's methods the queue uses, with the same parameters."""
        real = _public(Spool)
        for name in (
            "get",
            "messages",
            "record",
            "hold",
            "release",
            "delete",
            "read_message",
            "open_body",
            "open_message",
            "disk_free_fraction",
        ):
            fake = inspect.signature(getattr(FakeSpool, name))
            self.assertEqual(list(fake.parameters), list(real[name].parameters), name)

    def test_resolver_and_client(self) -> None:
        """The resolver and client fakes take what MXResolver.resolve and DeliveryClient.deliver take."""
        self.assertEqual(
            list(inspect.signature(FakeResolver.resolve).parameters),
            list(inspect.signature(MXResolver.resolve).parameters),
        )
        self.assertEqual(
            list(inspect.signature(FakeClient.deliver).parameters),
            list(inspect.signature(DeliveryClient.deliver).parameters),
        )

    def test_directory(self) -> None:
        """The directory fake has StoreDirectory's methods and parameters."""
        for name in ("account", "sending_domain", "suppressed", "suppress"):
            self.assertEqual(
                list(inspect.signature(getattr(FakeDirectory, name)).parameters),
                list(inspect.signature(getattr(StoreDirectory, name)).parameters),
                name,
            )

    def test_events_and_writer(self) -> None:
        """The event sink fake provides IEventSink; the spool writer fake ISpoolWriter."""
        self.assertTrue(verifyObject(IEventSink, FakeEvents()))
        spool = FakeSpool(Clock())
        self.assertTrue(verifyObject(ISpoolWriter, spool.open_message({}, ["a@example.net"])))


class RealSpoolTests(TestCase):
    """One pass through the real spool: the fake's rules are the real ones."""

    def setUp(self) -> None:
        self.pool = ThreadPool(2, 2, name="test-queue-spool")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    async def _spool(self) -> Spool:
        spool = Spool(self.mktemp(), _reactor, self.pool, _reactor, compact_interval=0)  # type: ignore[arg-type]
        await spool.recover()
        return spool

    async def test_finished_message_leaves_the_real_spool(self) -> None:
        """A message delivered to one recipient and bounced for another is gone from the real spool, with a DSN."""
        spool = await self._spool()
        self.addCleanup(spool.close)
        writer = spool.open_message(envelope(), ["a@example.net", "fail-b@example.net"])
        writer.write(message_bytes())
        qid = await writer.commit()
        h = Harness()
        manager = QueueManager(
            clock=_reactor,
            spool=spool,
            resolver=h.resolver,
            client=h.client,  # type: ignore[arg-type]
            renderer=h.renderer,
            directory=h.directory,
            events=h.events,
            settings=h.settings,
        )
        await manager.start()
        for _ in range(500):
            if any(s.message.mail_from == "" for s in h.client.sent):
                break
            await deferLater(_reactor, 0.01, lambda: None)
        await manager.stop()
        self.assertIsNone(spool.get(qid))
        self.assertEqual(
            [e.type.value for e in h.events.events],
            ["delivered", "bounced"] if h.events.events[0].type.value == "delivered" else ["bounced", "delivered"],
        )
        notice = [s for s in h.client.sent if s.message.mail_from == ""]
        self.assertEqual(notice[0].message.recipients, ("hello@example.com",))
        self.assertIn(b"report-type=delivery-status", notice[0].data)
