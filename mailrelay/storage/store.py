"""
``Store``: the storage of one mailrelay database, one attribute per
aggregate.  Built once by the wiring and passed to whoever needs a part of
it; there is no global store.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.accounts import Accounts
from mailrelay.storage.campaigns import Campaigns
from mailrelay.storage.counters import Counters
from mailrelay.storage.credentials import Credentials
from mailrelay.storage.database import DatabasePool, make_pool
from mailrelay.storage.domains import Domains
from mailrelay.storage.lists import Lists
from mailrelay.storage.migrations import check_version, migrate
from mailrelay.storage.suppressions import Suppressions


class Store:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self.pool = pool
        self.accounts = Accounts(pool, clock)
        self.domains = Domains(pool, clock)
        self.credentials = Credentials(pool, clock, self.accounts)
        self.lists = Lists(pool, clock)
        self.campaigns = Campaigns(pool, clock)
        self.suppressions = Suppressions(pool, clock)
        self.counters = Counters(pool)

    async def close(self) -> None:
        await self.pool.close()


async def open_store(url: str, reactor: IReactorTime, pool_size: int = 5, apply_migrations: bool = True) -> Store:
    """
    Connect, refuse a database newer than this binary, apply missing
    migrations (unless told not to), and return the ``Store``.
    """
    pool = make_pool(url, reactor, size=pool_size)
    await pool.start()
    try:
        await check_version(pool)
        if apply_migrations:
            await migrate(pool)
    except BaseException:
        await pool.close()
        raise
    return Store(pool, reactor)
