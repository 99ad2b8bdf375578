"""
The ``recipients`` table: each queued recipient's address by queue id and
index, with its latest delivery state.

Tracking tokens and VERP return paths name a recipient by its *index* in
the message (short tokens, no address in URLs), so the web tier and the
bounce handler need this table to turn ``(queue_id, index)`` back into an
address, also long after the message has left the spool.  The spool is the
authority on delivery state; these rows are a copy for people and APIs, so
they are written in batches and never waited for.

Rows are kept in a dict by key until the next flush, so a recipient that
changes state twice within one interval is written once (a multi-row
``INSERT ... ON CONFLICT DO UPDATE`` may not name one row twice in
PostgreSQL anyway).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

_COLUMNS = "(queue_id, rcpt_index, address, state, attempts, last_reply, updated_at)"
_UPSERT = (
    " ON CONFLICT (queue_id, rcpt_index) DO UPDATE SET address = excluded.address, state = excluded.state,"
    " attempts = excluded.attempts, last_reply = excluded.last_reply, updated_at = excluded.updated_at"
)

Row = tuple[str, int, str, str, int, str | None, float]


class RecipientRecords:
    """Coalescing, batched upserts into ``recipients``; ``put`` never blocks."""

    def __init__(
        self, pool: Any, clock: IReactorTime, interval: float = 1.0, max_rows: int = 500, max_pending: int = 200_000
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._interval = interval
        self._max_rows = max_rows
        self._max_pending = max_pending
        self._rows: dict[tuple[str, int], Row] = {}
        self._timer: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self.written = 0
        self.dropped = 0

    def put(
        self, queue_id: str, index: int, address: str, state: str, attempts: int = 0, last_reply: str | None = None
    ) -> None:
        key = (queue_id, index)
        if key not in self._rows and len(self._rows) >= self._max_pending:
            self.dropped += 1
            return
        reply = last_reply[:1000] if last_reply else None
        self._rows[key] = (queue_id, index, address, state, attempts, reply, self._clock.seconds())
        if len(self._rows) >= self._max_rows and self._running is None:
            self._start()
        elif self._timer is None and self._running is None:
            self._timer = self._clock.callLater(self._interval, self._start)

    def _start(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is None:
            d = ensureDeferred(self._flush_all())
            if not d.called:  # a synchronous pool finishes (and clears _running) before we get here
                self._running = d

    async def _flush_all(self) -> None:
        try:
            while self._rows:
                keys = list(self._rows)[: self._max_rows]
                batch = [self._rows.pop(k) for k in keys]
                try:
                    await self._write(batch)
                except Exception:
                    log.failure("writing recipient rows failed; retrying later")
                    for row in batch:
                        self._rows.setdefault((row[0], row[1]), row)
                    break
                self.written += len(batch)
        finally:
            self._running = None
            if self._rows and self._timer is None:
                self._timer = self._clock.callLater(self._interval, self._start)

    async def _write(self, batch: list[Row]) -> None:
        group = "(?, ?, ?, ?, ?, ?, ?)"
        sql = f"INSERT INTO recipients {_COLUMNS} VALUES {', '.join([group] * len(batch))}{_UPSERT}"
        await self._pool.execute("queue_recipients", sql, [v for row in batch for v in row])

    async def flush(self) -> None:
        while self._running is not None:
            await self._running
        if self._rows:
            self._start()
            while self._running is not None:
                await self._running

    async def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        await self.flush()
