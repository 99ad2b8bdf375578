"""
Value types of the delivery stage: where a message goes (``Destination``),
how to talk to it (``TLSPolicy``, ``Credentials``, ``Timeouts``), what to
send (``OutboundMessage``) and what happened (``DeliveryResult``).

They are frozen attrs classes so the queue can keep, compare and hash them
(the connection pool is keyed by them); nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Literal

import attrs

from mailrelay.types import Reply

#: Something that yields the message body in chunks.  A callable (not an
#: iterator) so the client can start over on the next MX host.
BodyFactory = Callable[[], Iterable[bytes] | AsyncIterable[bytes]]


class DeliveryStatus(enum.Enum):
    """What became of one recipient in one delivery attempt."""

    DELIVERED = "delivered"  # the remote accepted responsibility
    DEFERRED = "deferred"  # try again later
    FAILED = "failed"  # permanent: bounce


@attrs.frozen
class DeliveryResult:
    """
    The outcome for one recipient.  ``reply`` is the remote's reply (or a
    synthetic one for connection-level failures); ``mx_host``/``ip`` name
    the server that gave it (``None`` when no connection was made).
    """

    recipient: str
    status: DeliveryStatus
    reply: Reply
    mx_host: str | None = None
    ip: str | None = None
    tls: bool = False


@attrs.frozen(repr=False)
class Credentials:
    """AUTH credentials for a smarthost; the password stays out of ``repr``."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


@attrs.frozen
class TLSPolicy:
    """
    How hard to insist on TLS, after Postfix's ``smtp_tls_security_level``:

    - ``none``: never STARTTLS;
    - ``may``: STARTTLS when offered, certificate not checked (most MX
      certificates do not match the MX name, and checking would only push
      the message to plaintext elsewhere);
    - ``encrypt``: like ``may`` but a server without STARTTLS is a failure;
    - ``verify``: ``encrypt`` plus a certificate valid for ``verify_hostname``
      (default: the host's name) under ``trust_root`` (default: the
      platform's trust store).

    A failed handshake is never retried in plaintext on the same host.
    """

    level: Literal["none", "may", "encrypt", "verify"] = "may"
    verify_hostname: str | None = None
    trust_root: object = attrs.field(default=None, eq=False, hash=False)  # IOpenSSLTrustRoot

    @property
    def required(self) -> bool:
        return self.level in ("encrypt", "verify")


@attrs.frozen
class MXHost:
    """One server to try: its name, MX preference, addresses and port."""

    name: str
    preference: int = 0
    addresses: tuple[str, ...] = ()  # empty: connect by name (a smarthost)
    port: int = 25


@attrs.frozen
class Destination:
    """
    Where to deliver mail for ``domain``: hosts in the order to try them.

    ``kind`` is ``mx`` (MX records), ``implicit`` (no MX: the domain's own
    addresses, RFC 5321 §5.1), ``literal`` (``[192.0.2.1]``) or
    ``smarthost``.  ``tls`` and ``credentials`` of ``None`` mean the
    client's defaults for MX delivery.
    """

    domain: str
    hosts: tuple[MXHost, ...]
    kind: Literal["mx", "implicit", "literal", "smarthost"] = "mx"
    tls: TLSPolicy | None = None
    credentials: Credentials | None = None


class DestinationError(Exception):
    """
    MX resolution gave no host to try.  ``reply`` says why;
    ``reply.is_permanent`` tells the queue to bounce rather than retry.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent


class PermanentDestinationError(DestinationError):
    """NXDOMAIN, null MX, no address at all: bounce."""


class TemporaryDestinationError(DestinationError):
    """SERVFAIL, timeouts: retry later."""


@attrs.frozen
class Timeouts:
    """
    Seconds to wait for each reply, RFC 5321 §4.5.3.2 by default.  ``idle``
    is how long a pooled connection waits for another message.
    """

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    auth: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 120.0
    quit: float = 10.0
    idle: float = 5.0


def _as_factory(body: bytes | BodyFactory) -> BodyFactory:
    if isinstance(body, bytes):
        data = body
        return lambda: (data,)
    return body


def _header_section(data: bytes) -> bytes:
    # A bare-LF empty line counts only before the CRLF one: searching the whole
    # body of a CRLF message for ``\n\n`` would read every octet for nothing.
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n", 0, len(data) if crlf < 0 else crlf)
    end = crlf if lf < 0 else lf
    return data if end < 0 else data[:end]


@attrs.frozen
class OutboundMessage:
    """
    One message for one destination: envelope and a body that can be read
    again from the start for each host tried.

    ``eight_bit`` asks for ``BODY=8BITMIME``; ``smtputf8`` says the message
    needs ``SMTPUTF8`` (UTF-8 headers or addresses).  ``size`` is announced
    with ``SIZE=`` and checked against the server's limit.  Build one from
    bytes with ``OutboundMessage.from_bytes`` to have them computed.
    """

    mail_from: str
    recipients: tuple[str, ...]
    body: BodyFactory = attrs.field(converter=_as_factory)
    size: int | None = None
    eight_bit: bool = False
    smtputf8: bool = False

    @classmethod
    def from_bytes(cls, mail_from: str, recipients: Iterable[str], data: bytes) -> OutboundMessage:
        recipients = tuple(recipients)
        utf8 = not (mail_from.isascii() and all(r.isascii() for r in recipients) and _header_section(data).isascii())
        return cls(
            mail_from=mail_from,
            recipients=recipients,
            body=data,
            size=len(data),
            eight_bit=not data.isascii(),
            smtputf8=utf8,
        )

    def with_recipients(self, recipients: Iterable[str]) -> OutboundMessage:
        recipients = tuple(recipients)
        # The usual case, every recipient still pending, needs no copy (evolve is not cheap).
        return self if recipients == self.recipients else attrs.evolve(self, recipients=recipients)
