"""The suppression list: addresses an account must not mail."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from mailrelay.storage.database import DatabasePool, Row
from mailrelay.storage.errors import NotFound, StorageError
from mailrelay.storage.lists import normalise_address
from mailrelay.storage.model import Suppression

REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual")

_SELECT = "SELECT id, account_id, address, scope, reason, detail, created_at, expires_at FROM suppressions"

_CHECK_CHUNK = 512


@functools.lru_cache(maxsize=32)
def _check_sql(addresses: int, scopes: int) -> str:
    return (
        _SELECT + f" WHERE account_id = ? AND address IN ({', '.join('?' * addresses)})"
        f" AND scope IN ({', '.join('?' * scopes)}) AND (expires_at IS NULL OR expires_at > ?)"
    )


def _suppression(row: Row) -> Suppression:
    return Suppression(id=int(row[0]), account_id=int(row[1]), address=row[2], scope=row[3], reason=row[4],
                       detail=row[5], created_at=float(row[6]), expires_at=row[7])


def check_scope(scope: str) -> str:
    if scope == "account" or (scope.startswith("list:") and len(scope) > 5):
        return scope
    raise StorageError(f"invalid scope {scope!r}: use 'account' or 'list:<list id>'")


class Suppressions:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock

    async def add(self, account_id: int, address: str, reason: str, scope: str = "account",
                  detail: str | None = None, expires_at: float | None = None) -> Suppression:
        """Add or refresh a suppression (the latest reason and expiry win)."""
        if reason not in REASONS:
            raise StorageError(f"unknown reason {reason!r}; use one of {', '.join(REASONS)}")
        address = normalise_address(address)
        scope = check_scope(scope)
        await self._pool.execute(
            "suppression_add",
            "INSERT INTO suppressions (account_id, address, scope, reason, detail, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, address, scope) DO UPDATE SET"
            " reason = excluded.reason, detail = excluded.detail, created_at = excluded.created_at,"
            " expires_at = excluded.expires_at",
            (account_id, address, scope, reason, detail, self._clock.seconds(), expires_at),
        )
        rows = await self._pool.execute("suppression_get", _SELECT + " WHERE account_id = ? AND address = ?"
                                        " AND scope = ?", (account_id, address, scope))
        return _suppression(rows[0])

    async def remove(self, account_id: int, address: str, scope: str = "account") -> None:
        rows = await self._pool.execute("suppression_remove", "DELETE FROM suppressions WHERE account_id = ?"
                                        " AND address = ? AND scope = ? RETURNING id",
                                        (account_id, normalise_address(address), check_scope(scope)))
        if not rows:
            raise NotFound(f"{address} is not suppressed ({scope})")

    async def list(self, account_id: int, reason: str | None = None, limit: int = 10000,
                   after_id: int = 0) -> list[Suppression]:
        sql = _SELECT + " WHERE account_id = ? AND id > ?"
        args: list[object] = [account_id, after_id]
        if reason is not None:
            sql += " AND reason = ?"
            args.append(reason)
        rows = await self._pool.execute("suppression_list", sql + " ORDER BY id LIMIT ?", [*args, limit])
        return [_suppression(r) for r in rows]

    async def suppressed(self, account_id: int, addresses: Iterable[str],
                         list_guid: str | None = None) -> dict[str, Suppression]:
        """Which of ``addresses`` are suppressed now (account scope, or the given list's)."""
        wanted = {}
        for a in addresses:
            try:
                wanted[normalise_address(a)] = a
            except StorageError:
                continue
        if not wanted:
            return {}
        scopes = ["account"] + ([f"list:{list_guid}"] if list_guid else [])
        found: dict[str, Suppression] = {}
        keys = sorted(wanted)
        now = self._clock.seconds()
        for start in range(0, len(keys), _CHECK_CHUNK):
            chunk = keys[start : start + _CHECK_CHUNK]
            # A few shapes of statement (1, 2, 4, ... addresses) stay in the
            # prepared-statement cache; the last address repeats to fill one.
            width = 1 << (len(chunk) - 1).bit_length()
            rows = await self._pool.execute(
                "suppression_check", _check_sql(width, len(scopes)),
                [account_id, *chunk, *[chunk[-1]] * (width - len(chunk)), *scopes, now],
            )
            for r in rows:
                s = _suppression(r)
                found[wanted[s.address]] = s
        return found


class CoalescedChecks:
    """
    ``Suppressions.suppressed`` with the checks asked in one reactor turn
    sent as one query per account and list.  The queue checks every message
    as it starts: a group commit makes many messages ready in the same turn,
    and one query instead of one each saves a database round trip (a thread
    hop on SQLite) per message.  Results are the same as asking one by one.
    """

    def __init__(self, suppressions: Suppressions, clock: IReactorTime) -> None:
        self._suppressions = suppressions
        self._clock = clock
        self._pending: dict[tuple[int, str | None], list[tuple[list[str], Deferred[dict[str, Suppression]]]]] = {}
        self._call: IDelayedCall | None = None

    def suppressed(self, account_id: int, addresses: Iterable[str],
                   list_guid: str | None = None) -> Deferred[dict[str, Suppression]]:
        d: Deferred[dict[str, Suppression]] = Deferred()
        self._pending.setdefault((account_id, list_guid), []).append((list(addresses), d))
        if self._call is None:
            self._call = self._clock.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        for (account_id, list_guid), waiters in pending.items():
            everyone = [a for addresses, _ in waiters for a in addresses]
            query = Deferred.fromCoroutine(self._suppressions.suppressed(account_id, everyone, list_guid))
            query.addCallbacks(_share, _fail_all, callbackArgs=(waiters,), errbackArgs=(waiters,))


def _normal(address: str) -> str | None:
    try:
        return normalise_address(address)
    except StorageError:
        return None


def _share(found: dict[str, Suppression], waiters: list[tuple[list[str], Deferred[dict[str, Suppression]]]]) -> None:
    # Keyed by the normal form: two waiters may spell one address differently.
    by_normal = {s.address: s for s in found.values()}
    for addresses, d in waiters:
        mine = {}
        for a in addresses:
            s = by_normal.get(_normal(a) or "")
            if s is not None:
                mine[a] = s
        d.callback(mine)


def _fail_all(failure: Failure, waiters: list[tuple[list[str], Deferred[dict[str, Suppression]]]]) -> None:
    for _, d in waiters:
        d.errback(failure)
