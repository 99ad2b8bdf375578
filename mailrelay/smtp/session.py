"""
The decisions of an SMTP session: the ``ISMTPDelegate`` the server
protocol asks, and the receiver that takes a message into the spool.

The protocol speaks SMTP; this module decides.  It authenticates through
the ``Authenticator``, applies the relay rules at RCPT, and at the end of
DATA runs the policy (account standing, sending domain, required headers,
control headers, quota) before committing the message to the spool.  Only
a committed (fsynced) message gets its 250.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.config import Config
from mailrelay.events.writer import BatchWriter
from mailrelay.interfaces import IMessageReceiver, ISMTPDelegate, ISpool, ISpoolWriter
from mailrelay.policy.directory import SenderDirectory
from mailrelay.policy.quota import QuotaTracker
from mailrelay.policy.sender import Route, check_account, check_from_domain
from mailrelay.processing.controls import (
    ControlAttributes,
    PolicyHeaders,
    fan_out,
    parse_control_headers,
    parse_policy_headers,
)
from mailrelay.types import Envelope, MailParams, Principal, Reply, SessionInfo, SMTPReplyError, split_address

log = Logger()

# A header section larger than this is refused (the body may be up to the SIZE limit).
MAX_HEADER_BYTES = 1024 * 1024

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section too large")
QUEUE_FULL = Reply(451, "4.3.1", "Queue full, try again later")


class Authenticator(Protocol):
    def authenticate(self, client_ip: str, mechanism: str, username: str, password: str) -> Deferred[Principal]: ...


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


@attrs.define
class Submission:
    """
    What every session of one process shares: configuration, the
    authenticator, cached policy facts, the quota, the spool and the
    batched record of accepted messages.  ``backpressure()`` returns a
    reply when new mail must wait (queue above its high-water mark, disk
    almost full); ``on_queued(queue_id)`` tells the queue about new mail.
    """

    config: Config
    clock: IReactorTime
    authenticator: Authenticator
    directory: SenderDirectory
    quota: QuotaTracker
    spool: ISpool
    messages: BatchWriter | None = None
    backpressure: Callable[[], Reply | None] = lambda: None
    on_queued: Callable[[str], None] = lambda queue_id: None
    node: str = ""

    def delegate(self) -> Session:
        return Session(self)


def _is_verp(local: str) -> bool:
    return local.lower().startswith("bounces+") and len(local) > len("bounces+")


@implementer(ISMTPDelegate)
class Session:
    """The decisions of one connection."""

    def __init__(self, submission: Submission) -> None:
        self.submission = submission
        self.config = submission.config

    def connection_made(self, session: SessionInfo) -> None:
        return None

    def connection_lost(self, session: SessionInfo) -> None:
        return None

    def authenticate(self, session: SessionInfo, mechanism: str, username: str, password: str) -> Deferred[Principal]:
        return self.submission.authenticator.authenticate(session.client_ip, mechanism, username, password)

    def validate_from(self, session: SessionInfo, address: str, params: MailParams) -> None:
        busy = self.submission.backpressure()
        if busy is not None:
            raise SMTPReplyError(busy)

    def validate_to(self, session: SessionInfo, envelope: Envelope, address: str) -> None:
        local, domain = split_address(address)
        if session.principal is not None:
            return None
        # Without AUTH (port 25) only the relay's own addresses: never an open relay.
        if domain == self.config.domains.bounce_domain:
            if _is_verp(local):
                return None
            raise SMTPReplyError(NO_SUCH_USER)
        raise SMTPReplyError(RELAY_DENIED)

    def open_message(self, session: SessionInfo, envelope: Envelope) -> IMessageReceiver:
        busy = self.submission.backpressure()
        if busy is not None:
            raise SMTPReplyError(busy)
        return MessageReceiver(self.submission, session, envelope)


def received_header(session: SessionInfo, queue_id: str, recipient: str | None, now: float) -> bytes:
    """The trace header this hop adds (RFC 5321 §4.4), without secrets."""
    helo = (session.helo or "unknown").replace("\r", "").replace("\n", "")[:255]
    protocol = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        protocol += "S"
    if session.principal is not None:
        protocol += "A"
    tls = (
        f"\r\n\t(using {session.tls_version or 'TLS'} with cipher {session.tls_cipher or 'unknown'})"
        if session.tls
        else ""
    )
    rcpt = f"\r\n\tfor <{recipient}>" if recipient else ""
    date = email.utils.formatdate(now, usegmt=True)
    text = (
        f"Received: from {helo} ([{session.client_ip}]){tls}\r\n\tby {session.server_hostname} (mailrelay)"
        f" with {protocol} id {queue_id}{rcpt};\r\n\t{date}\r\n"
    )
    return text.encode("utf-8", "replace")


@implementer(IMessageReceiver)
class MessageReceiver:
    """
    Takes one message.  The header section is held (bounded) until it is
    complete, parsed, and then the message streams into a spool writer
    opened with the full envelope; the body is never held whole.
    """

    def __init__(self, submission: Submission, session: SessionInfo, envelope: Envelope) -> None:
        self.submission = submission
        self.session = session
        self.envelope = envelope
        self._head = bytearray()
        self._writer: ISpoolWriter | None = None
        self._error: SMTPReplyError | None = None
        self._done = False
        self.headers: PolicyHeaders | None = None
        self.controls = ControlAttributes()
        self.recipients: tuple[str, ...] = ()

    # -- streaming ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
            return
        if self._error is not None:
            return  # draining a message that will be refused
        self._head += data
        # The header section ends at the first empty line; clients that send bare LF line
        # endings (smtplib with bytes, some PHP mailers) are taken as they are.
        match = _EMPTY_LINE.search(self._head)
        if match is not None:
            cut = _header_end(self._head, match)
            header_block, rest = bytes(self._head[:cut]), bytes(self._head[cut:])
            self._head = bytearray()
            self._open(header_block)
            if self._writer is not None:
                self._writer.write(rest)
        elif len(self._head) > MAX_HEADER_BYTES:
            self._head = bytearray()
            self._error = SMTPReplyError(HEADER_TOO_BIG)

    def _open(self, header_block: bytes) -> None:
        """Parse the header section and open the spool writer, or note why the message will be refused."""
        try:
            self.headers = parse_policy_headers(header_block)
            self.controls = parse_control_headers(header_block)
        except SMTPReplyError as e:
            self._error = e
            return
        if self.session.principal is None:
            copies: tuple[tuple[str, str], ...] = tuple((r, "to") for r in _distinct(self.envelope.rcpt_to))
        else:
            copies = tuple((c.address, c.role) for c in fan_out(self.envelope.rcpt_to, self.controls))
        self.recipients = tuple(address for address, _ in copies)
        route = self._route()
        envelope = self._spool_envelope(route, dict(copies))
        writer = self.submission.spool.open_message(envelope, self.recipients)
        now = self.submission.clock.seconds()
        only = self.recipients[0] if len(self.recipients) == 1 else None
        writer.write(received_header(self.session, writer.queue_id, only, now))
        writer.write(header_block)
        self._writer = writer

    def _route(self) -> str:
        if self.session.principal is None:
            return "inbound"
        assert self.headers is not None
        if self.headers.from_domain == self.submission.config.smtp.sandbox_domain:
            return Route.SANDBOX.value
        return Route.DELIVER.value

    def _spool_envelope(self, route: str, roles: dict[str, str]) -> dict[str, Any]:
        s, e, p = self.session, self.envelope, self.session.principal
        h = self.headers
        c = self.controls
        return {
            "v": 1,
            "route": route,
            "account_id": p.account_id if p else None,
            "account": p.account_name if p else None,
            "parent_id": p.parent_id if p else None,
            "credential": [p.credential_kind, p.credential_id] if p else None,
            "client_ip": s.client_ip,
            "helo": s.helo,
            "tls": s.tls_version if s.tls else None,
            "listener": s.listener,
            "mail_from": e.mail_from,
            "params": {"size": e.params.size, "body": e.params.body, "smtputf8": e.params.smtputf8},
            "received_at": self.submission.clock.seconds(),
            "from": h.from_address if h else None,
            "subject": h.subject if h else None,
            "message_id": h.message_id if h else None,
            "roles": {a: r for a, r in roles.items() if r != "to"},
            # Mail to VERP addresses: which ones, for the feedback handler.
            **({"inbound_rcpts": list(roles)} if route == "inbound" else {}),
            "controls": {
                "open_tracking": c.open_tracking,
                "click_tracking": c.click_tracking,
                "unsubscribe": c.unsubscribe,
                "cc": list(c.cc),
                "tags": list(c.tags),
                "campaign": c.campaign,
                "mailing_list": c.mailing_list,
                "list_unsubscribe": c.list_unsubscribe,
                "metadata": [list(m) for m in c.metadata],
            },
        }

    # -- end of data -------------------------------------------------------

    def finish(self) -> Deferred[Reply]:
        return ensureDeferred(self._finish())

    async def _finish(self) -> Reply:
        if self._writer is None and self._error is None:
            if len(self._head) > MAX_HEADER_BYTES:
                self._error = SMTPReplyError(HEADER_TOO_BIG)
            else:
                # A message that is all header section (no empty line).
                header_block = bytes(self._head)
                if header_block and not header_block.endswith(b"\r\n"):
                    header_block += b"\r\n"
                self._head = bytearray()
                self._open(header_block)
        if self._error is not None:
            self.abort()
            raise self._error
        writer = self._writer
        assert writer is not None and self.headers is not None
        try:
            account_id = await self._check_policy()
            queue_id: str = await writer.commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._record(queue_id, account_id, writer.size)
        self.submission.on_queued(queue_id)
        return queued(queue_id)

    async def _check_policy(self) -> int | None:
        principal = self.session.principal
        if principal is None:
            return None  # inbound mail for the relay's own addresses
        headers = self.headers
        assert headers is not None
        sub = self.submission
        account = check_account(await sub.directory.account(principal.account_id))
        verified = await sub.directory.verified_domains(principal.account_id)
        check_from_domain(principal, headers.from_domain, verified, sub.config.smtp.sandbox_domain)
        headers.require_recipients_headers()
        await sub.quota.check(account.id, account.daily_quota, len(self.recipients))
        return account.id

    def _record(self, queue_id: str, account_id: int | None, size: int) -> None:
        sub = self.submission
        principal = self.session.principal
        if account_id is not None:
            sub.quota.add(account_id, len(self.recipients))
        if sub.messages is not None and account_id is not None and principal is not None and self.headers:
            sub.messages.add(
                (
                    queue_id,
                    account_id,
                    principal.credential_id,
                    queue_id,
                    self.headers.message_id,
                    self.envelope.mail_from,
                    (self.headers.subject or "")[:998],
                    None,
                    None,
                    ",".join(self.controls.tags),
                    size,
                    len(self.recipients),
                    self.session.client_ip,
                    sub.node,
                    sub.clock.seconds(),
                )
            )

    def abort(self) -> None:
        if self._writer is not None and not self._done:
            writer, self._writer = self._writer, None
            writer.abort()
        self._head = bytearray()


# An empty line: the end of the header section (or a message with none at all).
_EMPTY_LINE = re.compile(rb"(?:^|\n)\r?\n")


def _header_end(head: bytearray, match: re.Match[bytes]) -> int:
    """Where the header block ends: after the last header line's line ending, before the empty line."""
    if match.start() == 0 and len(match.group()) <= 2 and match.group() != b"\n\n":
        return 0  # the message starts with the empty line: no header section
    return match.start() + 1


MESSAGE_COLUMNS = (
    "queue_id",
    "account_id",
    "credential_id",
    "transmission_id",
    "message_id_header",
    "mail_from",
    "subject",
    "campaign_id",
    "list_id",
    "tags",
    "size",
    "recipients",
    "client_ip",
    "node",
    "created_at",
)


def _distinct(addresses: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        if a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return tuple(out)
