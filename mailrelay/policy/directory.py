"""
Cached facts the session policy decides on: an account's standing and its
verified sending domains.

The accept path must not wait on the database for every message, so each
fact is read once and kept for ``ttl`` seconds; concurrent misses share one
query.  A change made with the admin command (suspend, verify a domain)
takes effect within about a second on every node (``ChangeWatcher`` calls
``forget_all``), and within ``ttl`` at worst.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.errors import NotFound
from mailrelay.storage.store import Store

K = TypeVar("K")
V = TypeVar("V")


@attrs.frozen
class AccountFacts:
    """What the policy needs about the sending account (and its parent)."""

    id: int
    login: str
    approved: bool
    suspended: bool
    daily_quota: int | None
    notification_address: str | None = None

    @property
    def can_send(self) -> bool:
        return self.approved and not self.suspended


class TTLCache(Generic[K, V]):
    """A read-through cache with expiry on an injected clock; concurrent misses share one load."""

    def __init__(self, clock: IReactorTime, ttl: float, load: Callable[[K], Awaitable[V]],
                 max_entries: int = 100_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._load = load
        self._max = max_entries
        self._values: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, list[Deferred[V]]] = {}
        #: Moves on ``clear``: a value loaded across it is handed out but not kept.
        self._epoch = 0

    def fresh(self, key: K) -> tuple[V] | None:
        """``(value,)`` while ``key`` is cached and fresh, else None; never loads."""
        hit = self._values.get(key)
        return (hit[1],) if hit is not None and hit[0] > self._clock.seconds() else None

    async def get(self, key: K) -> V:
        now = self._clock.seconds()
        hit = self._values.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        if key in self._loading:
            waiter: Deferred[V] = Deferred()
            self._loading[key].append(waiter)
            return await waiter
        self._loading[key] = []
        epoch = self._epoch
        try:
            value = await self._load(key)
        except BaseException as e:
            for w in self._loading.pop(key, []):
                w.errback(e)
            raise
        if epoch == self._epoch:
            if len(self._values) >= self._max:
                self._values.clear()
            self._values[key] = (now + self._ttl, value)
        for w in self._loading.pop(key, []):
            w.callback(value)
        return value

    def invalidate(self, key: K) -> None:
        self._values.pop(key, None)

    def clear(self) -> None:
        self._values.clear()
        self._epoch += 1


class SenderDirectory:
    def __init__(self, store: Store, clock: IReactorTime, ttl: float = 30.0) -> None:
        self._store = store
        self._accounts: TTLCache[int, AccountFacts | None] = TTLCache(clock, ttl, self._load_account)
        self._domains: TTLCache[int, frozenset[str]] = TTLCache(clock, ttl, self._load_domains)

    def forget_all(self) -> None:
        """Drop every cached fact (another process changed accounts or domains: ``ChangeWatcher``)."""
        self._accounts.clear()
        self._domains.clear()

    async def _load_account(self, account_id: int) -> AccountFacts | None:
        try:
            account = await self._store.accounts.by_id(account_id)
        except NotFound:
            return None
        approved, suspended = account.approved, account.suspended
        if account.parent_id is not None:
            # A sub-account sends only while its parent may.
            try:
                parent = await self._store.accounts.by_id(account.parent_id)
            except NotFound:
                return None
            approved = approved and parent.approved
            suspended = suspended or parent.suspended
        return AccountFacts(id=account.id, login=account.login, approved=approved, suspended=suspended,
                            daily_quota=account.daily_quota, notification_address=account.notification_address)

    async def _load_domains(self, account_id: int) -> frozenset[str]:
        domains = await self._store.domains.list(account_id)
        return frozenset(d.domain for d in domains if d.verified)

    # Both run for every message: a fresh entry is answered without a coroutine.

    def account(self, account_id: int) -> Deferred[AccountFacts | None]:
        hit = self._accounts.fresh(account_id)
        return succeed(hit[0]) if hit is not None else ensureDeferred(self._accounts.get(account_id))

    def verified_domains(self, account_id: int) -> Deferred[frozenset[str]]:
        hit = self._domains.fresh(account_id)
        return succeed(hit[0]) if hit is not None else ensureDeferred(self._domains.get(account_id))
