"""
Value types the spool hands to the queue: per-recipient delivery state, a
spooled message as recovered or listed, statistics, and the spool's errors.

They are frozen so the queue can keep them while the spool moves on; the
spool replaces a message's state tuple on every change instead of editing it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs


class Status(enum.Enum):
    """Where one recipient of a spooled message stands."""

    PENDING = "p"  # never tried
    DEFERRED = "d"  # tried, failed transiently, will be tried again
    DELIVERED = "s"  # final: accepted by the next hop
    BOUNCED = "b"  # final: failed permanently (or expired); a DSN is the queue's business

    @property
    def is_final(self) -> bool:
        return self in (Status.DELIVERED, Status.BOUNCED)


@attrs.frozen
class RecipientState:
    """
    The durable state of one recipient.  ``attempts``, ``next_attempt``
    (POSIX seconds) and ``last_reply`` are what the scheduler needs after a
    restart to keep its backoff instead of hammering a destination again.
    """

    status: Status = Status.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_reply: str | None = None

    @classmethod
    def delivered(cls, reply: str | None = None, attempts: int = 1) -> RecipientState:
        return cls(Status.DELIVERED, attempts, None, reply)

    @classmethod
    def bounced(cls, reply: str | None = None, attempts: int = 1) -> RecipientState:
        return cls(Status.BOUNCED, attempts, None, reply)

    @classmethod
    def deferred(cls, attempts: int, next_attempt: float, reply: str | None = None) -> RecipientState:
        return cls(Status.DEFERRED, attempts, next_attempt, reply)

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def to_json(self) -> list[Any]:
        return [self.status.value, self.attempts, self.next_attempt, self.last_reply]

    @classmethod
    def from_json(cls, raw: list[Any]) -> RecipientState:
        status, attempts, next_attempt, reply = raw
        return cls(Status(status), int(attempts), next_attempt, reply)


PENDING = RecipientState()


@attrs.frozen
class SpooledMessage:
    """
    One live (committed, not finished) message.  ``envelope`` is the dict
    given to ``open_message``; treat it as read-only.  ``held`` messages
    stay in the spool but must not be scheduled until released.
    """

    queue_id: str
    envelope: Mapping[str, Any]
    recipients: tuple[str, ...]
    states: tuple[RecipientState, ...]
    size: int
    created: float
    held: bool = False

    def state_of(self, recipient: str) -> RecipientState:
        return self.states[self.recipients.index(recipient)]

    @property
    def pending_recipients(self) -> tuple[str, ...]:
        """Recipients still to be delivered (pending or deferred)."""
        return tuple(r for r, s in zip(self.recipients, self.states, strict=True) if not s.is_final)


@attrs.frozen
class SpoolStats:
    """Counters for metrics and ``mailrelay queue`` (bytes are on disk)."""

    messages: int
    held: int
    recipients: Mapping[str, int]  # Status.name.lower() -> count, live messages only
    body_bytes: int  # bodies of live messages
    disk_bytes: int  # segments + large-message files + journals
    segments: int
    large_files: int
    commits: int  # since start
    syncs: int  # group-commit fsync rounds since start


class SpoolError(Exception):
    """The spool cannot do what was asked (failed disk, closed, not recovered)."""


class SpoolLockedError(SpoolError):
    """Another process holds the spool directory."""


class UnknownMessage(KeyError):
    """No live message has this queue id (never committed, finished or deleted)."""
