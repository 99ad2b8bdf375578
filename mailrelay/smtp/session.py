"""
The decisions of an SMTP session: the ``ISMTPDelegate`` the server
protocol asks, and the receiver that takes a message into the spool.

The protocol speaks SMTP; this module decides.  It authenticates through
the ``Authenticator``, applies the relay rules at RCPT, and at the end of
DATA runs the policy (account standing, sending domain, required headers,
control headers, quota) before committing the message to the spool.  Only
a committed (fsynced) message gets its 250.

Campaign and list attribution (``mailrelay.policy.attribution``) and the
expansion of list addresses (``<list guid>@<lists domain>``) are decided
when the header section is complete, because the spool writer is opened
with the final envelope and recipients.  While that lookup runs (usually
answered from the cache at once) the body is held in memory; after it the
body streams to the spool as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.config import Config
from mailrelay.events.writer import BatchWriter
from mailrelay.interfaces import IMessageReceiver, ISMTPDelegate, ISpool, ISpoolWriter
from mailrelay.policy.attribution import (
    NO_SUCH_LIST,
    Attributed,
    Attribution,
    UnknownCampaign,
    no_deliverable_members,
)
from mailrelay.policy.directory import SenderDirectory
from mailrelay.policy.quota import QuotaTracker
from mailrelay.policy.sender import Route, check_account, check_from_domain
from mailrelay.processing.controls import (
    MOOSEND_CAMPAIGN,
    MOOSEND_LIST,
    MT_ATTR,
    OWN_CAMPAIGN,
    OWN_LIST,
    ControlAttributes,
    PolicyHeaders,
    _display_name,
    fan_out,
    parse_control_headers,
    parse_policy_headers,
)
from mailrelay.processing.headers import message_date, parse_fields
from mailrelay.types import Envelope, MailParams, Principal, Reply, SessionInfo, SMTPReplyError, split_address, unique

log = Logger()

# A header section larger than this is refused (the body may be up to the SIZE limit).
MAX_HEADER_BYTES = 1024 * 1024

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section too large")
QUEUE_FULL = Reply(451, "4.3.1", "Queue full, try again later")
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary failure looking up campaign or list, try again later")


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
    attribution: Attribution | None = None

    def __attrs_post_init__(self) -> None:
        # Until the wiring passes one in, build it from the directory's store, so
        # attribution works with the current service.py; a directory without a
        # store (a test fake) means no attribution.
        if self.attribution is None:
            store = getattr(self.directory, "_store", None)
            if store is not None:
                self.attribution = Attribution(store, self.clock)

    def delegate(self) -> Session:
        return Session(self)


#: Fixed mailboxes on the bounce domain: feedback loops send complaints to ``fbl@``, and RFC 5321 and 2142 ask
#: for ``postmaster@`` and ``abuse@``.  Their mail goes to the feedback handler like a VERP address's.
FEEDBACK_MAILBOXES = frozenset({"fbl", "postmaster", "abuse"})


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
        principal = session.principal
        if principal is not None:
            attribution = self.submission.attribution
            if attribution is not None and domain == self.config.domains.lists_domain:
                return self._check_list_address(attribution, principal.account_id, local)  # type: ignore[return-value]
            return None
        # Without AUTH (port 25) only the relay's own addresses: never an open relay.
        if domain == self.config.domains.bounce_domain:
            if _is_verp(local) or local.lower() in FEEDBACK_MAILBOXES:
                return None
            raise SMTPReplyError(NO_SUCH_USER)
        if not domain and local.lower() == "postmaster":
            return None  # RFC 5321 section 4.5.1: <Postmaster> with no domain must be accepted
        raise SMTPReplyError(RELAY_DENIED)

    def _check_list_address(self, attribution: Attribution, account_id: int, local: str) -> Deferred[None]:
        """A list address is accepted only when the list is one of the account's own."""

        async def check() -> None:
            if await attribution.list_address(account_id, local) is None:
                raise SMTPReplyError(NO_SUCH_LIST)

        return ensureDeferred(check())

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
    date = message_date(now)
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
        self.attributed: Attributed | None = None
        self._headers_done = False
        self._body: list[bytes] = []  # body bytes that arrive while attribution is looked up
        self._preparing: Deferred[None] | None = None
        self._refusal: SMTPReplyError | None = None  # from attribution; sent after the account checks
        self._aborted = False
        self._expanded: tuple[str, ...] = ()  # list guids the message was sent to
        self._members: tuple[str, ...] = ()  # recipients to add to the attributed list

    # -- streaming ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
            return
        if self._error is not None or self._refusal is not None:
            return  # draining a message that will be refused
        if self._headers_done:
            self._body.append(bytes(data))  # attribution still being looked up
            return
        self._head += data
        # The header section ends at the first empty line; clients that send bare LF line
        # endings (smtplib with bytes, some PHP mailers) are taken as they are.
        match = _EMPTY_LINE.search(self._head)
        if match is not None:
            cut = _header_end(self._head, match)
            header_block, rest = bytes(self._head[:cut]), bytes(self._head[cut:])
            self._head = bytearray()
            self._open(header_block)
            if rest:
                self.write(rest)
        elif len(self._head) > MAX_HEADER_BYTES:
            self._head = bytearray()
            self._error = SMTPReplyError(HEADER_TOO_BIG)

    def _open(self, header_block: bytes) -> None:
        """Parse the header section and open the spool writer, or note why the message will be refused."""
        principal = self.session.principal
        if principal is None:
            # Mail for the relay's own addresses (bounces, complaints) goes to the feedback parser, which reads
            # any message. A sender's header policy does not apply: refusing a report would only lose it.
            with suppress(SMTPReplyError):
                self.headers = parse_policy_headers(header_block)
            self._headers_done = True
            self._start(header_block, tuple((r, "to") for r in unique(self.envelope.rcpt_to)), None)
            return
        try:
            self.headers = parse_policy_headers(header_block)
            self.controls = parse_control_headers(header_block)
        except SMTPReplyError as e:
            self._error = e
            return
        self._headers_done = True
        attribution = self.submission.attribution
        if attribution is None:
            copies = tuple((c.address, c.role) for c in fan_out(self.envelope.rcpt_to, self.controls))
            self._start(header_block, copies, None)
        else:
            self._preparing = ensureDeferred(self._attribute(attribution, principal.account_id, header_block))

    async def _attribute(self, attribution: Attribution, account_id: int, header_block: bytes) -> None:
        """
        Expand list addresses, decide campaign and list, then open the spool
        writer; a refusal is kept for the end of DATA (the body is drained).
        """
        lists_domain = self.submission.config.domains.lists_domain
        direct = [r for r in self.envelope.rcpt_to if split_address(r)[1] != lists_domain]
        list_rcpts = [r for r in self.envelope.rcpt_to if split_address(r)[1] == lists_domain]
        copies = [(c.address, c.role) for c in fan_out(direct, self.controls)]
        n_direct = len(copies)
        expanded = []
        try:
            seen = {a.lower() for a, _ in copies}
            for rcpt in list_rcpts:
                found = await attribution.list_address(account_id, split_address(rcpt)[0])
                if found is None:  # removed since RCPT
                    raise SMTPReplyError(NO_SUCH_LIST)
                expanded.append(found)
                for member in await attribution.expand(account_id, found):
                    if member.lower() not in seen:
                        seen.add(member.lower())
                        copies.append((member, "to"))
            if not copies:
                raise SMTPReplyError(no_deliverable_members(expanded[0].guid if expanded else "?"))
            campaign, mailing_list = _attribution_refs(header_block, self.controls)
            subject = self.headers.subject if self.headers else None
            first = expanded[0] if expanded else None
            try:
                self.attributed = await attribution.attribute(account_id, subject, campaign, mailing_list, first)
            except UnknownCampaign:
                if campaign is None or campaign[1] != "X-MT-ATTR":
                    raise
                # X-MT-ATTR's campaign_id is a free-form label for Mailtarget and
                # SparkPost: used when it names a campaign, otherwise not an error.
                self.attributed = await attribution.attribute(account_id, subject, None, mailing_list, first)
        except SMTPReplyError as e:
            self._refusal = e
        except Exception:
            log.failure("smtp: attribution lookup failed")
            self._refusal = SMTPReplyError(LOOKUP_FAILED)
        if self._refusal is not None or self._aborted:
            self._body = []
            return
        self._expanded = tuple(m.guid for m in expanded)
        # Archive copies are the sender's own records, not recipients of the send;
        # members of an expanded list are members already.
        self._members = tuple(a for a, role in copies[:n_direct] if role != "archive")
        self._start(header_block, tuple(copies), self.attributed)
        body, self._body = self._body, []
        for chunk in body:
            self.write(chunk)

    def _start(self, header_block: bytes, copies: tuple[tuple[str, str], ...], attributed: Attributed | None) -> None:
        """Open the spool writer with the final envelope and recipients, and write the header section."""
        self.recipients = tuple(address for address, _ in copies)
        route = self._route()
        envelope = self._spool_envelope(route, dict(copies), attributed)
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

    def _spool_envelope(self, route: str, roles: dict[str, str], attributed: Attributed | None) -> dict[str, Any]:
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
            "campaign_id": attributed.campaign_id if attributed else None,
            "campaign_guid": attributed.campaign_guid if attributed else None,
            "list_id": attributed.list_id if attributed else None,
            "list_guid": attributed.list_guid if attributed else None,
            "lists": list(self._expanded),
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
        if self._writer is None and self._error is None and not self._headers_done:
            if len(self._head) > MAX_HEADER_BYTES:
                self._error = SMTPReplyError(HEADER_TOO_BIG)
            else:
                # A message that is all header section (no empty line).
                header_block = bytes(self._head)
                if header_block and not header_block.endswith(b"\r\n"):
                    header_block += b"\r\n"
                self._head = bytearray()
                self._open(header_block)
        if self._preparing is not None:
            await self._preparing
        if self._error is not None:
            self.abort()
            raise self._error
        try:
            account_id = await self._check_policy()
            writer = self._writer
            assert writer is not None
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
        if self._refusal is not None:
            raise self._refusal
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
                    self.attributed.campaign_id if self.attributed else None,
                    self.attributed.list_id if self.attributed else None,
                    ",".join(self.controls.tags),
                    size,
                    len(self.recipients),
                    self.session.client_ip,
                    sub.node,
                    sub.clock.seconds(),
                )
            )
        if sub.attribution is not None and self.attributed is not None and self._members:
            sub.attribution.remember(self.attributed.list_id, self._members)

    def abort(self) -> None:
        self._aborted = True
        self._body = []
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



def _attribution_refs(
    header_block: bytes, controls: ControlAttributes
) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """
    The campaign and list references of a message with the header each came
    from (the one that wins: mailrelay's own over Moosend's over X-MT-ATTR),
    so a refusal names the header the client has to fix.
    """
    names = {f.lname for f in parse_fields(header_block) if f.name}
    campaign = list_ref = None
    if controls.campaign is not None:
        source = next((n for n in (OWN_CAMPAIGN, MOOSEND_CAMPAIGN) if n in names), MT_ATTR)
        campaign = (controls.campaign, _display_name(source))
    if controls.mailing_list is not None:
        source = OWN_LIST if OWN_LIST in names else MOOSEND_LIST
        list_ref = (controls.mailing_list, _display_name(source))
    return campaign, list_ref
