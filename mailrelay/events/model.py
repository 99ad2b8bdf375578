"""
What happened to a message: one ``Event`` per step and recipient.

Every stage reports through ``IEventSink.emit``; the events stage stores
them in batches, rolls them up into statistics and hands them to webhooks.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs


class EventType(enum.Enum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"  # detail["class"]: "hard" | "soft" | "block"
    SUPPRESSED = "suppressed"
    SANDBOXED = "sandboxed"
    OPENED = "opened"  # detail["first"], detail["proxy"]
    CLICKED = "clicked"  # detail["url"], detail["first"]
    UNSUBSCRIBED = "unsubscribed"
    COMPLAINED = "complained"


@attrs.frozen
class Event:
    """
    ``queue_id`` identifies the accepted message on this relay,
    ``message_id`` its Message-ID header, ``transmission_id`` the group of
    copies (cc/bcc/archive) it belongs to.  ``detail`` holds what is
    specific to the type (the remote reply, MX host, link, user agent...).
    """

    type: EventType
    ts: float
    account_id: int
    queue_id: str | None = None
    message_id: str | None = None
    transmission_id: str | None = None
    recipient: str | None = None
    campaign_id: int | None = None
    tags: tuple[str, ...] = ()
    detail: dict[str, Any] = attrs.field(factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type.value, "ts": self.ts, "account_id": self.account_id, "queue_id": self.queue_id,
            "message_id": self.message_id, "transmission_id": self.transmission_id, "recipient": self.recipient,
            "campaign_id": self.campaign_id, "tags": list(self.tags), "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(type=EventType(data["type"]), ts=float(data["ts"]), account_id=int(data["account_id"]),
                   queue_id=data.get("queue_id"), message_id=data.get("message_id"),
                   transmission_id=data.get("transmission_id"), recipient=data.get("recipient"),
                   campaign_id=data.get("campaign_id"), tags=tuple(data.get("tags") or ()),
                   detail=dict(data.get("detail") or {}))
