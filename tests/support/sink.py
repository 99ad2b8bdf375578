"""
A sink SMTP server for tests, and an in-memory connection with real TLS.

``start_sink(reactor)`` listens on loopback port 0 and records every message
(envelope and exact bytes).  Recipients script the answers by local part:

- ``fail-...``: ``550 5.1.1`` user unknown;
- ``full-...``: ``552 5.2.2`` mailbox full;
- ``defer-...``: ``451 4.7.1`` always; ``defer2-...``: ``451`` the first 2
  times (per address, per sink), then ``250``;
- ``close-...``: ``421 4.3.2`` and the connection is closed;
- ``rejectdata-...``: accepted, but the final DATA reply is ``554 5.7.1``.

Connection-level behaviour is set on the ``Sink``: ``greeting`` (e.g. a
``421`` reply), ``drop_on_connect``, ``silent`` (never greet),
``ehlo_refused`` (``502``: HELO fallback), ``starttls_garbage`` (answer
``220`` and then plaintext: the client's handshake fails),
``starttls_reply`` (e.g. ``454``), ``starttls_inject`` (plaintext sent right
after ``220``), ``auth_mechanisms``, ``data_reply`` (the final DATA reply).

``MemoryPipe`` connects two protocols in memory with a transport whose
``startTLS`` is real TLS (``TLSMemoryBIOProtocol``), unlike ``iosim``'s
pretend TLS, and which pauses a streaming producer when its buffer fills.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

import attrs
import trustme
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IConsumer,
    ISSLTransport,
    ITCPTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from mailrelay.types import Reply

# ---------------------------------------------------------------------------
# TLS material from trustme.
# ---------------------------------------------------------------------------


@attrs.frozen
class TLSFixture:
    """A private CA, server options for ``hostnames`` and a client trust root."""

    ca: Any
    server_options: Any
    trust_root: Any


def make_tls(*hostnames: str) -> TLSFixture:
    ca = trustme.CA()
    cert = ca.issue_cert(*(hostnames or ("mx.example.com",)))
    server = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
    trust = trustRootFromCertificates([Certificate.loadPEM(ca.cert_pem.bytes())])
    return TLSFixture(ca, server, trust)


# ---------------------------------------------------------------------------
# The sink.
# ---------------------------------------------------------------------------


@attrs.define
class ReceivedMessage:
    """One message as the sink saw it: ``raw`` is DATA as on the wire, terminator included."""

    mail_from: str
    rcpt_to: list[str]
    params: list[str]
    data: bytes
    raw: bytes
    helo: str
    esmtp: bool
    tls: bool
    auth: str | None
    connection: int


class Sink:
    """Shared state of the sink's connections: options, scripts and what was received."""

    def __init__(
        self,
        tls: Any = None,
        pipelining: bool = True,
        size: int | None = None,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        auth: dict[str, str] | None = None,
        hostname: str = "sink.test",
    ) -> None:
        self.tls = tls
        self.pipelining = pipelining
        self.size = size
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.auth = auth
        self.hostname = hostname
        self.greeting = Reply(220, "", f"{hostname} ESMTP sink")
        self.drop_on_connect = False
        self.silent = False
        self.ehlo_refused = False
        self.starttls_garbage = False
        self.starttls_reply = Reply(220, "2.0.0", "Ready to start TLS")
        self.starttls_inject = b""
        self.auth_mechanisms = "PLAIN LOGIN"
        self.data_reply: Reply | None = None
        self.messages: list[ReceivedMessage] = []
        self.commands: list[str] = []
        self.command_batches: list[list[str]] = []
        self.auth_attempts: list[tuple[str, str, str, bool]] = []
        self.connections = 0
        self.quits = 0
        self._rcpt_seen: dict[str, int] = {}
        self.factory = _SinkFactory(self)
        self.port: int | None = None
        self._listening: Any = None

    def rcpt_reply(self, address: str) -> tuple[Reply, bool]:
        """The scripted reply for ``RCPT TO:<address>`` and whether to close."""
        local = address.rpartition("@")[0].lower()
        if local.startswith("fail-"):
            return Reply(
                550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown in local recipient table"
            ), False
        if local.startswith("full-"):
            return Reply(552, "5.2.2", f"<{address}>: mailbox full"), False
        if local.startswith("close-"):
            return Reply(421, "4.3.2", "Service shutting down, closing transmission channel"), True
        m = re.match(r"defer(\d*)-", local)
        if m:
            seen = self._rcpt_seen.get(address, 0)
            self._rcpt_seen[address] = seen + 1
            if not m.group(1) or seen < int(m.group(1)):
                return Reply(451, "4.7.1", f"<{address}>: Recipient address rejected: try again later"), False
        return Reply(250, "2.1.5", "Ok"), False

    def stop(self) -> Deferred[Any]:
        if self._listening is None:
            return Deferred.fromCoroutine(_nothing())
        listening, self._listening = self._listening, None
        return maybeDeferred(listening.stopListening)


async def _nothing() -> None:
    return None


def start_sink(reactor: Any, tls: Any = None, interface: str = "127.0.0.1", **options: Any) -> Sink:
    """A ``Sink`` listening on ``interface`` port 0; ``sink.port`` says where."""
    sink = Sink(tls=tls, **options)
    sink._listening = reactor.listenTCP(0, sink.factory, interface=interface)
    sink.port = sink._listening.getHost().port
    return sink


class _SinkFactory(Factory):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return SinkProtocol(self.sink)


class SinkProtocol(Protocol):
    """A strict, scriptable ESMTP server: CRLF lines only, replies in command order."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._buffer = b""
        self._mode = "command"
        self._helo = ""
        self._esmtp = False
        self._tls = False
        self._auth: str | None = None
        self._login: list[str] | None = None
        self._mail: str | None = None
        self._params: list[str] = []
        self._rcpts: list[str] = []
        self._raw: list[bytes] = []
        self._data: list[bytes] = []
        self._closing = False
        self.id = 0

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.id = self.sink.connections
        if self.sink.drop_on_connect:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.sink.silent:
            return
        self._reply(self.sink.greeting)
        if self.sink.greeting.code != 220:
            self._close()

    def _reply(self, reply: Reply) -> None:
        if not self._closing:
            self.transport.write(reply.to_bytes())  # type: ignore[union-attr]

    def _close(self) -> None:
        self._closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._mode == "garbage":
            # Answer the client's TLS hello with plaintext: its handshake fails.
            self.transport.write(b"this is not a TLS handshake\r\n")  # type: ignore[union-attr]
            return
        self._buffer += data
        batch: list[str] = []
        while not self._closing:
            if self._mode == "data":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                line, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
                self._data_line(line)
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            text = line.decode("utf-8", "replace")
            batch.append(text)
            self.sink.commands.append(text)
            if self._command(text) == "starttls":
                break
        if batch:
            self.sink.command_batches.append(batch)

    def _ehlo_reply(self) -> Reply:
        lines = [f"{self.sink.hostname} Hello {self._helo}"]
        if self.sink.pipelining:
            lines.append("PIPELINING")
        lines.append(f"SIZE {self.sink.size or 0}")
        if self.sink.eightbitmime:
            lines.append("8BITMIME")
        if self.sink.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if self.sink.tls is not None and not self._tls:
            lines.append("STARTTLS")
        if self.sink.auth is not None:
            lines.append(f"AUTH {self.sink.auth_mechanisms}")
        return Reply(250, "", tuple(lines))

    def _reset(self) -> None:
        self._mail = None
        self._params = []
        self._rcpts = []

    def _command(self, line: str) -> str | None:
        if self._login is not None:
            self._auth_login_step(line)
            return None
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            if self.sink.ehlo_refused:
                self._reply(Reply(502, "5.5.2", "Error: command not recognized"))
                return None
            self._helo, self._esmtp = arg, True
            self._reset()
            self._reply(self._ehlo_reply())
        elif verb == "HELO":
            self._helo, self._esmtp = arg, False
            self._reset()
            self._reply(Reply(250, "", self.sink.hostname))
        elif verb == "STARTTLS":
            if self.sink.tls is None or self._tls:
                self._reply(Reply(502, "5.5.1", "STARTTLS not available"))
                return None
            self._reply(self.sink.starttls_reply)
            if self.sink.starttls_reply.code != 220:
                return None
            if self.sink.starttls_inject:
                # A man in the middle's plaintext after 220 (CVE-2011-0411 style).
                self.transport.write(self.sink.starttls_inject)  # type: ignore[union-attr]
            self._buffer = b""  # never act on plaintext sent after STARTTLS
            if self.sink.starttls_garbage:
                self._mode = "garbage"
                return "starttls"
            self._tls = True
            self._helo, self._esmtp = "", False
            self._reset()
            self.transport.startTLS(self.sink.tls)  # type: ignore[union-attr]
            return "starttls"
        elif verb == "AUTH":
            self._auth_command(arg)
        elif verb == "MAIL":
            m = re.match(r"FROM:<([^>]*)>(.*)", arg, re.I)
            if not self._helo:
                self._reply(Reply(503, "5.5.1", "Error: send HELO/EHLO first"))
            elif m is None:
                self._reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            elif self._mail is not None:
                self._reply(Reply(503, "5.5.1", "Error: nested MAIL command"))
            else:
                self._mail, self._params = m.group(1), m.group(2).split()
                self._reply(Reply(250, "2.1.0", "Ok"))
        elif verb == "RCPT":
            m = re.match(r"TO:<([^>]*)>", arg, re.I)
            if self._mail is None:
                self._reply(Reply(503, "5.5.1", "Error: need MAIL command"))
            elif m is None:
                self._reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            else:
                reply, close = self.sink.rcpt_reply(m.group(1))
                self._reply(reply)
                if reply.is_positive:
                    self._rcpts.append(m.group(1))
                if close:
                    self._close()
        elif verb == "DATA":
            if not self._rcpts:
                self._reply(Reply(554, "5.5.1", "Error: no valid recipients"))
            else:
                self._mode = "data"
                self._raw, self._data = [], []
                self._reply(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        elif verb == "RSET":
            self._reset()
            self._reply(Reply(250, "2.0.0", "Ok"))
        elif verb == "NOOP":
            self._reply(Reply(250, "2.0.0", "Ok"))
        elif verb == "QUIT":
            self.sink.quits += 1
            self._reply(Reply(221, "2.0.0", "Bye"))
            self._close()
        else:
            self._reply(Reply(502, "5.5.2", "Error: command not recognized"))
        return None

    def _data_line(self, line: bytes) -> None:
        self._raw.append(line)
        if line != b".\r\n":
            self._data.append(line[1:] if line.startswith(b".") else line)
            return
        self._mode = "command"
        message = ReceivedMessage(
            mail_from=self._mail or "",
            rcpt_to=list(self._rcpts),
            params=list(self._params),
            data=b"".join(self._data),
            raw=b"".join(self._raw),
            helo=self._helo,
            esmtp=self._esmtp,
            tls=self._tls,
            auth=self._auth,
            connection=self.id,
        )
        self._reset()
        if any(r.lower().startswith("rejectdata-") for r in message.rcpt_to):
            self._reply(Reply(554, "5.7.1", "Message rejected due to content policy"))
            return
        if self.sink.data_reply is not None:
            self._reply(self.sink.data_reply)
            if not self.sink.data_reply.is_positive:
                return
        self.sink.messages.append(message)
        if self.sink.data_reply is None:
            self._reply(Reply(250, "2.0.0", f"Ok: queued as SINK{len(self.sink.messages)}"))

    def _auth_command(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if self.sink.auth is None:
            self._reply(Reply(502, "5.5.1", "AUTH not supported"))
        elif mechanism == "PLAIN" and initial:
            try:
                _, user, password = base64.b64decode(initial).decode().split("\0")
            except ValueError:
                self._reply(Reply(501, "5.5.2", "Cannot decode response"))
                return
            self._check_login(mechanism, user, password)
        elif mechanism == "LOGIN":
            self._login = []
            self._reply(Reply(334, "", "VXNlcm5hbWU6"))
        else:
            self._reply(Reply(504, "5.5.4", "Unrecognized authentication type"))

    def _auth_login_step(self, line: str) -> None:
        assert self._login is not None
        if line == "*":
            self._login = None
            self._reply(Reply(501, "5.7.0", "Authentication aborted"))
            return
        self._login.append(base64.b64decode(line).decode())
        if len(self._login) == 1:
            self._reply(Reply(334, "", "UGFzc3dvcmQ6"))
            return
        user, password = self._login
        self._login = None
        self._check_login("LOGIN", user, password)

    def _check_login(self, mechanism: str, user: str, password: str) -> None:
        assert self.sink.auth is not None
        self.sink.auth_attempts.append((mechanism, user, password, self._tls))
        if self.sink.auth.get(user) == password:
            self._auth = user
            self._reply(Reply(235, "2.7.0", "Authentication successful"))
        else:
            self._reply(Reply(535, "5.7.8", "Error: authentication failed"))


# ---------------------------------------------------------------------------
# In-memory connections with real STARTTLS.
# ---------------------------------------------------------------------------


@implementer(ITransport, IConsumer)
class _Raw:
    """The byte pipe under a TLS layer: what ``TLSMemoryBIOProtocol`` writes ciphertext to."""

    def __init__(self, end: MemoryTransport) -> None:
        self._end = end
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._end._raw_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._end._raw_write(b"".join(data))

    def loseConnection(self) -> None:
        self._end.disconnecting = True

    def abortConnection(self) -> None:
        self._end.disconnecting = True
        self._end.aborted = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._end._raw_register(producer, streaming)

    def unregisterProducer(self) -> None:
        self._end._raw_unregister()

    def getPeer(self) -> Any:
        return self._end.getPeer()

    def getHost(self) -> Any:
        return self._end.getHost()


@implementer(ITCPTransport, ITLSTransport, IConsumer)
class MemoryTransport:
    """One end of a ``MemoryPipe``; ``startTLS`` inserts a real TLS layer."""

    def __init__(self, protocol: Any, is_client: bool, host: IPv4Address, peer: IPv4Address, high_water: int) -> None:
        self.protocol = protocol
        self.is_client = is_client
        self._host = host
        self._peer = peer
        self.high_water = high_water
        self.outgoing: list[bytes] = []
        self.buffered = 0
        self.disconnecting = False
        self.aborted = False
        self.closed = False
        self.tls: TLSMemoryBIOProtocol | None = None
        self.producer: Any = None
        self.streaming = False
        self.paused = False
        self.written = 0
        self.max_buffered = 0

    # raw level
    def _raw_write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.outgoing.append(data)
        self.buffered += len(data)
        self.written += len(data)
        self.max_buffered = max(self.max_buffered, self.buffered)
        if self.producer is not None and self.streaming and not self.paused and self.buffered > self.high_water:
            self.paused = True
            self.producer.pauseProducing()

    def _raw_register(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer, self.streaming, self.paused = producer, streaming, False

    def _raw_unregister(self) -> None:
        self.producer, self.paused = None, False

    def take(self) -> bytes:
        data = b"".join(self.outgoing)
        self.outgoing = []
        self.buffered = 0
        return data

    def drained(self) -> None:
        if self.producer is not None and self.paused and not self.outgoing:
            self.paused = False
            self.producer.resumeProducing()

    # application level
    def write(self, data: bytes) -> None:
        if self.disconnecting or self.closed:
            return
        if self.tls is not None:
            self.tls.write(data)
        else:
            self._raw_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.tls is not None:
            self.tls.registerProducer(producer, streaming)
        else:
            self._raw_register(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.tls is not None:
            self.tls.unregisterProducer()
        else:
            self._raw_unregister()

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        producer, streaming = self.producer, self.streaming
        if producer is not None:
            self._raw_unregister()
        factory = TLSMemoryBIOFactory(contextFactory, self.is_client == normal, Factory(), clock=Clock())
        self.tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.tls.makeConnection(_Raw(self))
        alsoProvides(self, ISSLTransport)
        if producer is not None:
            self.tls.registerProducer(producer, streaming)

    def getPeerCertificate(self) -> Any:
        return self.tls.getPeerCertificate() if self.tls is not None else None

    def loseConnection(self) -> None:
        if self.tls is not None:
            self.tls.loseConnection()
        else:
            self.disconnecting = True

    def abortConnection(self) -> None:
        if self.tls is not None:
            self.tls.abortConnection()
        self.disconnecting = True
        self.aborted = True

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    # pump side
    def deliver(self, data: bytes) -> None:
        if self.closed:
            return
        if self.tls is not None:
            self.tls.dataReceived(data)
        else:
            self.protocol.dataReceived(data)

    def lost(self, reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        if self.tls is not None:
            self.tls.connectionLost(reason)
        else:
            self.protocol.connectionLost(reason)


class MemoryPipe:
    """
    Two protocols joined in memory.  ``flush()`` moves bytes until both sides
    are quiet; ``pump_once()`` moves one batch each way (to watch flow control).
    """

    def __init__(
        self,
        client: Any,
        server: Any,
        client_address: IPv4Address | None = None,
        server_address: IPv4Address | None = None,
        high_water: int = 64 * 1024,
        connect: bool = True,
    ) -> None:
        caddr = client_address or IPv4Address("TCP", "192.0.2.100", 40000)
        saddr = server_address or IPv4Address("TCP", "192.0.2.1", 25)
        self.client = MemoryTransport(client, True, caddr, saddr, high_water)
        self.server = MemoryTransport(server, False, saddr, caddr, high_water)
        if connect:
            server.makeConnection(self.server)
            client.makeConnection(self.client)

    def pump_once(self) -> bool:
        moved = False
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            if src.outgoing and not src.aborted:
                data = src.take()
                dst.deliver(data)
                moved = True
            src.drained()
        for end, other in ((self.client, self.server), (self.server, self.client)):
            if end.disconnecting and not end.closed and (not end.outgoing or end.aborted):
                why = ierror.ConnectionLost() if end.aborted else ierror.ConnectionDone()
                end.lost(Failure(why))
                other.lost(Failure(why))
                moved = True
        return moved

    def flush(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.pump_once():
                return
        raise RuntimeError("MemoryPipe did not settle")


def connect_pending(
    reactor: Any, server_factory: Any, index: int = 0, high_water: int = 64 * 1024
) -> tuple[MemoryPipe, tuple[Any, ...]]:
    """
    Complete the ``index``-th outbound connection recorded by a
    ``MemoryReactor`` against a protocol of ``server_factory``, in memory.
    Returns the pipe and the recorded ``connectTCP`` arguments.
    """
    call = reactor.tcpClients.pop(index)
    host, port, factory = call[0], call[1], call[2]
    saddr = IPv4Address("TCP", host if ":" not in host else "192.0.2.254", port)
    client = factory.buildProtocol(saddr)
    server = server_factory.buildProtocol(IPv4Address("TCP", "192.0.2.100", 40000))
    pipe = MemoryPipe(client, server, server_address=saddr, high_water=high_water)
    return pipe, call


def refuse_pending(reactor: Any, reason: Exception | None = None, index: int = 0) -> tuple[Any, ...]:
    """Fail the ``index``-th recorded outbound connection (refused by default)."""
    call = reactor.tcpClients.pop(index)
    factory = call[2]
    factory.clientConnectionFailed(None, Failure(reason or ierror.ConnectionRefusedError()))
    return call


__all__ = [
    "MemoryPipe",
    "MemoryTransport",
    "ReceivedMessage",
    "Sink",
    "SinkProtocol",
    "TLSFixture",
    "connect_pending",
    "make_tls",
    "refuse_pending",
    "start_sink",
]
