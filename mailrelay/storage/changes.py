"""
Seeing admin changes made by other processes and nodes.

Each process caches accounts, credentials and sending domains (logins for a
minute, policy facts for half a minute) so the accept path does not wait on
the database.  Triggers move one counter, ``admin_changes.generation``, on
every change to those tables, whoever makes it: the admin command, the API,
another node.  ``ChangeWatcher`` reads the counter every ``interval`` seconds
and, when it has moved, tells its subscribers to drop what they cached.  A
revoked credential, a suspended account or a removed domain thus stops
working everywhere within about ``interval``; the caches' own expiry remains
the bound while the database cannot be read.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailrelay.storage.database import DatabasePool

log = Logger()


class ChangeWatcher:
    def __init__(self, pool: DatabasePool, clock: IReactorTime, interval: float = 1.0) -> None:
        self._pool = pool
        self._clock = clock
        self.interval = interval
        self._subscribers: list[Callable[[], None]] = []
        self._seen: int | None = None
        #: The last read failed: what changed meanwhile is unknown, so the next success clears.
        self._unsure = False
        self._call: IDelayedCall | None = None
        self._polling: Deferred[None] | None = None
        self._running = False

    def subscribe(self, forget: Callable[[], None]) -> None:
        """``forget()`` is called (on the reactor) whenever another writer may have changed the tables."""
        self._subscribers.append(forget)

    async def generation(self) -> int:
        rows = await self._pool.execute("admin_changes", "SELECT generation FROM admin_changes WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    async def poll(self) -> bool:
        """Read the counter once; True when the subscribers were told to forget."""
        try:
            current = await self.generation()
        except Exception:
            if not self._unsure:
                log.failure("cannot read admin_changes; cached accounts and credentials expire on their own")
            self._unsure = True
            return False
        changed = self._unsure or (self._seen is not None and current != self._seen)
        self._seen, self._unsure = current, False
        if changed:
            for forget in self._subscribers:
                try:
                    forget()
                except Exception:
                    log.failure("dropping cached admin data failed")
        return changed

    async def start(self) -> None:
        """Read the counter now (nothing is cached yet), then every ``interval`` seconds."""
        self._running = True
        await self.poll()
        if self.interval > 0:
            self._schedule()

    def stop(self) -> Deferred[None]:
        """Stop polling; fires when a read under way has ended."""
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._polling is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._polling.addBoth(lambda _: done.callback(None))
        return done

    def _schedule(self) -> None:
        if self._running:
            self._call = self._clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = None

        async def once() -> None:
            await self.poll()

        polling = self._polling = Deferred.fromCoroutine(once())

        def done(_: object) -> None:
            self._polling = None
            self._schedule()

        polling.addBoth(done)
