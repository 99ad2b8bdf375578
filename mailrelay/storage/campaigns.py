"""Campaigns: where statistics of transactional sends are attributed."""

from __future__ import annotations

import uuid

from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.database import DatabasePool, Row
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
        if await self._pool.execute("campaign_exists", "SELECT id FROM campaigns WHERE guid = ?", (guid,)):
            raise Conflict(f"a campaign with id {guid} already exists")
        await self._pool.execute("campaign_create", "INSERT INTO campaigns (account_id, guid, name, subject, list_id,"
                                 " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                                 (account_id, guid, name, subject, list_id, self._clock.seconds()))
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
        """The account's campaign called ``name``, created on first use."""
        rows = await self._pool.execute("campaign_named", _SELECT + " WHERE account_id = ? AND name = ?"
                                        " ORDER BY id LIMIT 1", (account_id, name))
        if rows:
            return _campaign(rows[0])
        return await self.create(account_id, name)

    async def list(self, account_id: int) -> list[Campaign]:
        rows = await self._pool.execute("campaign_list", _SELECT + " WHERE account_id = ? ORDER BY id", (account_id,))
        return [_campaign(r) for r in rows]
