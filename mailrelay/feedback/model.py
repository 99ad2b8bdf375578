"""
What a bounce or complaint that came back to the relay says, as values.

The parsers fill these; the caller (the port 25 session's delivery hook)
turns them into events and suppressions.  ``FeedbackReport.outcome`` does
the deciding, so the rules for "what becomes what" live in one place next
to the data and every caller applies them the same way:

- a failed recipient is a ``bounced`` event with its class (hard, soft,
  block from ``mailrelay.delivery.classify``); only ``hard`` suppresses
  (reason ``hard_bounce``): ``block`` means the receiver refuses *us*, and
  the address may be fine;
- a delay notice (``Action: delayed``) is soft, never suppresses and makes
  no event: the message is still in a remote queue, and the final outcome
  arrives as another report or never;
- ``delivered``/``relayed``/``expanded`` are positive and make no event;
- an ARF report of type abuse or fraud is a ``complained`` event and a
  suppression with reason ``complaint``; virus and other are complaints
  without suppression; not-spam and auth-failure reports make no event;
- auto-replies and unknown messages make no event (the caller counts them).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from mailrelay.delivery.classify import Category, Classification
from mailrelay.events.model import EventType
from mailrelay.types import Reply

Kind = Literal["dsn", "arf", "nonstandard", "autoreply", "unknown"]
Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
SuppressionReason = Literal["hard_bounce", "complaint"]

ACTIONS: tuple[Action, ...] = ("failed", "delayed", "delivered", "relayed", "expanded")

#: ARF feedback types (RFC 5965 section 7.3, RFC 6591, RFC 6650) that are a recipient's complaint.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})
#: Complaints after which the relay must not mail the recipient again.
SUPPRESSING_TYPES = frozenset({"abuse", "fraud"})

_SEVERITY = {"hard": 0, "block": 1, "soft": 2}


@attrs.frozen
class RecipientStatus:
    """
    One per-recipient block of a DSN, or one address a text bounce names.

    ``recipient`` is the Final-Recipient (``""`` when the report names no
    address: with a VERP return path the relay still knows whom it was
    for).  ``status`` and ``diagnostic`` are as reported; ``reply`` is the
    SMTP reply rebuilt from them that ``classification`` was made from.
    """

    recipient: str
    action: Action
    status: str
    diagnostic: str
    reply: Reply
    classification: Classification
    original_recipient: str | None = None
    diagnostic_type: str | None = None
    remote_mta: str | None = None
    last_attempt: str | None = None
    will_retry_until: str | None = None

    @property
    def is_failure(self) -> bool:
        return self.action == "failed"

    @property
    def category(self) -> Category:
        """The class used for events: a delay or a positive action is never worse than soft."""
        return self.classification.category if self.is_failure else "soft"

    @property
    def suppress(self) -> bool:
        """True for a permanent failure of a dead mailbox or domain."""
        return self.is_failure and self.category == "hard"

    def matches(self, address: str) -> bool:
        wanted = address.strip().strip("<>").lower()
        return bool(wanted) and wanted in (self.recipient.lower(), (self.original_recipient or "").lower())


@attrs.frozen
class Complaint:
    """The machine-readable part of an ARF report (RFC 5965 section 3.1)."""

    feedback_type: str
    user_agent: str | None = None
    version: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: tuple[str, ...] = ()
    original_envelope_id: str | None = None
    source_ip: str | None = None
    arrival_date: str | None = None
    reporting_mta: str | None = None
    reported_domain: tuple[str, ...] = ()
    reported_uri: tuple[str, ...] = ()
    incidents: int | None = None
    authentication_results: str | None = None

    @property
    def is_complaint(self) -> bool:
        return self.feedback_type in COMPLAINT_TYPES

    @property
    def suppress(self) -> bool:
        return self.feedback_type in SUPPRESSING_TYPES


@attrs.frozen
class OriginalMessage:
    """
    What a report says about the message it is about: the embedded
    message or header block, plus the fields pulled out of it.  ARF
    reports often redact the recipient; ``to`` is then whatever the
    reporter left.
    """

    headers: tuple[tuple[str, str], ...] = ()
    message_id: str | None = None
    return_path: str | None = None
    from_address: str | None = None
    to: tuple[str, ...] = ()
    subject: str | None = None
    date: str | None = None

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@attrs.frozen
class Attribution:
    """
    Which message and recipient of this relay a report is about.

    ``source`` says where it was found: ``rcpt`` (the VERP envelope
    recipient, the normal case), ``original-mail-from`` (an ARF field),
    ``return-path`` (of the embedded message), ``report-text`` (a VERP
    address anywhere else in the report), ``list-unsubscribe`` or
    ``tracking-link`` (a signed tracking token in the embedded message,
    which also names the account).  Every source is a signed token, so a
    forged report cannot point at someone else's message.
    """

    queue_id: str
    recipient_index: int
    source: str
    domain: str | None = None
    account_id: int | None = None


@attrs.frozen
class Outcome:
    """
    What the caller should record for one report: an event type (None: no
    event), the bounce class, a suppression reason (None: do not suppress)
    and the event's detail.
    """

    event: EventType | None
    category: Category | None = None
    suppression: SuppressionReason | None = None
    address: str | None = None
    detail: dict[str, Any] = attrs.field(factory=dict, hash=False)


@attrs.frozen
class FeedbackReport:
    """
    Everything parsed from one message that came back to a bounce or
    feedback address.  ``reason`` is one sentence saying what was
    recognised (or, for ``unknown``, why nothing was); ``defects`` lists
    what was broken in the message and tolerated.
    """

    kind: Kind
    reason: str
    detector: str = ""
    attribution: Attribution | None = None
    recipients: tuple[RecipientStatus, ...] = ()
    complaint: Complaint | None = None
    original: OriginalMessage | None = None
    reporting_mta: str | None = None
    envelope_id: str | None = None
    subject: str | None = None
    sender: str | None = None
    defects: tuple[str, ...] = ()

    @property
    def queue_id(self) -> str | None:
        return self.attribution.queue_id if self.attribution else None

    @property
    def recipient_index(self) -> int | None:
        return self.attribution.recipient_index if self.attribution else None

    @property
    def failures(self) -> tuple[RecipientStatus, ...]:
        return tuple(r for r in self.recipients if r.is_failure)

    def primary(self, address: str | None = None) -> RecipientStatus | None:
        """
        The block that decides the outcome for one recipient: among the
        blocks naming ``address`` (the queue record's address for the VERP
        index) if any do, else among all, the worst failure (hard, then
        block, then soft), else the first delay, else the first block.
        A VERP return path names one recipient, so a report whose blocks
        all name other addresses (a forward, an alias) is still about it.
        """
        pool = self.recipients
        if address:
            named = tuple(r for r in pool if r.matches(address))
            pool = named or pool
        failures = [r for r in pool if r.is_failure]
        if failures:
            return min(failures, key=lambda r: _SEVERITY[r.category])
        delayed = [r for r in pool if r.action == "delayed"]
        if delayed:
            return delayed[0]
        return pool[0] if pool else None

    def outcome(self, address: str | None = None) -> Outcome:
        """What to record for the recipient this report is about (see the module docstring)."""
        base: dict[str, Any] = {"kind": self.kind, "detector": self.detector}
        if self.reporting_mta:
            base["reporting_mta"] = self.reporting_mta
        if self.kind == "arf" and self.complaint is not None:
            complaint = self.complaint
            detail = base | {
                "feedback_type": complaint.feedback_type,
                "user_agent": complaint.user_agent,
                "source_ip": complaint.source_ip,
            }
            found = address or (complaint.original_rcpt_to[0] if complaint.original_rcpt_to else None)
            if not complaint.is_complaint:
                return Outcome(None, address=found, detail=detail)
            return Outcome(
                EventType.COMPLAINED,
                suppression="complaint" if complaint.suppress else None,
                address=found,
                detail=detail,
            )
        if self.kind not in ("dsn", "nonstandard"):
            return Outcome(None, detail=base)
        block = self.primary(address)
        if block is None:
            return Outcome(None, detail=base)
        detail = base | {
            "class": block.category,
            "rule": block.classification.rule,
            "action": block.action,
            "status": block.status or block.reply.status,
            "reply": str(block.reply),
            "diagnostic": block.diagnostic,
            "remote_mta": block.remote_mta,
        }
        found = address or block.recipient or None
        if not block.is_failure:
            return Outcome(None, category=block.category, address=found, detail=detail)
        return Outcome(
            EventType.BOUNCED,
            category=block.category,
            suppression="hard_bounce" if block.suppress else None,
            address=found,
            detail=detail,
        )
