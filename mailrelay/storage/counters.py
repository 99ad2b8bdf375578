"""
Daily counters per account (quota, statistics roll-ups).

Increments are upserts, so several nodes sharing PostgreSQL add up
correctly without reading first.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from mailrelay.storage.database import DatabasePool, Transaction


@functools.lru_cache(maxsize=4)
def _day(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(days * 86400))


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of ``ts`` in UTC (asked several times per message: cached per day)."""
    return _day(int(ts // 86400))


class Counters:
    def __init__(self, pool: DatabasePool) -> None:
        self._pool = pool

    async def add(self, increments: Iterable[tuple[int, str, str, str, int]]) -> None:
        """Apply ``(account_id, day, dimension, metric, n)`` increments in one transaction."""
        merged: dict[tuple[int, str, str, str], int] = {}
        for account_id, day, dimension, metric, n in increments:
            key = (account_id, day, dimension, metric)
            merged[key] = merged.get(key, 0) + n
        if not merged:
            return

        async def txn_fn(txn: Transaction) -> None:
            for (account_id, day, dimension, metric), n in sorted(merged.items()):
                await txn.execute(
                    "INSERT INTO daily_counts (account_id, day, dimension, metric, value) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (account_id, day, dimension, metric) DO UPDATE SET"
                    " value = daily_counts.value + excluded.value",
                    (account_id, day, dimension, metric, n),
                )

        await self._pool.interaction("counters_add", txn_fn)

    async def get(self, account_id: int, day: str, metric: str, dimension: str = "") -> int:
        rows = await self._pool.execute("counters_get", "SELECT value FROM daily_counts WHERE account_id = ?"
                                        " AND day = ? AND dimension = ? AND metric = ?",
                                        (account_id, day, dimension, metric))
        return int(rows[0][0]) if rows else 0
