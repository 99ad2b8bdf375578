"""
What happens to mail that came back to the relay's VERP addresses: each
report is parsed, tied to the message and recipient it is about, and turned
into a ``bounced`` or ``complained`` event and, where the rules say so, a
suppression (hard bounce, abuse complaint).

The queue hands every message of the ``inbound`` route here once it is in
the spool, so a report is never lost to a crash; a report that cannot be
tied to a message is kept on disk and counted, never an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailrelay.events.model import Event
from mailrelay.feedback.report import parse_feedback
from mailrelay.interfaces import IEventSink

log = Logger()

# As long as the queue keeps a hard bounce found at delivery time.
SUPPRESSION_DAYS = {"hard_bounce": 180.0, "complaint": None}


class Recipient(Protocol):
    account_id: int
    queue_id: str
    address: str
    message_id: str | None
    transmission_id: str | None
    campaign_id: int | None
    tags: tuple[str, ...]


class Lookup(Protocol):
    async def recipient(self, queue_id: str, index: int) -> Any: ...


class Suppressor(Protocol):
    async def add(self, account_id: int, address: str, reason: str, scope: str = ..., detail: str | None = ...,
                  expires_at: float | None = ...) -> Any: ...


Keep = Callable[[str, Mapping[str, Any], bytes], "Deferred[None] | Awaitable[None] | None"]


class FeedbackHandler:
    """
    ``lookup`` turns (queue id, recipient index) into the recipient (the
    ``recipients`` and ``messages`` tables); ``secret`` verifies VERP
    tokens; ``keep`` stores reports that name no message of ours.
    """

    def __init__(self, lookup: Lookup, suppressions: Suppressor, events: IEventSink, secret: bytes,
                 clock: IReactorTime, keep: Keep | None = None, signer: Any = None) -> None:
        self._lookup = lookup
        self._suppressions = suppressions
        self._events = events
        self._secret = secret
        self._clock = clock
        self._keep = keep
        self._signer = signer
        self.counts = {"bounced": 0, "complained": 0, "ignored": 0, "unattributed": 0}

    def __call__(self, queue_id: str, envelope: Mapping[str, Any], data: bytes) -> Deferred[None]:
        return ensureDeferred(self.handle(queue_id, envelope, data))

    async def handle(self, queue_id: str, envelope: Mapping[str, Any], data: bytes) -> None:
        rcpts = list(envelope.get("inbound_rcpts") or []) or [""]
        for rcpt in rcpts:
            await self._one(queue_id, envelope, rcpt, data)

    async def _one(self, inbound_qid: str, envelope: Mapping[str, Any], rcpt: str, data: bytes) -> None:
        report = parse_feedback(data, rcpt, self._secret, signer=self._signer)
        attribution = report.attribution
        info = await self._lookup.recipient(attribution.queue_id, attribution.recipient_index) \
            if attribution is not None else None
        if info is None:
            self.counts["unattributed"] += 1
            log.info("feedback {qid} for {rcpt}: {kind} not tied to a message ({reason})", qid=inbound_qid,
                     rcpt=rcpt, kind=report.kind, reason=report.reason)
            if report.kind != "autoreply" and self._keep is not None:
                kept = self._keep(inbound_qid, envelope, data)
                if kept is not None:
                    await kept
            return
        outcome = report.outcome(info.address)
        if outcome.event is None:
            self.counts["ignored"] += 1
            log.info("feedback {qid}: {kind} about {orig} makes no event ({reason})", qid=inbound_qid,
                     kind=report.kind, orig=info.queue_id, reason=report.reason)
            return
        now = self._clock.seconds()
        detail = {**outcome.detail, "source": "inbound", "report": report.kind, "inbound_queue_id": inbound_qid}
        self._events.emit(Event(type=outcome.event, ts=now, account_id=info.account_id, queue_id=info.queue_id,
                                message_id=info.message_id, transmission_id=info.transmission_id,
                                recipient=info.address, campaign_id=info.campaign_id, tags=tuple(info.tags),
                                detail=detail))
        self.counts[outcome.event.value] = self.counts.get(outcome.event.value, 0) + 1
        if outcome.suppression is not None:
            days = SUPPRESSION_DAYS.get(outcome.suppression)
            await self._suppressions.add(
                info.account_id, info.address, outcome.suppression,
                detail=str(detail.get("reply") or detail.get("feedback_type") or report.reason)[:500],
                expires_at=now + days * 86400.0 if days else None,
            )
