"""
mailrelay's ESMTP server protocol.

The protocol only speaks SMTP: every decision (who may connect, credentials,
senders, recipients, where the message goes) is asked of an
``ISMTPDelegate``, which may answer at once or with a Deferred.  Commands are
handled strictly one at a time so pipelined replies stay in order however
late a decision arrives, and a message streams to its ``IMessageReceiver``
chunk by chunk, never whole in memory.

Limits, chosen and enforced here:

* Command lines: 512 octets including CRLF (RFC 5321 4.5.3.1.4).  ``AUTH``
  and its continuation lines: 12288 (RFC 4954 4).  ``MAIL`` and ``RCPT``:
  1024, which covers the 500 octets RFC 4954's ``AUTH=`` parameter adds and
  SIZE/BODY; 2048 when SMTPUTF8 is in use (a ``MAIL`` line with the SMTPUTF8
  parameter, or ``RCPT`` in such a transaction), because a UTF-8 character
  may take four octets.  An over-long line is answered ``500 5.5.2`` once and
  the rest of it is thrown away up to its line feed, whatever its length.
* Message text lines: at most 998 octets before the CRLF, the transparency
  dot not counted (RFC 5321 4.5.3.1.6); a line ended by a bare LF may have
  999.  A longer line makes the message fail with ``554 5.6.0``, after the
  whole message has been read.
* Only ``<CRLF>.<CRLF>`` ends a message.  A dot line next to a bare CR or LF
  (``\\n.\\n``, ``\\r.\\r\\n``, ``\\r\\n.\\n`` ...) is how SMTP smuggling
  splits one message into two on servers that accept such endings; the
  message is read to its real end and refused with ``554 5.6.0``.
* Command lines may end in a bare LF (many scripts do); the CR is optional.
* Non-ASCII addresses without SMTPUTF8 get ``553 5.6.7`` (RFC 6531 3.6).

A receiver is aborted as soon as its message is known to fail (too big, a
long line, smuggling), when the connection drops mid-message, and also after
``finish()`` if its answer has not come within ``data_end_timeout`` or the
connection drops first: the client was never told 250, so it will retry.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.smtp import replies
from mailrelay.tlslayer import write_through
from mailrelay.types import Envelope, MailParams, Principal, Reply, SessionInfo, SMTPReplyError

log = Logger()

#: An ``ISMTPDelegate`` provider (zope interfaces do not type-check as classes).
Delegate = Any

COMMAND_LINE_LIMIT = 512
MAIL_LINE_LIMIT = 1024
MAIL_LINE_LIMIT_SMTPUTF8 = 2048
AUTH_LINE_LIMIT = 12288
TEXT_LINE_LIMIT = 998

# While a decision is pending, buffer at most this much further input before
# asking the transport to stop reading.
_INPUT_HIGH_WATER = 256 * 1024

_LISTENERS = ("smtp", "submission", "submissions")


def _positive(instance: object, attribute: attrs.Attribute, value: float | None) -> None:  # type: ignore[type-arg]
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _check_hostname(value: str) -> None:
    # It goes into every greeting: a space or CRLF would forge replies.
    if not value or not value.isprintable() or " " in value:
        raise ValueError(f"hostname must be a non-empty name without spaces, not {value!r}")


@attrs.frozen
class ServerSettings:
    """
    What one listener allows.  ``require_auth`` and ``implicit_tls`` default
    from the listener: submission ports need AUTH, ``submissions`` is TLS
    from the first byte (RFC 8314).

    ``max_errors`` counts protocol errors (unknown commands, syntax, bad
    sequence, over-long lines) and failed AUTH attempts; reaching it ends
    the connection with ``421 4.7.0``.  A delegate's refusals are not
    counted: the delegate closes the connection itself if it wants to.
    ``None`` connection limits mean unlimited.
    """

    hostname: str = attrs.field(validator=lambda i, a, v: _check_hostname(v))
    listener: str = attrs.field(default="smtp", validator=attrs.validators.in_(_LISTENERS))
    max_message_size: int = attrs.field(default=26214400, validator=_positive)
    max_recipients: int = attrs.field(default=1000, validator=_positive)
    require_auth: bool = attrs.field()
    allow_plaintext_auth: bool = False
    implicit_tls: bool = attrs.field()
    command_timeout: float = attrs.field(default=300.0, validator=_positive)
    data_block_timeout: float = attrs.field(default=180.0, validator=_positive)
    data_end_timeout: float = attrs.field(default=600.0, validator=_positive)
    max_errors: int = attrs.field(default=10, validator=_positive)
    max_connections: int | None = attrs.field(default=1000, validator=_positive)
    max_connections_per_ip: int | None = attrs.field(default=100, validator=_positive)

    @require_auth.default
    def _require_auth_default(self) -> bool:
        return self.listener != "smtp"

    @implicit_tls.default
    def _implicit_tls_default(self) -> bool:
        return self.listener == "submissions"


class SMTPServerFactory(Factory):
    """
    Builds one ``SMTPServerProtocol`` per connection and enforces the total
    and per-address connection limits.

    ``delegate_factory()`` returns a fresh ``ISMTPDelegate`` for each accepted
    connection.  ``tls_context_factory`` (an ``IOpenSSLContextFactory``, e.g.
    ``mailrelay.smtp.tls.ReloadingContextFactory``) enables STARTTLS; leave
    it out on the implicit-TLS listener, which is wrapped with
    ``mailrelay.smtp.tls.implicit_tls_factory`` instead.
    """

    def __init__(
        self,
        settings: ServerSettings,
        delegate_factory: Callable[[], Delegate],
        clock: IReactorTime,
        tls_context_factory: object | None = None,
    ) -> None:
        self.settings = settings
        self.delegate_factory = delegate_factory
        self.clock = clock
        self.tls_context_factory = tls_context_factory
        self.active_connections = 0
        self._per_address: dict[str, int] = {}
        self._ehlo_cache: dict[tuple[bool, bool], bytes] = {}

    def buildProtocol(self, addr: object) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    def connections_from(self, ip: str) -> int:
        """How many connections ``ip`` has open now."""
        return self._per_address.get(ip, 0)

    def _admit(self, ip: str) -> Reply | None:
        """Count a new connection, or say why it is refused."""
        settings = self.settings
        if settings.max_connections is not None and self.active_connections >= settings.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        current = self._per_address.get(ip, 0)
        if settings.max_connections_per_ip is not None and current >= settings.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM_ADDRESS
        self.active_connections += 1
        self._per_address[ip] = current + 1
        return None

    def _release(self, ip: str) -> None:
        self.active_connections -= 1
        left = self._per_address[ip] - 1
        if left:
            self._per_address[ip] = left
        else:
            del self._per_address[ip]

    def _ehlo_bytes(self, starttls: bool, auth: bool) -> bytes:
        """The EHLO answer, built once per combination of what applies."""
        key = (starttls, auth)
        cached = self._ehlo_cache.get(key)
        if cached is None:
            keywords = [
                f"SIZE {self.settings.max_message_size}",
                "8BITMIME",
                "PIPELINING",
                "ENHANCEDSTATUSCODES",
                "SMTPUTF8",
            ]
            if starttls:
                keywords.append("STARTTLS")
            if auth:
                keywords.append("AUTH PLAIN LOGIN")
            cached = self._ehlo_cache[key] = replies.ehlo(self.settings.hostname, keywords).to_bytes()
        return cached


# --- addresses ------------------------------------------------------------------

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_NON_ASCII = "\u0080-\U0010ffff"
_LABEL = r"[{c}](?:[{c}\-]*[{c}])?"


def _mailbox_re(extra: str) -> re.Pattern[str]:
    atext = f"[{_ATEXT}{extra}]+"
    qtext = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{extra}]|\\[\x20-\x7e])*"'
    label = _LABEL.format(c="A-Za-z0-9" + extra)
    domain = rf"{label}(?:\.{label})*"
    literal = r"\[(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]"
    return re.compile(rf"(?:{atext}(?:\.{atext})*|{qtext})@(?:{domain}|{literal})\Z")


_MAILBOX_ASCII = _mailbox_re("")
_MAILBOX_UTF8 = _mailbox_re(_NON_ASCII)


_NO_PARAMS = MailParams()


class _AddressError(Exception):
    """The path is malformed (``syntax``) or needs SMTPUTF8 (``non_ascii``)."""

    def __init__(self, non_ascii: bool = False) -> None:
        super().__init__()
        self.non_ascii = non_ascii


def _parse_path(text: str) -> tuple[str, str]:
    """
    Split ``<address> params`` into the address and the parameter text.

    Source routes (``<@a,@b:user@c>``) are dropped as RFC 5321 4.1.1.3
    says.  A bare address without angle brackets is accepted (broken clients
    send it) up to the first space.
    """
    if not text.startswith("<"):
        address, _, rest = text.partition(" ")
        if not address or ">" in address:
            raise _AddressError()
        return address, rest.strip()
    start = 1
    if text.startswith("@", 1):
        colon = text.find(":", 1)
        if colon < 0:
            raise _AddressError()
        start = colon + 1
    pos = start
    if text.startswith('"', start):
        pos = start + 1
        length = len(text)
        while pos < length:
            char = text[pos]
            if char == "\\":
                pos += 2
            elif char == '"':
                break
            else:
                pos += 1
        else:
            raise _AddressError()
    end = text.find(">", pos)
    if end < 0:
        raise _AddressError()
    rest = text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise _AddressError()
    return text[start:end], rest.strip()


def _check_mailbox(address: str, smtputf8: bool) -> None:
    """Raise ``_AddressError`` unless ``address`` is ``local@domain``."""
    if address.isascii():
        if _MAILBOX_ASCII.match(address) is None:
            raise _AddressError()
    elif not smtputf8:
        raise _AddressError(non_ascii=True)
    elif _MAILBOX_UTF8.match(address) is None:
        raise _AddressError()


# --- the message reader ---------------------------------------------------------

_END = b"\r\n.\r\n"
_SMUGGLE = re.compile(rb"[\r\n]\.[\r\n]")
_DOT_LINE = b"\r\n."
_MAX_RAW_LINE = TEXT_LINE_LIMIT + 1  # the CR before the LF


class _MessageReader:
    """
    Turns the raw DATA stream into message bytes for one receiver.

    Each chunk is handled with a few ``find``/``replace``/``search`` calls on
    the whole chunk.  Only the last six raw octets are kept between chunks
    (``_tail``); of those, the last ``_held`` (``\\r\\n.\\r``, which may be
    the end marker but one octet) have not been passed on yet.  A virtual
    CRLF before the first octet makes the first line a line like any other.
    """

    __slots__ = ("_held", "_line", "_max_size", "_tail", "error", "receiver", "size")

    def __init__(self, receiver: Any, max_size: int) -> None:
        self.receiver = receiver
        self.error: Reply | None = None
        self.size = 0
        self._max_size = max_size
        self._tail = b"\r\n"
        self._held = 0
        self._line = 0

    def feed(self, chunk: bytes) -> bytes | None:
        """
        Take ``chunk``; return None while the message goes on, or the octets
        after the end marker once it has been seen.
        """
        tail = self._tail
        work = tail + chunk
        end = work.find(_END)
        if end >= 0:
            stop = end + 2  # the CRLF ending the last line belongs to the message
            scan_end = stop
        else:
            length = len(work)
            # ``\r\n.\r`` may be the end marker but one octet: keep the
            # ``.\r`` back until that is known.  (Everything else can go: a
            # CRLF at the end belongs to the message even if the end follows.)
            held = 4 if work.endswith(b"\r\n.\r") else 0
            stop = length - held
            # A dot line's third octet must be there to know it is not the end.
            scan_end = length - 1
        if self.error is None:
            # ``find`` is far faster than the regex; most chunks have no
            # line starting with a dot at all.
            dotted = work.find(b"\n.", 0, scan_end) >= 0 or work.find(b"\r.", 0, scan_end) >= 0
            if dotted and _SMUGGLE.search(work, 0, scan_end) is not None:
                self._fail(replies.SMUGGLING)
            else:
                start = len(tail) - self._held
                if stop <= start:
                    pass
                elif dotted or work.endswith(b"\n."):
                    # Two octets of context before ``start`` let a dot at the
                    # chunk boundary be seen as a line's first octet.
                    out = work[start - 2 : stop].replace(_DOT_LINE, b"\r\n")[2:]
                    if out:
                        self._write(out)
                else:
                    # No line starts with a dot: nothing to unstuff (the usual case).
                    self._write(work[start:stop])
        if end >= 0:
            return work[end + 5 :]
        start = len(tail) - self._held
        self._held = len(work) - (stop if stop > start else start)
        self._tail = work[-6:]
        return None

    def _write(self, out: bytes) -> None:
        line = self._line + len(out)
        if line > _MAX_RAW_LINE:
            last = out.rfind(b"\n")
            if last < 0:
                self._line = line
                too_long = True
            else:
                first = out.find(b"\n")
                too_long = (
                    self._line + first > _MAX_RAW_LINE
                    or len(out) - last - 1 > _MAX_RAW_LINE
                    or _has_long_line(out, first + 1, last)
                )
                self._line = len(out) - last - 1
            if too_long:
                self._fail(replies.DATA_LINE_TOO_LONG)
                return
        else:
            newline = out.rfind(b"\n")
            self._line = line if newline < 0 else len(out) - newline - 1
        self.size += len(out)
        if self.size > self._max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
            return
        try:
            self.receiver.write(out)
        except Exception:
            log.failure("The message receiver failed to take message data")
            self._fail(replies.INTERNAL_ERROR)

    def _fail(self, reply: Reply) -> None:
        """Keep the first reason; the receiver is told once, at once."""
        self.error = reply
        abort_receiver(self.receiver)


# A line longer than ``_MAX_RAW_LINE`` holds a whole block of this many octets
# at any fixed spacing, so one ``find`` per block rules most chunks out.
_BLOCK = (_MAX_RAW_LINE + 1) // 2


def _has_long_line(data: bytes, start: int, end: int) -> bool:
    """
    Whether ``data[start:end]`` (bounded by line feeds) has a line longer
    than ``_MAX_RAW_LINE``.  A ``find`` per 500 octets instead of a split
    into every line: a fifth of the cost for a 20 KB chunk of short lines.
    """
    find = data.find
    for block in range(start, end, _BLOCK):
        if find(b"\n", block, block + _BLOCK) < 0:
            return max(map(len, data[start:end].split(b"\n"))) > _MAX_RAW_LINE
    return False


def abort_receiver(receiver: Any) -> None:
    """Abort ``receiver``; a failing abort is logged, never propagated."""
    try:
        receiver.abort()
    except Exception:
        log.failure("The message receiver failed to abort")


# --- the protocol -----------------------------------------------------------------

_CommandHandler = Callable[["SMTPServerProtocol", bytes], None]
_HTTP_VERBS = frozenset((b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"))
_NOT_IMPLEMENTED = frozenset((b"BDAT", b"TURN", b"ETRN", b"ATRN", b"SEND", b"SOML", b"SAML"))


@implementer(IHandshakeListener)
class SMTPServerProtocol(Protocol):
    """
    One SMTP connection.  ``session`` is what the delegate sees; it is
    replaced (never mutated) as the connection learns more.

    Input is handled by ``_process``: one command at a time from
    ``_buffer``.  While a decision is pending (``_busy``) further input is
    only buffered, and reading stops once that buffer is large.  In DATA
    mode input goes to the ``_MessageReader`` as it arrives.  Replies are
    collected and written together when the input at hand is used up.
    """

    #: Any ``ITransport``; STARTTLS needs ``ITLSTransport``.
    transport: Any

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self._settings = factory.settings
        self._clock = factory.clock
        self._delegate: Delegate = None
        self.session = SessionInfo(
            listener=self._settings.listener,
            client_ip="unknown",
            client_port=0,
            server_hostname=self._settings.hostname,
        )
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._busy = False
        self._processing = False
        self._closing = False
        self._admitted = False
        self._discarding = False
        self._paused = False
        self._errors = 0
        self._pending: Deferred[Any] | None = None
        self._auth_next: Callable[[bytes], None] | None = None
        self._envelope: Envelope | None = None
        self._recipient_keys: set[str] = set()
        self._reader: _MessageReader | None = None
        self._finishing: _MessageReader | None = None
        self._timer: IDelayedCall | None = None
        self._timer_delay = self._settings.command_timeout

    # --- connection lifecycle ---------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", None) or "unknown"
        port = getattr(peer, "port", None) or 0
        refusal = self.factory._admit(ip)
        if refusal is not None:
            self._closing = True
            self.transport.write(refusal.to_bytes())
            self.transport.loseConnection()
            return
        self._admitted = True
        settings = self._settings
        self.session = attrs.evolve(
            self.session,
            client_ip=ip,
            client_port=int(port),
            tls=settings.implicit_tls or ISSLTransport.providedBy(self.transport),
        )
        self._timer = self._clock.callLater(settings.command_timeout, self._timer_fired)
        try:
            self._delegate = self.factory.delegate_factory()
        except Exception:
            log.failure("Could not create the SMTP delegate")
            self._close(replies.SERVICE_UNAVAILABLE)
            return
        self._ask(self._delegate.connection_made, (self.session,), self._greet, self._refused_connection)
        self._process()

    def _greet(self, result: object) -> None:
        self._reply(replies.service_ready(self._settings.hostname))

    def _refused_connection(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, SMTPReplyError):
            self._close(error.reply)
        else:
            log.failure("The SMTP delegate failed to accept a connection", failure)
            self._close(replies.SERVICE_UNAVAILABLE)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._closing = True
        self._pending = None
        self._cancel_timer()
        for reader in (self._reader, self._finishing):
            if reader is not None and reader.error is None:
                abort_receiver(reader.receiver)
        self._reader = self._finishing = None
        self._buffer.clear()
        self.factory._release(self.session.client_ip)
        if self._delegate is not None:
            try:
                result = self._delegate.connection_lost(self.session)
            except Exception:
                log.failure("The SMTP delegate failed on connection_lost")
            else:
                if isinstance(result, Deferred):
                    result.addErrback(lambda f: log.failure("The SMTP delegate failed on connection_lost", f))

    def handshakeCompleted(self) -> None:
        """Record the negotiated TLS version and cipher for the delegate."""
        if self._closing:
            return
        try:
            handle = self.transport.getHandle()
            version = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
        except Exception:
            return
        self.session = attrs.evolve(self.session, tls=True, tls_version=version, tls_cipher=cipher)

    # --- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._finishing is None and self._timer is not None:
            self._timer.reset(self._timer_delay)
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._discarding = False
            data = data[newline + 1 :]
        if self._reader is not None and not self._busy and not self._buffer:
            self._feed_message(data)
        else:
            self._buffer += data
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it runs out or a decision is pending."""
        if self._processing:
            return
        self._processing = True
        try:
            buf = self._buffer
            while buf and not self._busy and not self._closing:
                if self._reader is not None:
                    data = bytes(buf)
                    buf.clear()
                    self._feed_message(data)
                    continue
                newline = buf.find(b"\n", 0, AUTH_LINE_LIMIT)
                if newline < 0:
                    if len(buf) < self._line_limit(buf):
                        break  # wait for the rest of the line
                    self._line_too_long(buf.find(b"\n"))
                    continue
                length = newline - 1 if newline and buf[newline - 1] == 13 else newline
                if length + 2 > COMMAND_LINE_LIMIT and length + 2 > self._line_limit(buf):
                    self._line_too_long(newline)
                    continue
                line = bytes(buf[:length])
                del buf[: newline + 1]
                handler = self._auth_next
                if handler is not None:
                    self._auth_next = None
                    if line.strip() == b"*":
                        self._reply(replies.AUTH_CANCELLED)
                    else:
                        handler(line)
                else:
                    self._command(line)
        finally:
            self._processing = False
        self._flush()
        if self._paused:
            if not self._busy or len(self._buffer) < _INPUT_HIGH_WATER:
                self._paused = False
                self._call_transport("resumeProducing")
        elif self._busy and len(self._buffer) >= _INPUT_HIGH_WATER and not self._closing:
            self._paused = True
            self._call_transport("pauseProducing")

    def _call_transport(self, name: str) -> None:
        method = getattr(self.transport, name, None)
        if method is not None:
            method()

    def _line_limit(self, buf: bytearray) -> int:
        """The longest line allowed for the (partial) line starting ``buf``."""
        if self._auth_next is not None:
            return AUTH_LINE_LIMIT
        verb = bytes(buf[:5]).upper()
        if verb == b"AUTH ":
            return AUTH_LINE_LIMIT
        if verb == b"MAIL " or verb == b"RCPT ":
            return MAIL_LINE_LIMIT_SMTPUTF8
        return COMMAND_LINE_LIMIT

    def _line_too_long(self, newline: int) -> None:
        """
        Answer once and throw the line away up to its line feed; if that has
        not arrived yet, keep throwing input away until it does.
        """
        if newline < 0:
            self._buffer.clear()
            self._discarding = True
        else:
            del self._buffer[: newline + 1]
        self._auth_next = None
        self._error(replies.LINE_TOO_LONG)

    def _command(self, line: bytes) -> None:
        space = line.find(b" ")
        if space < 0:
            verb, arg = line.upper(), b""
        else:
            verb, arg = line[:space].upper(), line[space + 1 :]
        handler = _COMMANDS.get(verb)
        if handler is not None:
            handler(self, arg)
        elif verb in _NOT_IMPLEMENTED:
            self._error(replies.NOT_IMPLEMENTED)
        elif verb in _HTTP_VERBS or verb.endswith(b":"):
            self._close(replies.NOT_SMTP)
        else:
            self._error(replies.UNKNOWN_COMMAND)

    # --- output -----------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        wire = _WIRE.get(id(reply))
        self._out.append(wire if wire is not None else reply.to_bytes())

    def _flush(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.transport.write(data)

    def _error(self, reply: Reply) -> None:
        """Answer a client error, or close once there have been too many."""
        self._errors += 1
        if self._errors >= self._settings.max_errors:
            self._close(replies.TOO_MANY_ERRORS)
        else:
            self._reply(reply)

    def _close(self, reply: Reply | None = None) -> None:
        if self._closing:
            return
        if reply is not None:
            self._reply(reply)
        self._flush()
        self._closing = True
        self._pending = None
        self._cancel_timer()
        self.transport.loseConnection()

    # --- timers -----------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        """
        (Re)start the one timer.  What its expiry means depends on the state
        (see ``_timer_fired``), so moving between states only moves it.
        """
        if self._closing:
            return
        self._timer_delay = delay
        timer = self._timer
        if timer is not None:
            timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._timer_fired)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timer_fired(self) -> None:
        self._timer = None
        if self._finishing is not None:
            self._end_timed_out()
        else:
            self._close(replies.TIMEOUT)

    def _end_timed_out(self) -> None:
        """The receiver took too long to store the message: give up on it."""
        reader, self._finishing = self._finishing, None
        if reader is not None:
            abort_receiver(reader.receiver)
        self._pending = None
        self._busy = False
        self._arm(self._settings.command_timeout)
        self._reply(replies.QUEUE_TIMEOUT)
        self._end_transaction()
        self._process()

    # --- asking the delegate ----------------------------------------------------

    def _ask(
        self,
        method: Callable[..., Any],
        args: tuple[Any, ...],
        on_result: Callable[[Any], None],
        on_failure: Callable[[Failure], None] | None = None,
    ) -> None:
        """
        Call a decision; continue with ``on_result`` now or, when it returns
        a Deferred, once that fires, holding further input until then.
        """
        failed = on_failure or self._refused
        try:
            result = method(*args)
        except Exception:
            failed(Failure())
            return
        if not isinstance(result, Deferred):
            on_result(result)
            return
        self._busy = True
        self._pending = result
        result.addCallbacks(
            self._answered,
            self._answered,
            callbackArgs=(result, on_result),
            errbackArgs=(result, failed),
        )
        result.addErrback(self._bug)

    def _answered(self, outcome: Any, deferred: Deferred[Any], then: Callable[[Any], None]) -> None:
        if deferred is not self._pending:
            return  # the connection closed or timed out meanwhile
        self._pending = None
        self._busy = False
        if self._finishing is None and self._timer is not None:
            self._timer.reset(self._timer_delay)
        then(outcome)
        self._process()

    def _bug(self, failure: Failure) -> None:
        log.failure("Unexpected error in the SMTP protocol", failure)
        if not self._closing:
            self._close(replies.SERVICE_UNAVAILABLE)

    def _refused(self, failure: Failure) -> None:
        """A decision said no (``SMTPReplyError``) or failed (451)."""
        error = failure.value
        if isinstance(error, SMTPReplyError):
            if error.close:
                self._close(error.reply)
            else:
                self._reply(error.reply)
        else:
            log.failure("An SMTP decision failed", failure)
            self._reply(replies.INTERNAL_ERROR)

    # --- transaction state ------------------------------------------------------

    def _end_transaction(self) -> None:
        self._envelope = None
        self._recipient_keys = set()

    # --- commands ---------------------------------------------------------------

    def do_EHLO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=True)

    def do_HELO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: bytes, esmtp: bool) -> None:
        name = arg.strip()
        if not name:
            self._error(replies.HELO_SYNTAX)
            return
        self._end_transaction()
        session = self.session = attrs.evolve(self.session, helo=name.decode("utf-8", "replace"), esmtp=esmtp)
        if not esmtp:
            self._reply(replies.helo(self._settings.hostname))
            return
        factory = self.factory
        starttls = factory.tls_context_factory is not None and not session.tls
        auth = session.tls or self._settings.allow_plaintext_auth
        self._out.append(factory._ehlo_bytes(starttls, auth))

    def do_STARTTLS(self, arg: bytes) -> None:
        if arg.strip():
            self._error(replies.NO_ARGUMENTS)
        elif self.session.tls:
            self._error(replies.TLS_ALREADY_ACTIVE)
        elif self.factory.tls_context_factory is None:
            self._error(replies.TLS_NOT_AVAILABLE)
        else:
            self._reply(replies.READY_FOR_TLS)
            self._flush()
            # RFC 3207 4.2: whatever followed STARTTLS in plaintext is thrown
            # away, and nothing learned before TLS is kept.
            self._buffer.clear()
            self._end_transaction()
            settings = self._settings
            self.session = SessionInfo(
                listener=settings.listener,
                client_ip=self.session.client_ip,
                client_port=self.session.client_port,
                server_hostname=settings.hostname,
                tls=True,
            )
            self.transport.startTLS(self.factory.tls_context_factory)
            write_through(self.transport)  # replies are batched here already

    def do_AUTH(self, arg: bytes) -> None:
        session = self.session
        if not session.esmtp:
            self._error(replies.SEND_EHLO_FIRST)
            return
        if session.principal is not None:
            self._error(replies.ALREADY_AUTHENTICATED)
            return
        if self._envelope is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return
        if not (session.tls or self._settings.allow_plaintext_auth):
            self._error(replies.ENCRYPTION_REQUIRED)
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(replies.AUTH_SYNTAX)
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self._auth_next = self._auth_plain
                self._reply(replies.AUTH_CONTINUE)
            else:
                self._auth_plain(initial)
        elif mechanism == b"LOGIN":
            if initial is None:
                self._auth_next = self._auth_login_username
                self._reply(replies.AUTH_USERNAME_PROMPT)
            else:
                self._auth_login_username(initial)
        else:
            self._error(replies.AUTH_MECHANISM_UNKNOWN)

    def _auth_plain(self, response: bytes) -> None:
        decoded = _b64decode(response)
        if decoded is None:
            self._error(replies.AUTH_BAD_BASE64)
            return
        parts = decoded.split(b"\0")
        try:
            authzid, username, password = (part.decode("utf-8") for part in parts)
        except (ValueError, UnicodeDecodeError):
            self._error(replies.AUTH_MALFORMED)
            return
        if not username:
            self._error(replies.AUTH_MALFORMED)
        elif authzid and authzid != username:
            self._error(replies.AUTHZID_REFUSED)
        else:
            self._authenticate("PLAIN", username, password)

    def _auth_login_username(self, response: bytes) -> None:
        decoded = _b64decode(response)
        if decoded is None:
            self._error(replies.AUTH_BAD_BASE64)
            return
        try:
            username = decoded.decode("utf-8")
        except UnicodeDecodeError:
            username = ""
        if not username:
            self._error(replies.AUTH_MALFORMED)
            return
        self._auth_next = lambda line: self._auth_login_password(username, line)
        self._reply(replies.AUTH_PASSWORD_PROMPT)

    def _auth_login_password(self, username: str, response: bytes) -> None:
        decoded = _b64decode(response)
        if decoded is None:
            self._error(replies.AUTH_BAD_BASE64)
            return
        try:
            password = decoded.decode("utf-8")
        except UnicodeDecodeError:
            self._error(replies.AUTH_MALFORMED)
            return
        self._authenticate("LOGIN", username, password)

    def _authenticate(self, mechanism: str, username: str, password: str) -> None:
        self._ask(
            self._delegate.authenticate,
            (self.session, mechanism, username, password),
            self._authenticated,
            self._auth_failed,
        )

    def _authenticated(self, principal: Principal) -> None:
        if not isinstance(principal, Principal):
            log.error("authenticate() returned {result!r}, not a Principal", result=principal)
            self._reply(replies.INTERNAL_ERROR)
            return
        self.session = attrs.evolve(self.session, principal=principal)
        self._reply(replies.AUTH_SUCCESSFUL)

    def _auth_failed(self, failure: Failure) -> None:
        if failure.check(LoginFailed):
            self._error(replies.AUTH_INVALID)
        else:
            self._refused(failure)

    def do_MAIL(self, arg: bytes) -> None:
        session = self.session
        if session.helo is None:
            self._error(replies.SEND_HELO_FIRST)
            return
        if self._envelope is not None:
            self._error(replies.NESTED_MAIL)
            return
        if self._settings.require_auth and session.principal is None:
            self._error(replies.AUTH_REQUIRED)
            return
        if arg[:5].upper() != b"FROM:":
            self._error(replies.MAIL_SYNTAX)
            return
        try:
            text = arg[5:].decode("utf-8").lstrip(" ")
        except UnicodeDecodeError:
            self._error(replies.INVALID_UTF8)
            return
        try:
            address, param_text = _parse_path(text)
        except _AddressError:
            self._error(replies.BAD_SENDER_SYNTAX)
            return
        params = self._mail_params(param_text)
        if params is None:
            return
        limit = MAIL_LINE_LIMIT_SMTPUTF8 if params.smtputf8 else MAIL_LINE_LIMIT
        if len(arg) + 7 > limit:
            self._error(replies.LINE_TOO_LONG)
            return
        if address:
            try:
                _check_mailbox(address, params.smtputf8)
            except _AddressError as e:
                self._error(replies.NON_ASCII_ADDRESS if e.non_ascii else replies.BAD_SENDER_SYNTAX)
                return

        def accepted(result: object) -> None:
            self._envelope = Envelope(mail_from=address, rcpt_to=(), params=params)
            self._reply(replies.SENDER_OK)

        self._ask(self._delegate.validate_from, (session, address, params), accepted)

    def _mail_params(self, text: str) -> MailParams | None:
        """Parse ``MAIL`` parameters, or answer the error and return None."""
        if not text:
            return _NO_PARAMS
        size: int | None = None
        body: str | None = None
        smtputf8 = False
        seen: set[str] = set()
        for item in text.split():
            key, sep, value = item.partition("=")
            key = key.upper()
            if key in seen:
                self._error(replies.PARAMETER_SYNTAX)
                return None
            seen.add(key)
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()) or len(value) > 20:
                    self._error(replies.PARAMETER_SYNTAX)
                    return None
                size = int(value)
                if size > self._settings.max_message_size:
                    self._reply(replies.MESSAGE_TOO_BIG)
                    return None
            elif key == "BODY":
                body = value.upper()
                if body not in ("7BIT", "8BITMIME"):
                    self._error(replies.UNKNOWN_PARAMETER)
                    return None
            elif key == "SMTPUTF8":
                if sep:
                    self._error(replies.PARAMETER_SYNTAX)
                    return None
                smtputf8 = True
            elif key == "AUTH":
                # RFC 4954 5: the submitter's identity when relaying; the
                # authenticated session is what counts here, so ignore it.
                pass
            else:
                self._error(replies.UNKNOWN_PARAMETER)
                return None
        return MailParams(size=size, body=body, smtputf8=smtputf8)

    def do_RCPT(self, arg: bytes) -> None:
        envelope = self._envelope
        if envelope is None:
            # Not counted: it follows every refused MAIL in a pipelined group.
            self._reply(replies.NEED_MAIL)
            return
        if arg[:3].upper() != b"TO:":
            self._error(replies.RCPT_SYNTAX)
            return
        smtputf8 = envelope.params.smtputf8
        if len(arg) + 7 > (MAIL_LINE_LIMIT_SMTPUTF8 if smtputf8 else MAIL_LINE_LIMIT):
            self._error(replies.LINE_TOO_LONG)
            return
        try:
            text = arg[3:].decode("utf-8").lstrip(" ")
        except UnicodeDecodeError:
            self._error(replies.INVALID_UTF8)
            return
        try:
            address, param_text = _parse_path(text)
            if address.lower() == "postmaster":
                address = "postmaster"
            else:
                _check_mailbox(address, smtputf8)
        except _AddressError as e:
            self._error(replies.NON_ASCII_ADDRESS if e.non_ascii else replies.BAD_RECIPIENT_SYNTAX)
            return
        if param_text:
            self._error(replies.UNKNOWN_PARAMETER)
            return
        key = address.lower()
        if key in self._recipient_keys:
            self._reply(replies.RECIPIENT_OK)  # already accepted: deliver once
            return
        if len(envelope.rcpt_to) >= self._settings.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)
            return

        def accepted(result: object) -> None:
            current = self._envelope
            if current is not None:
                self._envelope = current.with_recipient(address)
                self._recipient_keys.add(key)
            self._reply(replies.RECIPIENT_OK)

        self._ask(self._delegate.validate_to, (self.session, envelope, address), accepted)

    def do_DATA(self, arg: bytes) -> None:
        envelope = self._envelope
        if arg.strip():
            self._error(replies.NO_ARGUMENTS)
            return
        if envelope is None:
            self._reply(replies.NEED_MAIL)
            return
        if not envelope.rcpt_to:
            self._end_transaction()
            self._reply(replies.NO_VALID_RECIPIENTS)
            return

        def opened(receiver: Any) -> None:
            self._reader = _MessageReader(receiver, self._settings.max_message_size)
            self._arm(self._settings.data_block_timeout)
            self._reply(replies.START_MAIL_INPUT)

        def refused(failure: Failure) -> None:
            self._end_transaction()
            self._refused(failure)

        self._ask(self._delegate.open_message, (self.session, envelope), opened, refused)

    def _feed_message(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        rest = reader.feed(data)
        if rest is None:
            return
        self._reader = None
        if rest:
            self._buffer[:0] = rest
        if reader.error is not None:
            self._arm(self._settings.command_timeout)
            self._end_transaction()
            self._reply(reader.error)
            return
        self._finishing = reader
        self._arm(self._settings.data_end_timeout)
        self._ask(reader.receiver.finish, (), self._finished, self._finish_failed)

    def _message_done(self) -> None:
        self._finishing = None
        self._arm(self._settings.command_timeout)
        self._end_transaction()

    def _finished(self, reply: Reply) -> None:
        self._message_done()
        if isinstance(reply, Reply):
            self._reply(reply)
        else:
            log.error("finish() gave {result!r}, not a Reply", result=reply)
            self._reply(replies.INTERNAL_ERROR)

    def _finish_failed(self, failure: Failure) -> None:
        self._message_done()
        self._refused(failure)

    def do_RSET(self, arg: bytes) -> None:
        if arg.strip():
            self._error(replies.NO_ARGUMENTS)
            return
        self._end_transaction()
        self._reply(replies.RESET_OK)

    def do_NOOP(self, arg: bytes) -> None:
        self._reply(replies.OK)

    def do_QUIT(self, arg: bytes) -> None:
        self._close(replies.CLOSING)

    def do_VRFY(self, arg: bytes) -> None:
        if arg.strip():
            self._reply(replies.CANNOT_VRFY)
        else:
            self._error(replies.VRFY_SYNTAX)

    def do_EXPN(self, arg: bytes) -> None:
        self._reply(replies.EXPN_NOT_AVAILABLE)

    def do_HELP(self, arg: bytes) -> None:
        self._reply(replies.HELP)


def _b64decode(data: bytes) -> bytes | None:
    """Strict base64 (``=`` alone is the empty string), or None."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


# The named replies on the wire, built once.  Keyed by id: they are module
# constants that live as long as the process, so an id is never reused.
_WIRE = {id(value): value.to_bytes() for value in vars(replies).values() if isinstance(value, Reply)}

_COMMANDS: dict[bytes, _CommandHandler] = {
    name[3:].encode("ascii"): getattr(SMTPServerProtocol, name)
    for name in dir(SMTPServerProtocol)
    if name.startswith("do_")
}
