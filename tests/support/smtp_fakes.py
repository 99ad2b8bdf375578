"""
In-memory stand-ins for testing the SMTP server protocol: a scriptable
delegate and receiver, a StringTransport harness, and an iosim transport
whose ``startTLS`` runs real TLS (iosim's own only pretends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

from mailrelay.interfaces import IMessageReceiver, ISMTPDelegate
from mailrelay.smtp.protocol import ServerSettings, SMTPServerFactory, SMTPServerProtocol
from mailrelay.types import Principal, Reply

QUEUED = Reply(250, "2.0.0", "Ok: queued as TEST1")
ALICE = Principal(account_id=1, account_name="alice", credential_kind="password")


def _answer(result: Any, *args: Any) -> Any:
    """A scripted answer: a callable is called, an exception raised, anything else returned."""
    if callable(result) and not isinstance(result, Deferred):
        result = result(*args)
    if isinstance(result, BaseException):
        raise result
    return result


@implementer(IMessageReceiver)
class FakeReceiver:
    """Records (or only counts) the message bytes and how it ended."""

    def __init__(self, keep: bool = True, finish_result: Any = QUEUED) -> None:
        self.keep = keep
        self.chunks: list[bytes] = []
        self.size = 0
        self.writes = 0
        self.finished = False
        self.aborted = 0
        self.finish_result = finish_result

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.size += len(data)
        if self.keep:
            self.chunks.append(data)

    def finish(self) -> Deferred[Reply]:
        self.finished = True
        result = self.finish_result
        if isinstance(result, Deferred):
            return result
        if isinstance(result, BaseException):
            return fail(result)
        return succeed(result)

    def abort(self) -> None:
        self.aborted += 1


@implementer(ISMTPDelegate)
class FakeDelegate:
    """
    Records every call; each ``*_result`` attribute scripts the answer: a
    value or Deferred is returned, an exception raised, a callable called
    with the method's arguments first.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.passwords = {"alice": "secret"}
        self.connect_result: Any = None
        self.auth_result: Any = self._check_password
        self.from_result: Any = None
        self.to_result: Any = None
        self.open_result: Any = self._new_receiver
        self.receivers: list[FakeReceiver] = []
        self.keep_data = True
        self.lost: list[Any] = []

    def _check_password(self, session: Any, mechanism: str, username: str, password: str) -> Principal:
        if self.passwords.get(username) != password:
            raise UnauthorizedLogin()
        return Principal(account_id=1, account_name=username, credential_kind="password")

    def _new_receiver(self, session: Any, envelope: Any) -> FakeReceiver:
        receiver = FakeReceiver(keep=self.keep_data)
        self.receivers.append(receiver)
        return receiver

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def connection_made(self, session: Any) -> Any:
        self.calls.append(("connection_made", session))
        return _answer(self.connect_result, session)

    def connection_lost(self, session: Any) -> None:
        self.calls.append(("connection_lost", session))
        self.lost.append(session)

    def authenticate(self, session: Any, mechanism: str, username: str, password: str) -> Any:
        self.calls.append(("authenticate", session, mechanism, username, password))
        return _answer(self.auth_result, session, mechanism, username, password)

    def validate_from(self, session: Any, address: str, params: Any) -> Any:
        self.calls.append(("validate_from", session, address, params))
        return _answer(self.from_result, session, address, params)

    def validate_to(self, session: Any, envelope: Any, address: str) -> Any:
        self.calls.append(("validate_to", session, envelope, address))
        return _answer(self.to_result, session, envelope, address)

    def open_message(self, session: Any, envelope: Any) -> Any:
        self.calls.append(("open_message", session, envelope))
        return _answer(self.open_result, session, envelope)


class TLSStringTransport(StringTransport):
    """A StringTransport that records ``startTLS`` and where in the output it happened."""

    tls_context: object = None
    tls_started_at: int | None = None

    def startTLS(self, context: object) -> None:
        self.tls_context = context
        self.tls_started_at = len(self.value())


class Harness:
    """One server protocol on a StringTransport, with its clock and delegate."""

    def __init__(
        self,
        settings: ServerSettings | None = None,
        delegate: FakeDelegate | None = None,
        tls_context: object = None,
        peer: Any = None,
        connect: bool = True,
    ) -> None:
        self.clock = Clock()
        self.delegate = delegate or FakeDelegate()
        self.settings = settings or ServerSettings(hostname="mx.example.com")
        self.factory = SMTPServerFactory(self.settings, lambda: self.delegate, self.clock, tls_context)
        self.transport = TLSStringTransport(peerAddress=peer or IPv4Address("TCP", "192.0.2.7", 40000))
        self.protocol: SMTPServerProtocol = self.factory.buildProtocol(None)
        self._seen = 0
        if connect:
            self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lines(self) -> list[str]:
        """Reply lines written since the last call."""
        value = self.transport.value()
        new, self._seen = value[self._seen :], len(value)
        return [line.decode("utf-8") for line in new.split(b"\r\n") if line]

    def codes(self) -> list[int]:
        """The code of each complete reply written since the last call."""
        return [int(line[:3]) for line in self.lines() if line[3:4] != "-"]

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def ehlo(self, name: bytes = b"client.example.org") -> list[str]:
        self.send(b"EHLO " + name + b"\r\n")
        return self.lines()


def login_session(harness: Harness) -> None:
    """Greeting, EHLO and a successful AUTH on a harness that allows it."""
    harness.lines()
    harness.ehlo()
    harness.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")  # \0alice\0secret
    assert harness.codes() == [235]


# --- real TLS over iosim ------------------------------------------------------------


class _Bypass:
    """What the TLS layer writes to: the fake transport below TLS."""

    def __init__(self, transport: TLSFakeTransport) -> None:
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._transport, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._transport)


class TLSFakeTransport(iosim.FakeTransport):
    """An iosim transport whose ``startTLS`` layers real TLS, as Twisted's TCP does."""

    _tls: Any = None
    #: The clock the TLS layer batches its writes on (the pump's clock).
    clock: Any = None

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        factory = TLSMemoryBIOFactory(contextFactory, not self.isServer, None, clock=self.clock)
        tls = factory.protocol(factory, self.protocol, False)
        self.protocol = tls
        self._tls = tls
        self.getHandle = tls.getHandle
        directlyProvides(self, ISSLTransport)
        tls.makeConnection(_Bypass(self))

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            super().loseConnection()


class LineClient(Protocol):
    """A minimal SMTP client for iosim tests: sends lines, collects reply lines."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")  # type: ignore[union-attr]

    def take(self) -> list[str]:
        """Reply lines received since the last call."""
        data, self.received = self.received, b""
        return [line.decode("utf-8") for line in data.split(b"\r\n") if line]


def connect_pair(
    server: Any, client: Any, clock: Any, transport_class: Callable[..., Any] = TLSFakeTransport
) -> iosim.IOPump:
    """
    Connect ``server`` and ``client`` over iosim with real addresses; pumping
    advances ``clock`` (which TLS layers must use to flush their writes).
    """
    server_transport = transport_class(
        server,
        isServer=True,
        hostAddress=IPv4Address("TCP", "192.0.2.1", 587),
        peerAddress=IPv4Address("TCP", "198.51.100.9", 50000),
    )
    client_transport = transport_class(
        client,
        isServer=False,
        hostAddress=IPv4Address("TCP", "198.51.100.9", 50000),
        peerAddress=IPv4Address("TCP", "192.0.2.1", 587),
    )
    server_transport.clock = client_transport.clock = clock
    return iosim.connect(server, server_transport, client, client_transport, greet=True, clock=clock)
