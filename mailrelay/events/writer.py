"""
Batched inserts: rows collected in memory and written with one multi-row
``INSERT`` per batch, so the SMTP and delivery paths never wait on the
database (a round trip costs more than the whole accept otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailrelay.storage.database import DatabasePool, Transaction

log = Logger()


class BatchWriter:
    """
    Appends rows to ``table``; a batch goes out after ``interval`` seconds
    or when ``max_rows`` are waiting.  A failed batch is kept and retried
    with the next one (bounded by ``max_pending``; beyond it the oldest rows
    are dropped and counted in ``dropped``).
    """

    def __init__(self, pool: DatabasePool, clock: IReactorTime, table: str, columns: Sequence[str],
                 interval: float = 0.5, max_rows: int = 500, max_pending: int = 100_000,
                 conflict: str = "") -> None:
        self._pool = pool
        self._clock = clock
        self._sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
        self._conflict = conflict
        self._width = len(columns)
        self._interval = interval
        self._max_rows = max_rows
        self._max_pending = max_pending
        self._rows: list[tuple[Any, ...]] = []
        self._timer: IDelayedCall | None = None
        self._running: Deferred[bool] | None = None
        self._stopped = False
        self.written = 0
        self.dropped = 0

    def add(self, row: Sequence[Any]) -> None:
        if len(row) != self._width:
            raise ValueError(f"expected {self._width} values, got {len(row)}")
        self._rows.append(tuple(row))
        if len(self._rows) > self._max_pending:
            excess = len(self._rows) - self._max_pending
            del self._rows[:excess]
            self.dropped += excess
            log.warn("database behind: dropped {n} rows of {sql}", n=excess, sql=self._sql)
        if len(self._rows) >= self._max_rows and self._running is None:
            self._start_flush()
        elif self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(self._interval, self._start_flush)

    def _start_flush(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is None:
            d = ensureDeferred(self._flush_all())
            if not d.called:  # a flush that finished at once must not be waited for later
                self._running = d
                d.addBoth(self._flushed)

    def _flushed(self, result: object) -> None:
        self._running = None
        if self._rows and self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(self._interval, self._start_flush)

    async def _flush_all(self, everything: bool = False) -> bool:
        """
        Write what waits, batch by batch; False when the database refused one
        (kept for later).  Unless ``everything``, stop once less than a full
        batch is left: the rest waits for the interval, so a busy relay makes
        a few large transactions a second, not one per write's duration.
        """
        while self._rows:
            batch, self._rows = self._rows[: self._max_rows], self._rows[self._max_rows :]
            try:
                await self._write(batch)
            except Exception:
                log.failure("batch insert failed; retrying with the next batch")
                self._rows[:0] = batch
                return False
            self.written += len(batch)
            if not everything and len(self._rows) < self._max_rows:
                break
        return True

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        group = "(" + ", ".join("?" * self._width) + ")"

        async def txn_fn(txn: Transaction) -> None:
            sql = f"{self._sql} {', '.join([group] * len(batch))}"
            if self._conflict:
                sql += " " + self._conflict
            await txn.execute(sql, [v for row in batch for v in row])

        await self._pool.interaction("batch_insert", txn_fn)

    async def flush(self) -> None:
        """Write everything waiting now (at shutdown, and in tests); one attempt, no retry loop."""
        if self._running is not None:
            await self._running
        if self._rows:
            await self._flush_all(everything=True)

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        await self.flush()
