"""
Group commit: one fsync round makes every write that was pending when it
started durable.

Appending to a file that exists and fsyncing it costs ~150 us on the disks we
measured, so one fsync per message caps a spool at ~7,000 commits/s at best,
and a fresh file per message at ~600/s.  Instead, writers append (in the
reactor thread, into the page cache), mark the file dirty and wait; the first
waiter schedules a round on the next reactor turn, the round fsyncs every
dirty file in a worker thread, and everything that arrives while it runs
waits for the next round.  Under load a round carries as many commits as
arrived during one fsync, which is what turns a per-message cost into a per-
batch cost; when idle, a lone commit waits for one fsync only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailrelay.spool.model import SpoolError


class GroupCommitter:
    """
    Batches fsyncs of the files marked dirty; ``after_round`` is called in the
    reactor after every successful round (the spool closes sealed files there).

    A failed fsync is not retried: after fsync reports an error the kernel may
    already have dropped the dirty pages, so nothing written before can be
    trusted to be on disk.  Every waiter fails and so does every later wait,
    until the process restarts and recovers from what is really on disk.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        fsync: Callable[[int], None] = os.fsync,
        after_round: Callable[[], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self._fsync = fsync
        self._after_round = after_round
        self._dirty: dict[int, None] = {}  # an ordered set of fds
        self._in_flight: frozenset[int] = frozenset()
        self._waiters: list[Deferred[None]] = []
        self._scheduled = False
        self._running = False
        self._idle_waiters: list[Deferred[None]] = []
        self.failure: Failure | None = None
        self.rounds = 0
        self.fsync_calls = 0

    def mark(self, fd: int) -> None:
        """``fd`` has writes that the next round must make durable."""
        self._dirty[fd] = None

    def busy(self, fd: int) -> bool:
        """Whether ``fd`` still has to be (or is being) synced, so must stay open."""
        return fd in self._dirty or fd in self._in_flight

    def wait(self) -> Deferred[None]:
        """Fires once a round started after this call has finished."""
        if self.failure is not None:
            return fail(self.failure)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if not self._running and not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._start)
        return d

    def idle(self) -> Deferred[None]:
        """Fires when no round is running or waiting (for a clean close)."""
        if not self._running and not self._scheduled:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _start(self) -> None:
        self._scheduled = False
        if self._running or not self._waiters:
            return
        if self.failure is not None:
            self._fail_all(self.failure)
            return
        waiters, self._waiters = self._waiters, []
        fds = tuple(self._dirty)
        self._dirty = {}
        self._in_flight = frozenset(fds)
        self._running = True
        d = deferToThreadPool(self._reactor, self._threadpool, self._sync_all, fds)
        d.addCallbacks(self._round_done, self._round_failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _sync_all(self, fds: tuple[int, ...]) -> None:
        for fd in fds:
            self._fsync(fd)

    def _round_done(self, _: None, waiters: list[Deferred[None]]) -> None:
        self.rounds += 1
        self.fsync_calls += len(self._in_flight)
        self._running = False
        self._in_flight = frozenset()
        if self._waiters:
            # Everything that arrived during the round goes in the next one at once.
            self._scheduled = True
            self._start()
        for w in waiters:
            w.callback(None)
        if self._after_round is not None:
            self._after_round()
        self._maybe_idle()

    def _round_failed(self, failure: Failure, waiters: list[Deferred[None]]) -> None:
        self._running = False
        self._in_flight = frozenset()
        self.failure = Failure(SpoolError(f"fsync failed, spool unusable until restart: {failure.value!r}"))
        for w in waiters:
            w.errback(self.failure)
        self._fail_all(self.failure)
        self._maybe_idle()

    def _fail_all(self, failure: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(failure)

    def _maybe_idle(self) -> None:
        if self._running or self._scheduled:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)
