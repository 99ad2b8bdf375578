"""Campaigns: where statistics of transactional sends are attributed."""

from __future__ import annotations

import uuid

from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.database import DatabasePool, Row, Transaction
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.model import Campaign

TRANSACTIONAL_CAMPAIGN = "Transactional Campaign"

_SELECT = "SELECT id, account_id, guid, name, subject, list_id, created_at FROM campaigns"


def _campaign(row: Row) -> Campaign:
    return Campaign(id=int(row[0]), account_id=int(row[1]), guid=row[2], name=row[3], subject=row[4],
                    list_id=row[5], created_at=float(row[6]))


class Campaigns:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock

    async def create(self, account_id: int, name: str, subject: str | None = None, guid: str | None = None,
                     list_id: int | None = None) -> Campaign:
        if not name.strip():
            raise StorageError("a campaign needs a name")
        guid = guid or str(uuid.uuid4())
        # ON CONFLICT: the guid is taken, or this is a second "Transactional Campaign"
        # (unique per account since migration 004), perhaps inserted a moment ago by another node.
        rows = await self._pool.execute("campaign_create", "INSERT INTO campaigns (account_id, guid, name, subject,"
                                        " list_id, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                                        " RETURNING id",
                                        (account_id, guid, name, subject, list_id, self._clock.seconds()))
        if not rows:
            if name == TRANSACTIONAL_CAMPAIGN:
                raise Conflict(f"this account already has a campaign called {name!r}")
            raise Conflict(f"a campaign with id {guid} already exists")
        return await self.get(account_id, guid)

    async def get(self, account_id: int, guid: str) -> Campaign:
        """A campaign of this account; another account's campaign is not found."""
        rows = await self._pool.execute("campaign_get", _SELECT + " WHERE account_id = ? AND guid = ?",
                                        (account_id, guid))
        if not rows:
            raise NotFound(f"no campaign {guid!r} in this account")
        return _campaign(rows[0])

    async def by_subject(self, account_id: int, subject: str) -> Campaign | None:
        rows = await self._pool.execute("campaign_by_subject", _SELECT + " WHERE account_id = ? AND subject = ?"
                                        " ORDER BY id LIMIT 1", (account_id, subject))
        return _campaign(rows[0]) if rows else None

    async def named(self, account_id: int, name: str) -> Campaign:
        """
        The account's campaign called ``name`` (the oldest, if several),
        created on first use.  For ``TRANSACTIONAL_CAMPAIGN`` concurrent
        first uses, on several nodes too, get one and the same row: a unique
        index (migration 004) turns the loser's insert into a no-op, and the
        same transaction then reads the winner's row.
        """
        select = _SELECT + " WHERE account_id = ? AND name = ? ORDER BY id LIMIT 1"
        rows = await self._pool.execute("campaign_named", select, (account_id, name))
        if rows:
            return _campaign(rows[0])
        guid = str(uuid.uuid4())
        now = self._clock.seconds()

        async def find_or_create(txn: Transaction) -> Campaign:
            await txn.execute("INSERT INTO campaigns (account_id, guid, name, created_at) VALUES (?, ?, ?, ?)"
                              " ON CONFLICT DO NOTHING", (account_id, guid, name, now))
            found = await txn.execute(select, (account_id, name))
            return _campaign(found[0])

        return await self._pool.interaction("campaign_named_create", find_or_create)

    async def list(self, account_id: int) -> list[Campaign]:
        rows = await self._pool.execute("campaign_list", _SELECT + " WHERE account_id = ? ORDER BY id", (account_id,))
        return [_campaign(r) for r in rows]
