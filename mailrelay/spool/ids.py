"""
Queue ids: 10 characters of milliseconds since the epoch and 8 characters of
randomness, both in Crockford base32 (digits and upper-case letters without
I, L, O, U).

Fixed width and an alphabet in ASCII order make ids sort by creation time as
plain strings; 40 random bits make two worker processes (or a restart in the
same millisecond) practically never collide, without any coordination; the
alphabet is safe in file names on every file system, case-insensitive ones
included.
"""

from __future__ import annotations

import os
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 10
RANDOM_CHARS = 8
LENGTH = TIME_CHARS + RANDOM_CHARS


def _base32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_queue_id(now: float, randbytes: Callable[[int], bytes] = os.urandom) -> str:
    """A fresh queue id for a message created at ``now`` (POSIX seconds)."""
    millis = max(0, int(now * 1000)) & ((1 << (5 * TIME_CHARS)) - 1)
    rand = int.from_bytes(randbytes(5), "big")
    return _base32(millis, TIME_CHARS) + _base32(rand, RANDOM_CHARS)


def is_queue_id(text: str) -> bool:
    """Whether ``text`` looks like a queue id (guards file names built from ids)."""
    return len(text) == LENGTH and all(c in ALPHABET for c in text)


def queue_id_time(queue_id: str) -> float:
    """The creation time encoded in ``queue_id``, in POSIX seconds."""
    return _decode(queue_id[:TIME_CHARS]) / 1000.0


def _decode(text: str) -> int:
    value = 0
    for c in text:
        value = value * 32 + ALPHABET.index(c)
    return value


class QueueIds:
    """
    Queue ids that also sort in creation order within one process: an id
    made in the same millisecond as the previous one (or after the clock
    stepped back) is the previous one plus one, as in monotonic ULIDs.
    """

    def __init__(self, randbytes: Callable[[int], bytes] = os.urandom) -> None:
        self._randbytes = randbytes
        self._last = ""

    def __call__(self, now: float) -> str:
        qid = new_queue_id(now, self._randbytes)
        if qid <= self._last:
            qid = _base32(_decode(self._last) + 1, LENGTH)
        self._last = qid
        return qid
