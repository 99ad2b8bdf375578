"""
From a tracking token to the recipient it names.

Tokens carry the account, the queue id and the recipient's *index* in the
message (a few bytes instead of the address: tokens stay short and an
address never appears in a URL).  The address, Message-ID, transmission,
campaign, tags and mailing list come from the ``messages`` and
``recipients`` tables.  Results are cached: a popular message is opened
many times, and none of this changes after acceptance.

``seen`` answers "is this the first open/click of this recipient?".  A
small per-node set remembers recent ones; on a miss the events table is
asked, so a restart or another node's earlier open does not make a repeat
look like a first (events are written in batches, so an open in the last
second on another node can still be missed: ``first`` is a statistic, not
a guarantee).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import attrs

from mailrelay.storage.database import DatabasePool


@attrs.frozen
class RecipientInfo:
    """One recipient of one accepted message, as tracking events need it."""

    account_id: int
    queue_id: str
    index: int
    address: str
    message_id: str | None = None
    transmission_id: str | None = None
    campaign_id: int | None = None
    tags: tuple[str, ...] = ()
    list_guid: str | None = None
    list_name: str | None = None


class RecipientLookup(Protocol):
    async def recipient(self, queue_id: str, index: int) -> RecipientInfo | None:
        """The recipient number ``index`` of ``queue_id``, or None when unknown."""

    async def seen(self, event_type: str, queue_id: str, index: int) -> bool:
        """Whether an event of ``event_type`` was already recorded for this recipient (and remember it)."""


class _LRU:
    """A bounded mapping: the least recently used entry goes first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[object, object] = OrderedDict()

    def get(self, key: object) -> object | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: object, value: object) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)


class StoreRecipientLookup:
    """``RecipientLookup`` over the database (``messages``, ``recipients``, ``lists``, ``events``)."""

    def __init__(self, pool: DatabasePool, cache_size: int = 10000, seen_size: int = 100000) -> None:
        self._pool = pool
        self._cache = _LRU(cache_size)
        self._seen = _LRU(seen_size)

    async def recipient(self, queue_id: str, index: int) -> RecipientInfo | None:
        key = (queue_id, index)
        cached = self._cache.get(key)
        if isinstance(cached, RecipientInfo):
            return cached
        rows = await self._pool.execute(
            "tracking_recipient",
            "SELECT m.account_id, r.address, m.message_id_header, m.transmission_id, m.campaign_id, m.tags,"
            " l.guid, l.name FROM recipients r JOIN messages m ON m.queue_id = r.queue_id"
            " LEFT JOIN lists l ON l.id = m.list_id WHERE r.queue_id = ? AND r.rcpt_index = ?",
            (queue_id, index),
        )
        if not rows:
            return None
        r = rows[0]
        info = RecipientInfo(
            account_id=int(r[0]),
            queue_id=queue_id,
            index=index,
            address=r[1],
            message_id=r[2],
            transmission_id=r[3],
            campaign_id=None if r[4] is None else int(r[4]),
            tags=tuple(t for t in (r[5] or "").split(",") if t),
            list_guid=r[6],
            list_name=r[7],
        )
        self._cache.put(key, info)
        return info

    async def seen(self, event_type: str, queue_id: str, index: int) -> bool:
        key = (event_type, queue_id, index)
        if self._seen.get(key):
            return True
        self._seen.put(key, True)
        info = await self.recipient(queue_id, index)
        if info is None:
            return False
        rows = await self._pool.execute(
            "tracking_seen",
            "SELECT 1 FROM events WHERE queue_id = ? AND type = ? AND recipient = ? LIMIT 1",
            (queue_id, event_type, info.address),
        )
        return bool(rows)
