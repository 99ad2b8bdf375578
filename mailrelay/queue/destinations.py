"""
Per-destination concurrency with slow start and a dead-destination timer,
after Postfix's ``qmgr_queue.c`` and its concurrency feedback
(``SCHEDULER_README``: "concurrency feedback", "dead destination").

A destination (a recipient domain, or the one smarthost) starts with a small
window of parallel deliveries.  Every attempt that got an SMTP conversation
going (whatever the recipient's reply: a greylisting 451 still proves the
server talks) opens the window by ``1/window``, so it grows by one per
window's worth of successes, up to the configured limit.  Every connection or
handshake failure closes it by one.  A destination whose failures add up to
``cohort_limit`` "pseudo-cohorts" (``1/window`` per failure, so about one
window's worth of consecutive failures) is declared dead for ``dead_time``:
nothing is tried there until then, its queued recipients are deferred at
once (so they leave the active window), and the first attempt afterwards is
a single probe.

Why the window is a float: the increments are fractions, and rounding them
would either never grow or grow too fast.  ``slots`` is what callers use.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from mailrelay.delivery.model import DeliveryResult, DeliveryStatus

#: Where a new destination starts (Postfix's initial_destination_concurrency).
INITIAL_WINDOW = 5
#: Failed pseudo-cohorts before a destination is dead (destination_concurrency_failed_cohort_limit).
COHORT_LIMIT = 1.0


def is_connection_failure(result: DeliveryResult) -> bool:
    """
    Whether a deferred result says the *connection* failed (no route, refused,
    timeout, lost, TLS, greeting or EHLO refused) rather than the recipient.
    The client reports these with RFC 3463 network and routing codes
    (``4.4.x``), TLS codes (``4.7.4``, ``4.7.5``), a protocol error
    (``4.5.0``) or the server's ``421``; a non-4xx reply on a deferred
    result comes from a refused greeting or EHLO.
    """
    if result.status is not DeliveryStatus.DEFERRED:
        return False
    reply = result.reply
    if reply.code == 421 or not reply.is_transient:
        return True
    return reply.status.startswith("4.4.") or reply.status in ("4.7.4", "4.7.5", "4.5.0")


@attrs.define(eq=False)
class Destination:
    """
    The scheduling state of one destination.  ``jobs`` waits for a slot;
    ``active`` counts deliveries in progress.
    """

    key: str
    limit: int
    dead_time: float
    window: float = float(INITIAL_WINDOW)
    cohort_limit: float = COHORT_LIMIT
    active: int = 0
    failed_cohorts: float = 0.0
    dead_until: float | None = None
    last_failure: str | None = None
    delivered: int = 0
    failures: int = 0
    jobs: deque[Any] = attrs.field(factory=deque)

    def __attrs_post_init__(self) -> None:
        self.limit = max(1, self.limit)
        self.window = float(min(self.limit, max(1.0, self.window)))

    @property
    def slots(self) -> int:
        """How many more deliveries may start now (ignoring the dead timer)."""
        return max(0, int(self.window) - self.active)

    def dead(self, now: float) -> bool:
        return self.dead_until is not None and now < self.dead_until

    def can_start(self, now: float) -> bool:
        if self.dead_until is not None and now >= self.dead_until:
            self.revive()
        return not self.dead(now) and self.slots > 0

    def success(self) -> None:
        """Positive feedback: the server talked to us."""
        self.delivered += 1
        self.failed_cohorts = 0.0
        self.window = min(float(self.limit), self.window + 1.0 / self.window)

    def failure(self, now: float, reply: str | None = None) -> bool:
        """Negative feedback: a connection or handshake failed.  Returns True when this made it dead."""
        self.failures += 1
        self.last_failure = reply
        self.failed_cohorts += 1.0 / self.window
        self.window = max(1.0, self.window - 1.0)
        if self.failed_cohorts >= self.cohort_limit and not self.dead(now):
            self.dead_until = now + self.dead_time
            return True
        return False

    def revive(self) -> None:
        """The dead timer ran out (or an operator said retry): probe with one connection."""
        self.dead_until = None
        self.failed_cohorts = 0.0
        self.window = 1.0

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing running, nothing to remember: the entry may go."""
        return not self.jobs and self.active == 0 and self.dead_until is None

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "destination": self.key,
            "window": round(self.window, 2),
            "limit": self.limit,
            "active": self.active,
            "queued": len(self.jobs),
            "dead": self.dead(now),
            "dead_until": self.dead_until if self.dead(now) else None,
            "last_failure": self.last_failure,
            "delivered": self.delivered,
            "failures": self.failures,
        }
