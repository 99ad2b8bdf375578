"""Accounts and sub-accounts."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.database import DatabasePool, Row, Transaction
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.model import Account, LoginRecord

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")

_COLUMNS = (
    "a.id, a.name, a.parent_id, p.name, a.approved, a.suspended, a.daily_quota, a.rate_limit_per_minute,"
    " a.notification_address, a.header_text, a.footer_text, a.header_html, a.footer_html,"
    " a.open_tracking, a.click_tracking, a.unsubscribe_link, a.created_at"
)
_FROM = " FROM accounts a LEFT JOIN accounts p ON p.id = a.parent_id"

# Settings an operator may change after creation, and their Python types.
SETTINGS: dict[str, type] = {
    "daily_quota": int,
    "rate_limit_per_minute": int,
    "notification_address": str,
    "header_text": str,
    "footer_text": str,
    "header_html": str,
    "footer_html": str,
    "open_tracking": bool,
    "click_tracking": bool,
    "unsubscribe_link": bool,
}


def _account(row: Row) -> Account:
    return Account(
        id=int(row[0]), name=row[1], parent_id=row[2], parent_name=row[3], approved=bool(row[4]),
        suspended=bool(row[5]), daily_quota=row[6], rate_limit_per_minute=row[7],
        notification_address=row[8], header_text=row[9], footer_text=row[10], header_html=row[11],
        footer_html=row[12], open_tracking=bool(row[13]), click_tracking=bool(row[14]),
        unsubscribe_link=bool(row[15]), created_at=float(row[16]),
    )


def split_login(login: str) -> tuple[str | None, str]:
    """``parent\\child`` -> ``("parent", "child")``; ``name`` -> ``(None, "name")``."""
    parent, sep, child = login.partition("\\")
    return (parent, child) if sep else (None, login)


class Accounts:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock

    async def _find(self, txn: Transaction, login: str) -> Account | None:
        parent, name = split_login(login)
        if parent is None:
            rows = await txn.execute("SELECT " + _COLUMNS + _FROM + " WHERE a.name = ? AND a.parent_id IS NULL",
                                     (name,))
        else:
            rows = await txn.execute("SELECT " + _COLUMNS + _FROM + " WHERE a.name = ? AND p.name = ?"
                                     " AND p.parent_id IS NULL", (name, parent))
        return _account(rows[0]) if rows else None

    async def create(self, name: str, password_hash: str | None, parent: str | None = None,
                     daily_quota: int | None = None, approved: bool = True) -> Account:
        if not NAME.match(name):
            raise StorageError(f"invalid account name {name!r}: use letters, digits and . _ @ + - (up to 64)")
        if daily_quota is not None and daily_quota < 0:
            raise StorageError("the daily quota cannot be negative")

        async def txn_fn(txn: Transaction) -> Account:
            parent_id = None
            if parent is not None:
                owner = await self._find(txn, parent)
                if owner is None:
                    raise NotFound(f"no account called {parent!r}")
                if owner.parent_id is not None:
                    raise StorageError("a sub-account cannot have sub-accounts of its own")
                parent_id = owner.id
            login = f"{parent}\\{name}" if parent else name
            if await self._find(txn, login) is not None:
                raise Conflict(f"an account called {login!r} already exists")
            await txn.insert(
                "INSERT INTO accounts (name, parent_id, password_hash, approved, daily_quota, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (name, parent_id, password_hash, approved, daily_quota, self._clock.seconds()),
            )
            found = await self._find(txn, login)
            assert found is not None
            return found

        return await self._pool.interaction("account_create", txn_fn)

    async def get(self, login: str) -> Account:
        async def txn_fn(txn: Transaction) -> Account | None:
            return await self._find(txn, login)

        found = await self._pool.interaction("account_get", txn_fn)
        if found is None:
            raise NotFound(f"no account called {login!r}")
        return found

    async def by_id(self, account_id: int) -> Account:
        rows = await self._pool.execute("account_by_id", "SELECT " + _COLUMNS + _FROM + " WHERE a.id = ?",
                                        (account_id,))
        if not rows:
            raise NotFound(f"no account with id {account_id}")
        return _account(rows[0])

    async def list(self, parent: str | None = None) -> list[Account]:
        if parent is None:
            rows = await self._pool.execute("account_list", "SELECT " + _COLUMNS + _FROM + " ORDER BY a.id")
        else:
            owner = await self.get(parent)
            rows = await self._pool.execute("account_list", "SELECT " + _COLUMNS + _FROM +
                                            " WHERE a.parent_id = ? ORDER BY a.id", (owner.id,))
        return [_account(r) for r in rows]

    async def update(self, login: str, **settings: Any) -> Account:
        """Change flags (``approved``, ``suspended``), the password hash or ``SETTINGS``."""
        allowed = {**SETTINGS, "approved": bool, "suspended": bool, "password_hash": str}
        for key in settings:
            if key not in allowed:
                raise StorageError(f"unknown account setting {key!r}")
        account = await self.get(login)
        if settings:
            assignments = ", ".join(f"{key} = ?" for key in settings)
            await self._pool.execute("account_update", f"UPDATE accounts SET {assignments} WHERE id = ?",
                                     (*settings.values(), account.id))
        return await self.get(login)

    async def login_record(self, login: str) -> LoginRecord | None:
        """What AUTH with an account password needs (``parent\\child`` for sub-accounts)."""

        async def txn_fn(txn: Transaction) -> LoginRecord | None:
            account = await self._find(txn, login)
            if account is None:
                return None
            rows = await txn.execute("SELECT password_hash FROM accounts WHERE id = ?", (account.id,))
            return LoginRecord(
                account_id=account.id, account_name=account.login, parent_id=account.parent_id,
                approved=account.approved, suspended=account.suspended, kind="password",
                password_hash=rows[0][0],
            )

        return await self._pool.interaction("account_login", txn_fn)
