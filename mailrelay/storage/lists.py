"""Mailing lists and their members."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.database import DatabasePool, Row, Transaction
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.model import ListMember, MailingList

TRANSACTIONAL_LIST = "Transactional Campaign Recipients"

_SELECT = ("SELECT l.id, l.account_id, l.guid, l.name, l.created_at,"
           " (SELECT COUNT(*) FROM list_members m WHERE m.list_id = l.id) FROM lists l")


def _list(row: Row) -> MailingList:
    return MailingList(id=int(row[0]), account_id=int(row[1]), guid=row[2], name=row[3],
                       created_at=float(row[4]), members=int(row[5]))


def normalise_address(address: str) -> str:
    """
    An address as lists and suppressions key it: trimmed and lower-cased.

    Local parts are case-sensitive in theory, never in practice; a
    suppression that ``Bob@`` escapes by case would be worse.
    """
    address = address.strip()
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain or " " in address:
        raise StorageError(f"not an email address: {address!r}")
    return address.lower()


class Lists:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock

    async def create(self, account_id: int, name: str, guid: str | None = None) -> MailingList:
        if not name.strip():
            raise StorageError("a list needs a name")
        guid = guid or str(uuid.uuid4())
        # ON CONFLICT: the name (unique per account) or the guid is taken, perhaps a moment ago by another node.
        rows = await self._pool.execute("list_create", "INSERT INTO lists (account_id, guid, name, created_at)"
                                        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                                        (account_id, guid, name, self._clock.seconds()))
        if not rows:
            raise Conflict(f"a list called {name!r} (or with id {guid}) already exists")
        return await self.get(account_id, guid)

    async def get(self, account_id: int, guid_or_name: str) -> MailingList:
        """A list of this account by id (guid) or name; another account's list is not found."""
        rows = await self._pool.execute("list_get", _SELECT + " WHERE l.account_id = ? AND (l.guid = ? OR l.name = ?)",
                                        (account_id, guid_or_name, guid_or_name))
        if not rows:
            raise NotFound(f"no list {guid_or_name!r} in this account")
        return _list(rows[0])

    async def by_id(self, account_id: int, list_id: int) -> MailingList:
        """
        A list of this account by its row id (what a campaign's ``list_id``
        holds); another account's list is not found.
        """
        rows = await self._pool.execute("list_by_id", _SELECT + " WHERE l.account_id = ? AND l.id = ?",
                                        (account_id, list_id))
        if not rows:
            raise NotFound(f"no list with row id {list_id} in this account")
        return _list(rows[0])

    async def get_or_create(self, account_id: int, name: str) -> MailingList:
        """
        The account's list called ``name``, created on first use; concurrent
        first uses (several nodes too) get the same list, as names are
        unique per account and a losing insert is a no-op.
        """
        try:
            return await self.get(account_id, name)
        except NotFound:
            try:
                return await self.create(account_id, name)
            except Conflict:  # created meanwhile by another node
                return await self.get(account_id, name)

    async def list(self, account_id: int) -> list[MailingList]:
        rows = await self._pool.execute("list_list", _SELECT + " WHERE l.account_id = ? ORDER BY l.id", (account_id,))
        return [_list(r) for r in rows]

    async def add_members(self, list_id: int, addresses: Iterable[str]) -> int:
        """Add addresses (already members are left as they are); returns how many were new."""
        clean = sorted({normalise_address(a) for a in addresses})
        now = self._clock.seconds()

        async def txn_fn(txn: Transaction) -> int:
            before = await txn.execute("SELECT COUNT(*) FROM list_members WHERE list_id = ?", (list_id,))
            for start in range(0, len(clean), 500):
                chunk = clean[start : start + 500]
                groups = ", ".join(["(?, ?, ?)"] * len(chunk))
                args = [v for a in chunk for v in (list_id, a, now)]
                await txn.execute(f"INSERT INTO list_members (list_id, address, added_at) VALUES {groups}"
                                  " ON CONFLICT (list_id, address) DO NOTHING", args)
            after = await txn.execute("SELECT COUNT(*) FROM list_members WHERE list_id = ?", (list_id,))
            return int(after[0][0]) - int(before[0][0])

        return await self._pool.interaction("list_add_members", txn_fn)

    async def remove_members(self, list_id: int, addresses: Iterable[str]) -> int:
        removed = 0
        for address in {normalise_address(a) for a in addresses}:
            rows = await self._pool.execute("list_remove_member", "DELETE FROM list_members WHERE list_id = ?"
                                            " AND address = ? RETURNING address", (list_id, address))
            removed += len(rows)
        return removed

    async def members(self, list_id: int, limit: int = 10000, after: str = "") -> builtins.list[ListMember]:
        rows = await self._pool.execute("list_members", "SELECT address, name, added_at FROM list_members"
                                        " WHERE list_id = ? AND address > ? ORDER BY address LIMIT ?",
                                        (list_id, after, limit))
        return [ListMember(address=r[0], name=r[1], added_at=float(r[2])) for r in rows]

    async def rename(self, account_id: int, guid_or_name: str, name: str) -> MailingList:
        """Give a list of this account a new name (its id, members and campaigns stay)."""
        name = name.strip()
        if not name:
            raise StorageError("a list needs a name")
        found = await self.get(account_id, guid_or_name)
        if name != found.name:
            taken = await self._pool.execute(
                "list_name_taken", "SELECT id FROM lists WHERE account_id = ? AND name = ?", (account_id, name)
            )
            if taken:
                raise Conflict(f"a list called {name!r} already exists")
            await self._pool.execute("list_rename", "UPDATE lists SET name = ? WHERE id = ?", (name, found.id))
        return await self.get(account_id, found.guid)

    async def delete(self, account_id: int, guid_or_name: str) -> MailingList:
        found = await self.get(account_id, guid_or_name)
        await self._pool.execute("list_delete_members", "DELETE FROM list_members WHERE list_id = ?", (found.id,))
        await self._pool.execute("list_unlink", "UPDATE campaigns SET list_id = NULL WHERE list_id = ?", (found.id,))
        await self._pool.execute("list_delete", "DELETE FROM lists WHERE id = ?", (found.id,))
        return found
