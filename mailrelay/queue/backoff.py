"""
Retry arithmetic, as pure functions with injectable jitter (the shape of
Twisted's ``backoffPolicy`` in ``twisted.application._client_service``).

Delays double from ``retry_min`` up to ``retry_max``.  Jitter spreads each
delay by ``±spread`` of itself and the result is clamped to
``[retry_min, retry_max]`` again, so a whole deferred queue that failed at
once (a destination down for an hour) does not come due in the same second
when it recovers: Postfix's backoff has no jitter, and its deferred queue
arrives as a wave.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Jitter = Callable[[], float]  # uniform in [0, 1)


def retry_delay(
    attempts: int,
    retry_min: float,
    retry_max: float,
    *,
    factor: float = 2.0,
    spread: float = 0.2,
    jitter: Jitter = random.random,
) -> float:
    """
    Seconds to wait after the ``attempts``-th failed attempt (1 for the
    first): ``retry_min * factor**(attempts-1)``, at most ``retry_max``,
    then multiplied by a factor in ``[1-spread, 1+spread)`` drawn from
    ``jitter()``, then clamped to ``[retry_min, retry_max]``.
    """
    if retry_min <= 0 or retry_max < retry_min:
        raise ValueError("need 0 < retry_min <= retry_max")
    exponent = max(0, attempts - 1)
    # Compare in the exponent, not by computing factor**exponent: a message
    # retried for days would overflow a float.
    base = retry_max
    if factor <= 1.0 or exponent < 64:
        base = min(retry_max, retry_min * factor**exponent)
    delay = base * (1.0 + spread * (2.0 * jitter() - 1.0))
    return max(retry_min, min(retry_max, delay))


def backoff_policy(
    retry_min: float,
    retry_max: float,
    *,
    factor: float = 2.0,
    spread: float = 0.2,
    jitter: Jitter = random.random,
) -> Callable[[int], float]:
    """``retry_delay`` with its settings bound: ``policy(attempts) -> seconds``."""
    if retry_min <= 0 or retry_max < retry_min:
        raise ValueError("need 0 < retry_min <= retry_max")

    def policy(attempts: int) -> float:
        return retry_delay(attempts, retry_min, retry_max, factor=factor, spread=spread, jitter=jitter)

    return policy


def next_attempt_time(now: float, delay: float, created: float, max_age: float) -> float:
    """
    When to try again: ``now + delay``, but never after the message's
    expiry (``created + max_age``), so the last attempt happens on time and
    a message that still fails then is bounced on time too, instead of up
    to ``retry_max`` late.
    """
    return max(now, min(now + delay, created + max_age))


def expired(now: float, created: float, max_age: float) -> bool:
    """Whether a message accepted at ``created`` has been queued for ``max_age`` or longer."""
    return now - created >= max_age
