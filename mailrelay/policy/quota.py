"""
Daily sending quotas, per account, reset at midnight UTC.

Counts are stored (``daily_counts``, metric ``accepted``) so they hold
across worker processes and restarts.  To keep the database off the accept
path, each process adds its own acceptances in memory, flushes them in one
batch every ``flush_interval`` seconds, and re-reads the stored total at
most every ``refresh_interval`` seconds: across nodes a quota can be
overshot by what the other nodes accepted within one interval.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailrelay.storage.counters import Counters, utc_day
from mailrelay.types import Reply, SMTPReplyError

METRIC = "accepted"

log = Logger()


def quota_exceeded(now: float) -> SMTPReplyError:
    tomorrow = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)
    resets = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
    return SMTPReplyError(Reply(451, "4.7.1", f"Daily sending quota exceeded, resets at "
                                              f"{resets.strftime('%Y-%m-%d %H:%M UTC')}"))


class QuotaTracker:
    def __init__(self, counters: Counters, clock: IReactorTime, flush_interval: float = 1.0,
                 refresh_interval: float = 5.0) -> None:
        self._counters = counters
        self._clock = clock
        self._flush_interval = flush_interval
        self._refresh_interval = refresh_interval
        self._stored: dict[tuple[int, str], tuple[float, int]] = {}  # (account, day) -> (read at, value)
        self._local: dict[tuple[int, str], int] = {}  # accepted here, not yet flushed
        self._flushing: dict[tuple[int, str], int] = {}
        self._timer: IDelayedCall | None = None

    async def _stored_count(self, account_id: int, day: str) -> int:
        key = (account_id, day)
        now = self._clock.seconds()
        cached = self._stored.get(key)
        if cached is None or now - cached[0] > self._refresh_interval:
            value = await self._counters.get(account_id, day, METRIC)
            cached = (now, value)
            self._stored[key] = cached
        return cached[1]

    async def check(self, account_id: int, daily_quota: int | None, recipients: int) -> None:
        """Raise ``451 4.7.1`` when ``recipients`` more messages would exceed today's quota."""
        if daily_quota is None:
            return
        now = self._clock.seconds()
        day = utc_day(now)
        key = (account_id, day)
        used = await self._stored_count(account_id, day) + self._local.get(key, 0) + self._flushing.get(key, 0)
        if used + recipients > daily_quota:
            raise quota_exceeded(now)

    def add(self, account_id: int, count: int) -> None:
        """Count ``count`` accepted messages (one per recipient) for today."""
        key = (account_id, utc_day(self._clock.seconds()))
        self._local[key] = self._local.get(key, 0) + count
        if self._timer is None or not self._timer.active():
            self._timer = self._clock.callLater(self._flush_interval, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        ensureDeferred(self.flush()).addErrback(lambda f: log.failure("quota counters not flushed", f))

    async def flush(self) -> None:
        if not self._local:
            return
        batch, self._local = self._local, {}
        for key, n in batch.items():
            self._flushing[key] = self._flushing.get(key, 0) + n
        try:
            await self._counters.add([(a, day, "", METRIC, n) for (a, day), n in batch.items()])
        except BaseException:
            for key, n in batch.items():  # keep them for the next flush
                self._local[key] = self._local.get(key, 0) + n
            raise
        finally:
            for key, n in batch.items():
                self._flushing[key] -= n
                if not self._flushing[key]:
                    del self._flushing[key]
        for key in batch:
            self._stored.pop(key, None)  # re-read: the stored total now includes what we flushed

    def stop(self) -> Deferred[None]:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return ensureDeferred(self.flush())


