"""
Reading stored events for the JSON API and the CLI.

Pages are cut by event id, not by offset, so a page boundary stays where
it was while new events arrive: pass ``page.cursor`` back to continue.
Ids follow insertion order; on PostgreSQL with several nodes a batch that
commits late can land behind a cursor already handed out, which matters to
a live tail (``mailrelay events --follow`` re-reads a short window), not to
paging through the past.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from mailrelay.events.model import Event, EventType
from mailrelay.events.sink import decode_tags
from mailrelay.storage.database import DatabasePool, Row

MAX_LIMIT = 10_000

_SELECT = (
    "SELECT id, ts, account_id, type, queue_id, message_id, transmission_id, recipient, campaign_id, tags,"
    " detail FROM events"
)


@attrs.frozen
class StoredEvent:
    """An event as stored, with its id (the cursor, and a key for webhook receivers)."""

    id: int
    event: Event

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **self.event.to_json()}


@attrs.frozen
class EventPage:
    """``cursor`` continues after the last event scanned; None when nothing more matched."""

    events: tuple[StoredEvent, ...]
    cursor: int | None


@attrs.frozen
class EventFilter:
    """Conditions that all hold; ``since`` is inclusive and ``until`` exclusive (Unix seconds)."""

    account_id: int | None = None
    types: frozenset[EventType] = frozenset()
    recipient: str | None = None
    campaign_id: int | None = None
    tag: str | None = None
    since: float | None = None
    until: float | None = None
    queue_id: str | None = None
    transmission_id: str | None = None
    message_id: str | None = None


def stored_from_row(row: Row) -> StoredEvent:
    """One ``events`` row (id, ts, account_id, type, ...) as a stored event; the webhooks read the same rows."""
    event = Event(
        type=EventType(row[3]),
        ts=float(row[1]),
        account_id=int(row[2]),
        queue_id=row[4],
        message_id=row[5],
        transmission_id=row[6],
        recipient=row[7],
        campaign_id=None if row[8] is None else int(row[8]),
        tags=decode_tags(row[9]),
        detail=json.loads(row[10]) if row[10] else {},
    )
    return StoredEvent(id=int(row[0]), event=event)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(f: EventFilter) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("account_id", f.account_id),
        ("recipient", f.recipient),
        ("campaign_id", f.campaign_id),
        ("queue_id", f.queue_id),
        ("transmission_id", f.transmission_id),
        ("message_id", f.message_id),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if f.types:
        values = sorted(t.value for t in f.types)
        clauses.append(f"type IN ({', '.join('?' * len(values))})")
        args.extend(values)
    if f.since is not None:
        clauses.append("ts >= ?")
        args.append(f.since)
    if f.until is not None:
        clauses.append("ts < ?")
        args.append(f.until)
    if f.tag is not None:
        # A superset (SQLite's LIKE ignores case); rows are checked exactly after.
        clauses.append("tags LIKE ? ESCAPE '\\'")
        args.append("%" + _like_escape(json.dumps(f.tag)) + "%")
    return clauses, args


class EventQueries:
    def __init__(self, pool: DatabasePool) -> None:
        self._pool = pool

    async def find(
        self, where: EventFilter, cursor: int | None = None, limit: int = 100, newest_first: bool = False
    ) -> EventPage:
        """
        Up to ``limit`` matching events after ``cursor`` in id order (before
        it, newest first, with ``newest_first``).  A page can hold fewer than
        ``limit`` and still have a cursor: keep going until it is None.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        clauses, args = _where(where)
        if cursor is not None:
            clauses.append("id < ?" if newest_first else "id > ?")
            args.append(cursor)
        sql = _SELECT + (" WHERE " + " AND ".join(clauses) if clauses else "")
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = await self._pool.execute("events_find", sql, (*args, limit + 1))
        scanned = [stored_from_row(r) for r in rows[:limit]]
        found = [s for s in scanned if where.tag is None or where.tag in s.event.tags]
        next_cursor = scanned[-1].id if len(rows) > limit else None
        return EventPage(events=tuple(found), cursor=next_cursor)

    async def history(
        self,
        queue_id: str | None = None,
        transmission_id: str | None = None,
        message_id: str | None = None,
        account_id: int | None = None,
    ) -> list[StoredEvent]:
        """
        Everything that happened to one message (by queue id, transmission id
        or Message-ID), oldest first; ``account_id`` confines it to an
        account, as the API must.
        """
        if queue_id is None and transmission_id is None and message_id is None:
            raise ValueError("a message history needs a queue id, a transmission id or a Message-ID")
        clauses, args = _where(
            EventFilter(
                account_id=account_id, queue_id=queue_id, transmission_id=transmission_id, message_id=message_id
            )
        )
        rows = await self._pool.execute(
            "events_history",
            _SELECT + " WHERE " + " AND ".join(clauses) + " ORDER BY ts, id LIMIT ?",
            (*args, MAX_LIMIT),
        )
        return [stored_from_row(r) for r in rows]

    async def newest_id(self) -> int:
        """The highest event id so far (0 when there is none)."""
        rows = await self._pool.execute("events_newest", "SELECT MAX(id) FROM events")
        return int(rows[0][0] or 0)


def parse_types(values: Sequence[str]) -> frozenset[EventType]:
    """Event type names, repeated or comma-separated; ValueError names the valid ones."""
    found: set[EventType] = set()
    for value in values:
        for name in filter(None, (v.strip().lower() for v in value.split(","))):
            try:
                found.add(EventType(name))
            except ValueError:
                valid = ", ".join(t.value for t in EventType)
                raise ValueError(f"unknown event type {name!r}: use {valid}")
    return frozenset(found)
