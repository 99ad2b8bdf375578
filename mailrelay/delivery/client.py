"""
mailrelay's outbound ESMTP client.

Written for this project instead of ``twisted.mail.smtp.SMTPClient``, whose
bugs are regression tests here: it turned CRLF into ``\\r\\r\\n``, lost
leading dots and ended DATA early at its 16 KiB chunk boundaries, never
pipelined, carried one message per connection and sent AUTH in plaintext.

Three layers:

- ``DotStuffer`` and ``ReplyParser``: pure byte transformations;
- ``SMTPClientProtocol``: one connection (greeting, EHLO, STARTTLS, AUTH,
  transactions, QUIT), every wait bounded by the RFC 5321 §4.5.3.2 timeouts
  on the injected clock;
- ``DeliveryClient.deliver``: tries the hosts of a ``Destination`` in order
  and reuses idle connections through a ``ConnectionPool``.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.delivery.model import (
    Credentials,
    DeliveryResult,
    DeliveryStatus,
    Destination,
    MXHost,
    OutboundMessage,
    Timeouts,
    TLSPolicy,
)
from mailrelay.eagertcp import EagerTCPClientEndpoint, eager_hostname_endpoint
from mailrelay.tlslayer import write_through
from mailrelay.types import Reply

log = Logger()

# ---------------------------------------------------------------------------
# Pure parts: the body encoder and the reply parser.
# ---------------------------------------------------------------------------


class DotStuffer:
    """
    Turns message bytes, in any chunking, into DATA content (RFC 5321
    §4.5.2): every line ends in CRLF (a lone LF or a lone CR becomes CRLF,
    an existing CRLF stays as it is), every line that starts with ``.`` gets
    another, and ``finish`` ends the data with ``.`` on a line of its own.

    The state kept between chunks (a CR that may be half of a CRLF, whether
    the output is at the start of a line) is what makes the result
    independent of where the chunks split.  Bare CR is illegal in SMTP and
    ``<CR>.<CR><LF>`` is one of the SMTP smuggling sequences, so a lone CR is
    a line break here.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            # Might be the first half of CRLF: decide with the next chunk.
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        # Every line break is CRLF (the usual case: no copies) when there are
        # as many lines as CRLFs, plus one for unterminated text at the end
        # (``splitlines`` breaks at CR, LF and CRLF).  One pass of it costs less
        # than the two single-octet counts (CR, LF) it replaces.
        lines = len(chunk.splitlines())
        if lines == chunk.count(b"\r\n") + (not chunk.endswith((b"\n", b"\r"))):
            data = chunk
        else:
            data = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if b"\n." in data:
            data = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(b"\r\n")
        return data

    def finish(self) -> bytes:
        if self._held_cr or not self._line_start:
            tail = b"\r\n.\r\n"
        else:
            tail = b".\r\n"
        self._held_cr = False
        self._line_start = True
        return tail


def encode_body(chunks: Iterable[bytes]) -> bytes:
    """All of ``chunks`` as DATA content, terminator included (for tests and small bodies)."""
    stuffer = DotStuffer()
    return b"".join([*(stuffer.feed(c) for c in chunks), stuffer.finish()])


class SMTPProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


_LINE = re.compile(rb"(\d{3})(?:([ -])(.*))?\Z", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")


def _split_status(code: int, text: str) -> tuple[str, str]:
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(code)[0]:
        return m.group(0).strip(), text[m.end() :]
    return "", text


class ReplyParser:
    """
    Splits received bytes into ``Reply`` values, multi-line replies joined,
    with the enhanced status code taken off the text.  Line and reply size
    are bounded so a hostile server cannot make the client buffer without
    end.
    """

    def __init__(self, max_line: int = 8192, max_lines: int = 200) -> None:
        self._buffer = b""
        self._lines: list[tuple[int, str]] = []
        self._max_line = max_line
        self._max_lines = max_lines

    def clear(self) -> None:
        self._buffer = b""
        self._lines = []

    def feed(self, data: bytes) -> list[Reply]:
        """Every complete reply in what has arrived so far."""
        self._buffer += data
        replies = []
        while (reply := self.next_reply()) is not None:
            replies.append(reply)
        return replies

    def receive(self, data: bytes) -> None:
        """Buffer ``data``; take replies one by one with ``next_reply``."""
        self._buffer += data

    def next_reply(self) -> Reply | None:
        """
        The next complete reply, or None.  One at a time, so a caller can
        stop (STARTTLS) and ``clear`` what follows before it is parsed.
        """
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    raise SMTPProtocolError("reply line too long")
                return None
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max_line:
                raise SMTPProtocolError("reply line too long")
            m = _LINE.match(raw)
            if m is None:
                raise SMTPProtocolError(f"malformed reply line {raw[:80]!r}")
            code = int(m.group(1))
            if self._lines and self._lines[0][0] != code:
                raise SMTPProtocolError("reply code changed within a multi-line reply")
            self._lines.append((code, (m.group(3) or b"").decode("utf-8", "replace")))
            if len(self._lines) > self._max_lines:
                raise SMTPProtocolError("too many reply lines")
            if m.group(2) != b"-":
                return self._complete()

    def _complete(self) -> Reply:
        code = self._lines[0][0]
        status, first = _split_status(code, self._lines[0][1])
        texts = [first]
        for _, line in self._lines[1:]:
            if status and line.startswith(status):
                line = line[len(status) :].lstrip()
            texts.append(line)
        self._lines = []
        return Reply(code, status, texts[0] if len(texts) == 1 else tuple(texts))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):  # pre-RFC 4954 servers
            keyword, params = "AUTH", f"{keyword[5:]} {params}"
        if keyword == "AUTH":
            params = f"{extensions.get('AUTH', '')} {params}"
        if keyword:
            extensions[keyword] = params.strip()
    return extensions


# ---------------------------------------------------------------------------
# Configuration and errors.
# ---------------------------------------------------------------------------


@attrs.frozen
class ClientConfig:
    """
    How mailrelay talks to other servers.  ``tls`` is the policy for MX
    delivery; a ``Destination`` may carry its own (smarthosts).
    ``attempt_budget`` bounds the time one ``deliver`` call spends starting
    connections to further hosts.
    """

    helo_hostname: str
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    tls: TLSPolicy = attrs.field(factory=TLSPolicy)
    allow_plaintext_auth: bool = False
    source_ipv4: str | None = None
    source_ipv6: str | None = None
    attempt_budget: float = 900.0
    max_connection_attempts: int = 5
    max_messages_per_connection: int = 100
    max_idle_per_host: int = 4
    chunk_size: int = 64 * 1024


class ConnectionLevelError(Exception):
    """
    The connection failed, not a recipient: everyone still pending is
    deferred with ``reply``, and ``retry_next`` says another host may be
    tried now.
    """

    def __init__(self, reply: Reply, retry_next: bool = True) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.retry_next = retry_next


class _WaitTimeout(Exception):
    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class _Lost(Exception):
    def __init__(self, stage: str, reason: Failure | None) -> None:
        super().__init__(stage)
        self.stage = stage
        self.reason = reason


class _BodyError(Exception):
    """The message body could not be read (spool trouble): not the server's fault."""


class _StaleConnection(Exception):
    """A pooled connection died before answering: open a fresh one."""


_TLS_CONTEXT: CertificateOptions | None = None


@implementer(IOpenSSLClientConnectionCreator)
class _OpportunisticTLS:
    """
    TLS that encrypts without checking the certificate, with SNI.  Most MX
    certificates do not match the MX name; refusing them would only move the
    message to plaintext elsewhere (RFC 7435).
    """

    def __init__(self, hostname: str) -> None:
        global _TLS_CONTEXT
        if _TLS_CONTEXT is None:
            _TLS_CONTEXT = CertificateOptions(verify=False)
        self._options = _TLS_CONTEXT
        self._sni: bytes | None = None
        name = hostname.rstrip(".")
        if name and not (isIPAddress(name) or isIPv6Address(name)):
            try:
                self._sni = name.encode("idna")
            except UnicodeError:
                pass

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def tls_creator(policy: TLSPolicy, hostname: str) -> IOpenSSLClientConnectionCreator:
    """The client TLS settings for ``policy`` towards ``hostname``."""
    if policy.level == "verify":
        return optionsForClientTLS(
            policy.verify_hostname or hostname,
            trustRoot=policy.trust_root,  # type: ignore[arg-type]
        )
    return _OpportunisticTLS(hostname)


_UNSAFE_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


def _valid_address(address: str) -> bool:
    """No byte that could end or split an SMTP command (command injection)."""
    return _UNSAFE_IN_ADDRESS.search(address) is None


def _status_of(reply: Reply) -> DeliveryStatus:
    if reply.is_positive:
        return DeliveryStatus.DELIVERED
    if reply.is_transient:
        return DeliveryStatus.DEFERRED
    return DeliveryStatus.FAILED


@implementer(IPushProducer)
class _Flow:
    """Follows the transport's pause/resume so the body is written as fast as it drains."""

    def __init__(self) -> None:
        self.paused = False
        self._waiter: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._fire()

    def stopProducing(self) -> None:
        self.paused = False
        self._fire()

    def _fire(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        self._waiter = Deferred()
        return self._waiter


async def _chunks(source: Iterable[bytes] | AsyncIterable[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """Chunks of at most ``size`` bytes from a sync or async source."""
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            for i in range(0, len(chunk), size):
                yield chunk[i : i + size]
    else:
        for chunk in source:
            for i in range(0, len(chunk), size):
                yield chunk[i : i + size]


@attrs.frozen
class TransactionOutcome:
    """
    Results of one transaction.  ``retry_next``: the deferred results are
    connection-level and another host may be tried for them.
    """

    results: tuple[DeliveryResult, ...]
    retry_next: bool = False
    reusable: bool = False


# ---------------------------------------------------------------------------
# The protocol: one connection.
# ---------------------------------------------------------------------------


class SMTPClientProtocol(Protocol):
    """
    One outbound SMTP connection.  ``handshake`` runs greeting, EHLO,
    STARTTLS and AUTH; ``send`` runs one transaction and may be called again
    for the next message; ``quit`` ends politely.

    Replies are queued as they arrive and taken in order, which is what
    makes pipelining simple: write a group of commands, then take one reply
    per command.  Every wait has a timeout on the injected clock; on timeout
    the connection is aborted.
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: ClientConfig,
        host: MXHost,
        ip: str | None,
        tls_policy: TLSPolicy,
        credentials: Credentials | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.host = host
        self.ip = ip
        self.tls_policy = tls_policy
        self.credentials = credentials
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls_active = False
        self.transactions = 0
        self.alive = False
        self.lost: Failure | None = None
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._waiter: Deferred[Reply] | None = None
        self._timer: Any = None
        self._stage = ""
        self._epoch = 0
        self._protocol_error: SMTPProtocolError | None = None
        self._needs_rset = False
        self._lost_callbacks: list[Callable[[SMTPClientProtocol], None]] = []
        self._flow: _Flow | None = None

    # -- identity ----------------------------------------------------------

    @property
    def peer(self) -> str:
        """``name[ip]`` as Postfix writes it in logs and bounces."""
        return f"{self.host.name}[{self.ip}]" if self.ip else self.host.name

    def on_lost(self, callback: Callable[[SMTPClientProtocol], None]) -> None:
        self._lost_callbacks.append(callback)

    # -- transport events ---------------------------------------------------

    def connectionMade(self) -> None:
        self.alive = True
        if self.ip is None:
            peer = self.transport.getPeer()  # type: ignore[union-attr]
            self.ip = getattr(peer, "host", None)

    def dataReceived(self, data: bytes) -> None:
        self._parser.receive(data)
        epoch = self._epoch
        # One reply at a time: handing one out may discard the rest (STARTTLS).
        while epoch == self._epoch:
            try:
                reply = self._parser.next_reply()
            except SMTPProtocolError as e:
                self._protocol_error = e
                self._parser.clear()
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            if reply is None:
                return
            waiter = self._waiter
            if waiter is not None:
                # The read timer stays armed (see ``_read``): it ignores a firing with nothing awaited.
                self._waiter = None
                waiter.callback(reply)
            else:
                self._replies.append(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.alive = False
        self.lost = reason
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(_Lost(self._stage, reason))
        if self._flow is not None:
            self._flow.stopProducing()
        for callback in self._lost_callbacks:
            callback(self)

    # -- primitives ---------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _write(self, *lines: bytes) -> None:
        self.transport.write(b"".join(line + b"\r\n" for line in lines))  # type: ignore[union-attr]

    def _read(self, stage: str, timeout: float) -> Deferred[Reply]:
        self._stage = stage
        if self._replies:
            return succeed(self._replies.popleft())
        if not self.alive:
            return fail(_Lost(stage, self.lost))
        d: Deferred[Reply] = Deferred()
        self._waiter = d
        # One timer per connection, moved on with each read: moving a timer
        # later is cheap (the reactor re-sorts it only when its old time
        # comes), while a new timer per reply costs a heap insertion and a
        # cancellation, four times per message on a busy connection.
        timer = self._timer
        if timer is not None and timer.active() and timer.getTime() <= self.clock.seconds() + timeout:
            timer.reset(timeout)
        else:
            self._cancel_timer()
            self._timer = self.clock.callLater(timeout, self._timed_out)
        return d

    def _timed_out(self) -> None:
        self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is None:
            return  # the reply came in time; the connection is idle, which is the pool's business
        waiter.errback(_WaitTimeout(self._stage))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _discard_input(self) -> None:
        """Forget everything received so far (STARTTLS: plaintext injected after 220)."""
        self._parser.clear()
        self._replies.clear()
        self._epoch += 1

    def _failure_reply(self, exc: BaseException) -> Reply:
        """A synthetic reply for a connection problem, naming the host like Postfix does."""
        if isinstance(exc, ConnectionLevelError):
            return exc.reply
        if isinstance(exc, _WaitTimeout):
            return Reply(451, "4.4.2", f"Timeout while waiting for {exc.stage} reply from {self.peer}")
        if self._protocol_error is not None:
            return Reply(451, "4.5.0", f"Protocol error from {self.peer}: {self._protocol_error}")
        if isinstance(exc, _Lost):
            return Reply(451, "4.4.2", f"Lost connection with {self.peer} while waiting for {exc.stage} reply")
        return Reply(451, "4.3.0", f"Error talking to {self.peer}: {exc}")

    # -- connection setup ---------------------------------------------------

    def handshake(self) -> Deferred[None]:
        """
        Greeting, EHLO, STARTTLS and AUTH; fails with ``ConnectionLevelError``
        (the connection is then closed).
        """
        return Deferred.fromCoroutine(self._handshake())

    async def _handshake(self) -> None:
        t = self.config.timeouts
        try:
            greeting = await self._read("greeting", t.greeting)
            if greeting.code != 220:
                # 421 or 554: this host does not talk to us now; try the next
                # (Postfix's smtp_skip_5xx_greeting).
                raise ConnectionLevelError(greeting)
            await self._ehlo()
            if self.tls_policy.level != "none" and "STARTTLS" in self.extensions:
                await self._starttls()
            elif self.tls_policy.required:
                raise ConnectionLevelError(
                    Reply(451, "4.7.4", f"TLS is required, but was not offered by host {self.peer}")
                )
            if self.credentials is not None:
                await self._auth(self.credentials)
        except ConnectionLevelError:
            self._close()
            raise
        except (_WaitTimeout, _Lost) as e:
            self._close()
            raise ConnectionLevelError(self._failure_reply(e))

    async def _ehlo(self) -> None:
        t = self.config.timeouts
        helo = self.config.helo_hostname.encode("idna")
        self._write(b"EHLO " + helo)
        reply = await self._read("EHLO", t.ehlo)
        if reply.code == 250:
            self.esmtp = True
            self.extensions = parse_ehlo(reply)
            return
        if reply.is_permanent and reply.code != 554 and not self.tls_active:
            # EHLO not understood: an RFC 821 server.
            self._write(b"HELO " + helo)
            reply = await self._read("HELO", t.ehlo)
            if reply.code == 250:
                self.esmtp = False
                self.extensions = {}
                return
        raise ConnectionLevelError(reply)

    async def _starttls(self) -> None:
        t = self.config.timeouts
        self._write(b"STARTTLS")
        reply = await self._read("STARTTLS", t.starttls)
        if reply.code != 220:
            # Offered, then refused: treated like a failed handshake, never
            # silently continued in plaintext.
            raise ConnectionLevelError(
                Reply(451, "4.7.5", f"STARTTLS refused by {self.peer}: {reply}") if reply.code != 421 else reply
            )
        self._discard_input()
        self.transport.startTLS(tls_creator(self.tls_policy, self.host.name))  # type: ignore[union-attr]
        write_through(self.transport)  # each write is a whole group of commands or a body chunk already
        self.extensions = {}
        try:
            await self._ehlo()
        except (_Lost, _WaitTimeout) as e:
            why = "timed out"
            if isinstance(e, _Lost):
                why = e.reason.getErrorMessage()[:200] if e.reason is not None else "connection lost"
            raise ConnectionLevelError(Reply(451, "4.7.5", f"TLS handshake with {self.peer} failed: {why}"))
        self.tls_active = True

    async def _auth(self, credentials: Credentials) -> None:
        t = self.config.timeouts
        if not self.tls_active and not self.config.allow_plaintext_auth:
            raise ConnectionLevelError(Reply(451, "4.7.0", f"Refusing to send credentials to {self.peer} without TLS"))
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            self._write(b"AUTH PLAIN " + token)
            reply = await self._read("AUTH", t.auth)
        elif "LOGIN" in mechanisms:
            self._write(b"AUTH LOGIN")
            reply = await self._read("AUTH", t.auth)
            for secret in (user, password):
                if reply.code != 334:
                    break
                self._write(base64.b64encode(secret))
                reply = await self._read("AUTH", t.auth)
        else:
            raise ConnectionLevelError(
                Reply(451, "4.7.0", f"No supported AUTH mechanism offered by {self.peer} (have PLAIN, LOGIN)")
            )
        if reply.code != 235:
            if reply.code == 334:
                self._write(b"*")  # cancel the exchange (RFC 4954 §4)
            raise ConnectionLevelError(
                Reply(451, "4.7.0", f"Authentication failed at {self.peer}: {reply}") if reply.code != 421 else reply
            )

    # -- transactions -------------------------------------------------------

    def send(self, message: OutboundMessage) -> Deferred[TransactionOutcome]:
        """
        One transaction for ``message``; fires with a result for every
        recipient, never fails.  A pooled connection that turns out to be
        dead fails with ``_StaleConnection`` instead so a fresh one is used.
        """
        return Deferred.fromCoroutine(self._send(message))

    def _result(self, rcpt: str, reply: Reply, status: DeliveryStatus | None = None) -> DeliveryResult:
        return DeliveryResult(
            recipient=rcpt,
            status=status or _status_of(reply),
            reply=reply,
            mx_host=self.host.name,
            ip=self.ip,
            tls=self.tls_active,
        )

    def _precheck(self, message: OutboundMessage, results: dict[str, DeliveryResult]) -> list[str]:
        """Refuse, without a word on the wire, what this server cannot take."""
        everyone = list(message.recipients)
        refusal: Reply | None = None
        if not _valid_address(message.mail_from):
            refusal = Reply(553, "5.1.7", "Invalid sender address syntax")
        elif message.smtputf8 and "SMTPUTF8" not in self.extensions:
            refusal = Reply(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.peer}")
        else:
            limit = self.extensions.get("SIZE", "")
            if limit.isdigit() and int(limit) > 0 and message.size is not None and message.size > int(limit):
                refusal = Reply(552, "5.3.4", f"Message size exceeds fixed limit of host {self.peer} ({limit} bytes)")
        if refusal is not None:
            for rcpt in everyone:
                results[rcpt] = self._result(rcpt, refusal)
            return []
        accepted = []
        for rcpt in everyone:
            if not _valid_address(rcpt):
                results[rcpt] = self._result(rcpt, Reply(553, "5.1.3", "Invalid recipient address syntax"))
            elif not rcpt.isascii() and "SMTPUTF8" not in self.extensions:
                results[rcpt] = self._result(
                    rcpt,
                    Reply(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.peer}"),
                )
            else:
                accepted.append(rcpt)
        return accepted

    def _mail_command(self, message: OutboundMessage) -> bytes:
        params = []
        if "SIZE" in self.extensions and message.size is not None:
            params.append(f"SIZE={message.size}")
        if message.eight_bit and "8BITMIME" in self.extensions:
            # Without 8BITMIME the body goes as it is: near every server
            # takes it, and downgrading would break DKIM signatures.
            params.append("BODY=8BITMIME")
        if message.smtputf8 and "SMTPUTF8" in self.extensions:
            params.append("SMTPUTF8")
        line = " ".join([f"MAIL FROM:<{message.mail_from}>", *params])
        return line.encode("utf-8")

    async def _send(self, message: OutboundMessage) -> TransactionOutcome:
        t = self.config.timeouts
        results: dict[str, DeliveryResult] = {}
        reused = self.transactions > 0
        self.transactions += 1
        rcpts = self._precheck(message, results)
        if not rcpts:
            return self._outcome(message, results, reusable=self.alive)
        pipelining = "PIPELINING" in self.extensions
        answered = False
        body_sent = False
        try:
            first: list[bytes] = []
            if self._needs_rset:
                first.append(b"RSET")
            first.append(self._mail_command(message))
            rcpt_lines = [f"RCPT TO:<{r}>".encode() for r in rcpts]
            if pipelining:
                self._write(*first, *rcpt_lines, b"DATA")
            else:
                self._write(first[0])
            self._needs_rset = True
            if first[0] == b"RSET":
                reply = await self._read("RSET", t.rset)
                answered = True
                self._check_421(reply)
                if reply.code != 250:
                    raise ConnectionLevelError(reply)
                if not pipelining:
                    self._write(first[1])
            mail = await self._read("MAIL FROM", t.mail)
            answered = True
            self._check_421(mail)
            accepted: list[str] = []
            for rcpt, line in zip(rcpts, rcpt_lines, strict=True):
                if not pipelining:
                    if not mail.is_positive:
                        break
                    self._write(line)
                reply = await self._read("RCPT TO", t.rcpt)
                self._check_421(reply)
                if mail.is_positive and reply.is_positive:
                    accepted.append(rcpt)
                elif mail.is_positive:
                    results[rcpt] = self._result(rcpt, reply)
            if not mail.is_positive:
                for rcpt in rcpts:
                    results[rcpt] = self._result(rcpt, mail)
            data: Reply | None = None
            if pipelining:
                data = await self._read("DATA", t.data_init)
                self._check_421(data)
            elif accepted:
                self._write(b"DATA")
                data = await self._read("DATA", t.data_init)
                self._check_421(data)
            if data is not None and data.code == 354 and not accepted:
                # The server let DATA through without recipients: end it empty.
                self.transport.write(b".\r\n")  # type: ignore[union-attr]
                await self._read("end of data", t.data_end)
                self._needs_rset = False
            elif data is not None and data.code == 354:
                await self._write_body(message)
                body_sent = True
                final = await self._read("end of data", t.data_end)
                self._needs_rset = False
                self._check_421(final)
                for rcpt in accepted:
                    results[rcpt] = self._result(rcpt, final)
            elif accepted:
                assert data is not None
                for rcpt in accepted:
                    results[rcpt] = self._result(rcpt, data)
        except ConnectionLevelError as e:
            self._close()
            return self._outcome(message, results, pending=e.reply, retry_next=e.retry_next)
        except _BodyError as e:
            # Half a message is on the wire: only dropping the connection
            # keeps the server from taking it.
            log.error("{peer}: cannot read message body: {error}", peer=self.peer, error=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            reply = Reply(451, "4.3.0", f"Error reading the message body: {e}")
            return self._outcome(message, results, pending=reply, retry_next=False)
        except (_Lost, _WaitTimeout) as e:
            if reused and not answered and isinstance(e, _Lost):
                raise _StaleConnection()
            reply = self._failure_reply(e)
            if body_sent:
                # The message may have arrived: do not race to another host.
                return self._outcome(message, results, pending=reply, retry_next=False)
            return self._outcome(message, results, pending=reply, retry_next=True)
        return self._outcome(message, results, reusable=self.alive)

    def _check_421(self, reply: Reply) -> None:
        if reply.code == 421:
            raise ConnectionLevelError(reply)

    def _outcome(
        self,
        message: OutboundMessage,
        results: dict[str, DeliveryResult],
        pending: Reply | None = None,
        retry_next: bool = False,
        reusable: bool = False,
    ) -> TransactionOutcome:
        out = []
        for rcpt in message.recipients:
            if rcpt not in results:
                assert pending is not None, rcpt
                results[rcpt] = self._result(rcpt, pending, DeliveryStatus.DEFERRED)
            out.append(results[rcpt])
        return TransactionOutcome(tuple(out), retry_next=retry_next, reusable=reusable)

    async def _write_body(self, message: OutboundMessage) -> None:
        """
        Stream the body through ``DotStuffer``, never more than about one
        chunk ahead of what the transport has sent (streaming producer).
        """
        t = self.config.timeouts
        transport: Any = self.transport
        try:
            source = _chunks(message.body(), self.config.chunk_size)
        except Exception as e:
            raise _BodyError(str(e) or type(e).__name__)
        flow = self._flow = _Flow()
        transport.registerProducer(flow, True)
        self._stage = "data block"
        try:
            stuffer = DotStuffer()
            # Each chunk is written once the next one is read, so the last goes out with the final dot in
            # one write: one send, one segment (the connection sends at once, with Nagle off).
            held = b""
            while True:
                try:
                    chunk = await source.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as e:
                    raise _BodyError(str(e) or type(e).__name__)
                if not self.alive:
                    raise _Lost("data block", self.lost)
                if held:
                    transport.write(held)
                held = stuffer.feed(chunk)
                if flow.paused:
                    await self._drain(flow, t.data_block)
            if not self.alive:
                raise _Lost("data block", self.lost)
            transport.write(held + stuffer.finish())
        finally:
            self._flow = None
            if self.alive:
                transport.unregisterProducer()
            try:
                await source.aclose()
            except Exception:
                pass

    async def _drain(self, flow: _Flow, timeout: float) -> None:
        waiter = flow.wait()
        timer = self.clock.callLater(timeout, waiter.cancel)
        try:
            await waiter
        except Exception:
            self.transport.abortConnection()  # type: ignore[union-attr]
            raise _WaitTimeout("data block")
        finally:
            if timer.active():
                timer.cancel()

    # -- ending -------------------------------------------------------------

    def _close(self) -> None:
        if self.alive:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def quit(self) -> Deferred[None]:
        """QUIT, wait briefly for the answer, close; never fails."""
        return Deferred.fromCoroutine(self._quit())

    async def _quit(self) -> None:
        if not self.alive:
            return
        self._write(b"QUIT")
        try:
            await self._read("QUIT", self.config.timeouts.quit)
        except (_Lost, _WaitTimeout):
            pass
        self._close()


class _OneShotFactory(Factory):
    """Hands the endpoint the protocol built beforehand."""

    noisy = False  # one per outbound connection: "Starting/Stopping factory" lines would flood the log

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self._protocol


# ---------------------------------------------------------------------------
# The pool and the delivery loop.
# ---------------------------------------------------------------------------

PoolKey = tuple[str, str | None, int, TLSPolicy, Credentials | None]


class ConnectionPool:
    """
    Idle connections by destination host, closed (QUIT) after ``idle``
    seconds on the injected clock or when the server hangs up.

    Each connection has one idle timer for its life, moved on each time it
    comes back: on a busy connection that is taken and put back for every
    message, moving a timer later is cheap, while a new timer and a
    cancellation per message are not.  A timer that fires while its
    connection is in use does nothing.
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float = 5.0, max_idle_per_key: int = 4) -> None:
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._max = max_idle_per_key
        self._idle: dict[PoolKey, list[SMTPClientProtocol]] = {}
        self._timers: dict[SMTPClientProtocol, Any] = {}
        # Connections whose hang-up already removes them from the pool: one hook per connection,
        # not one per message it carried.
        self._watched: set[SMTPClientProtocol] = set()

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, key: PoolKey) -> SMTPClientProtocol | None:
        entries = self._idle.get(key)
        while entries:
            conn = entries.pop()
            if conn.alive:
                if not entries:
                    del self._idle[key]
                return conn
            self._forget_timer(conn)
        self._idle.pop(key, None)
        return None

    def put(self, key: PoolKey, conn: SMTPClientProtocol) -> None:
        entries = self._idle.setdefault(key, [])
        if not conn.alive or len(entries) >= self._max:
            if not entries:
                del self._idle[key]
            self._forget_timer(conn)
            conn.quit()
            return
        timer = self._timers.get(conn)
        if timer is not None and timer.active():
            timer.reset(self._idle_timeout)
        else:
            self._timers[conn] = self._clock.callLater(self._idle_timeout, self._expire, key, conn)
        entries.append(conn)
        if conn not in self._watched:
            self._watched.add(conn)
            conn.on_lost(lambda c: self._lost(key, c))

    def _forget_timer(self, conn: SMTPClientProtocol) -> None:
        timer = self._timers.pop(conn, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _lost(self, key: PoolKey, conn: SMTPClientProtocol) -> None:
        self._watched.discard(conn)
        self._remove(key, conn)
        self._forget_timer(conn)

    def _remove(self, key: PoolKey, conn: SMTPClientProtocol) -> bool:
        """Take ``conn`` out of the idle list; False when it was not idle (in use, or gone)."""
        entries = self._idle.get(key, [])
        for i, c in enumerate(entries):
            if c is conn:
                del entries[i]
                if not entries:
                    self._idle.pop(key, None)
                return True
        return False

    def _expire(self, key: PoolKey, conn: SMTPClientProtocol) -> None:
        self._timers.pop(conn, None)
        if self._remove(key, conn):
            conn.quit()

    def close_all(self) -> Deferred[None]:
        """QUIT every idle connection (service shutdown)."""
        conns = [c for entries in self._idle.values() for c in entries]
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._idle.clear()

        async def run() -> None:
            for conn in conns:
                await conn.quit()

        return Deferred.fromCoroutine(run())


def _connect_error_reply(exc: BaseException, peer: str) -> Reply:
    if isinstance(exc, ierror.ConnectionRefusedError):
        return Reply(451, "4.4.1", f"Connection refused by {peer}")
    if isinstance(exc, ierror.TimeoutError):
        return Reply(451, "4.4.1", f"Connection timed out to {peer}")
    if isinstance(exc, ierror.DNSLookupError):
        return Reply(451, "4.4.3", f"Host not found: {peer}")
    return Reply(451, "4.4.1", f"Connection to {peer} failed: {exc}")


class DeliveryClient:
    """
    Delivers ``OutboundMessage`` values over SMTP.  One per process; owns the
    connection pool.  ``reactor`` provides ``IReactorTCP`` (and name
    resolution for smarthosts given by name); ``clock`` defaults to it.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        config: ClientConfig,
        clock: IReactorTime | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.pool = pool or ConnectionPool(self._clock, config.timeouts.idle, config.max_idle_per_host)

    def deliver(self, destination: Destination, message: OutboundMessage) -> Deferred[list[DeliveryResult]]:
        """
        Try the hosts of ``destination`` in order until every recipient has
        a result that does not call for the next host.  Fires with one
        result per recipient, in the order of ``message.recipients``; never
        fails.
        """
        return Deferred.fromCoroutine(self._deliver(destination, message))

    def close(self) -> Deferred[None]:
        return self.pool.close_all()

    async def _deliver(self, destination: Destination, message: OutboundMessage) -> list[DeliveryResult]:
        final: dict[str, DeliveryResult] = {}
        last: dict[str, DeliveryResult] = {}
        pending = list(dict.fromkeys(message.recipients))
        deadline = self._clock.seconds() + self._config.attempt_budget
        attempts = 0
        for host in destination.hosts:
            for ip in host.addresses or (None,):
                if not pending or attempts >= self._config.max_connection_attempts:
                    break
                if attempts and self._clock.seconds() >= deadline:
                    break
                attempts += 1
                try:
                    outcome = await self._attempt(destination, host, ip, message.with_recipients(pending))
                except Exception:
                    log.failure("delivery attempt to {host} failed", host=host.name)
                    reply = Reply(451, "4.3.0", f"Internal error delivering to {host.name}")
                    outcome = self._all(message.with_recipients(pending), reply, host, ip)
                for result in outcome.results:
                    if outcome.retry_next and result.status is DeliveryStatus.DEFERRED:
                        last[result.recipient] = result
                    else:
                        final[result.recipient] = result
                pending = [r for r in pending if r not in final]
        for rcpt in pending:
            final[rcpt] = last.get(rcpt) or DeliveryResult(
                rcpt,
                DeliveryStatus.DEFERRED,
                Reply(451, "4.4.4", f"No host to try for {destination.domain}"),
            )
        return [final[r] for r in message.recipients]

    def _endpoint(self, host: MXHost, ip: str | None) -> IStreamClientEndpoint:
        timeout = self._config.timeouts.connect
        if ip is None:
            bind = (self._config.source_ipv4, 0) if self._config.source_ipv4 else None
            return eager_hostname_endpoint(self._reactor, host.name, host.port, timeout=timeout, bindAddress=bind)
        if ":" in ip:
            bind = (self._config.source_ipv6, 0) if self._config.source_ipv6 else None
        else:
            bind = (self._config.source_ipv4, 0) if self._config.source_ipv4 else None
        return EagerTCPClientEndpoint(self._reactor, ip, host.port, timeout=timeout, bindAddress=bind)

    async def _attempt(
        self, destination: Destination, host: MXHost, ip: str | None, message: OutboundMessage
    ) -> TransactionOutcome:
        tls = destination.tls or self._config.tls
        key: PoolKey = (host.name.lower(), ip, host.port, tls, destination.credentials)
        while (conn := self.pool.take(key)) is not None:
            try:
                outcome = await conn._send(message)  # the coroutine itself: no Deferred in between
            except _StaleConnection:
                continue
            return self._finish(key, conn, outcome)
        conn = SMTPClientProtocol(self._clock, self._config, host, ip, tls, destination.credentials)
        peer = conn.peer
        try:
            await self._endpoint(host, ip).connect(_OneShotFactory(conn))
        except Exception as e:
            reply = _connect_error_reply(e, peer)
            log.info("{peer}: {reply}", peer=peer, reply=str(reply))
            return self._all(message, reply, host, ip)
        try:
            await conn.handshake()
        except ConnectionLevelError as e:
            log.info("{peer}: {reply}", peer=conn.peer, reply=str(e.reply))
            return self._all(message, e.reply, host, conn.ip, tls=conn.tls_active)
        try:
            outcome = await conn._send(message)
        except _StaleConnection:  # cannot happen on a fresh connection; be safe
            return self._all(message, Reply(451, "4.4.2", f"Lost connection with {conn.peer}"), host, ip)
        return self._finish(key, conn, outcome)

    def _finish(self, key: PoolKey, conn: SMTPClientProtocol, outcome: TransactionOutcome) -> TransactionOutcome:
        if outcome.reusable and conn.transactions < self._config.max_messages_per_connection:
            self.pool.put(key, conn)
        else:
            conn.quit()
        return outcome

    def _all(
        self, message: OutboundMessage, reply: Reply, host: MXHost, ip: str | None, tls: bool = False
    ) -> TransactionOutcome:
        return TransactionOutcome(
            tuple(
                DeliveryResult(r, DeliveryStatus.DEFERRED, reply, mx_host=host.name, ip=ip, tls=tls)
                for r in message.recipients
            ),
            retry_next=True,
        )


def results_for_error(recipients: Iterable[str], reply: Reply) -> list[DeliveryResult]:
    """Every recipient with ``reply`` (a ``DestinationError``'s): bounced if permanent, else deferred."""
    status = DeliveryStatus.FAILED if reply.is_permanent else DeliveryStatus.DEFERRED
    return [DeliveryResult(r, status, reply) for r in recipients]
