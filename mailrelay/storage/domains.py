"""Sending domains with their DKIM keys."""

from __future__ import annotations

import re

from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.database import DatabasePool, Row
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.model import SendingDomain

DOMAIN = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")

_COLUMNS = ("id, account_id, domain, verified, dkim_selector, dkim_private_key, dkim_ed25519_key,"
            " created_at, verified_at, dkim_signing")


def normalise_domain(domain: str) -> str:
    """Lower case, IDNA-encoded; raises ``StorageError`` when it is not a domain name."""
    try:
        ascii_domain = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise StorageError(f"not a valid domain name: {domain!r}")
    if not DOMAIN.match(ascii_domain):
        raise StorageError(f"not a valid domain name: {domain!r}")
    return ascii_domain


def _domain(row: Row) -> SendingDomain:
    return SendingDomain(id=int(row[0]), account_id=int(row[1]), domain=row[2], verified=bool(row[3]),
                         dkim_selector=row[4], dkim_private_key=row[5], dkim_ed25519_key=row[6],
                         created_at=float(row[7]), verified_at=row[8], dkim_signing=bool(row[9]))


class Domains:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock

    async def add(self, account_id: int, domain: str, selector: str, private_key_pem: str,
                  ed25519_key_pem: str | None = None) -> SendingDomain:
        domain = normalise_domain(domain)
        existing = await self._pool.execute("domain_exists", "SELECT account_id FROM sending_domains"
                                            " WHERE domain = ?", (domain,))
        if existing:
            raise Conflict(f"the domain {domain} is already a sending domain")
        await self._pool.execute(
            "domain_add",
            "INSERT INTO sending_domains (account_id, domain, dkim_selector, dkim_private_key,"
            " dkim_ed25519_key, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (account_id, domain, selector, private_key_pem, ed25519_key_pem, self._clock.seconds()),
        )
        return await self.get(domain)

    async def get(self, domain: str) -> SendingDomain:
        domain = normalise_domain(domain)
        rows = await self._pool.execute("domain_get", f"SELECT {_COLUMNS} FROM sending_domains WHERE domain = ?",
                                        (domain,))
        if not rows:
            raise NotFound(f"no sending domain {domain}")
        return _domain(rows[0])

    async def list(self, account_id: int | None = None) -> list[SendingDomain]:
        if account_id is None:
            rows = await self._pool.execute("domain_list", f"SELECT {_COLUMNS} FROM sending_domains ORDER BY domain")
        else:
            rows = await self._pool.execute("domain_list", f"SELECT {_COLUMNS} FROM sending_domains"
                                            " WHERE account_id = ? ORDER BY domain", (account_id,))
        return [_domain(r) for r in rows]

    async def set_verified(self, domain: str, verified: bool) -> SendingDomain:
        found = await self.get(domain)
        await self._pool.execute("domain_verify", "UPDATE sending_domains SET verified = ?, verified_at = ?"
                                 " WHERE id = ?", (verified, self._clock.seconds() if verified else None, found.id))
        return await self.get(domain)

    async def set_dkim_signing(self, domain: str, on: bool) -> SendingDomain:
        """Sign the domain's mail with its DKIM key (the default), or not; ``NotFound`` for an unknown domain."""
        found = await self.get(domain)
        await self._pool.execute("domain_dkim_signing", "UPDATE sending_domains SET dkim_signing = ? WHERE id = ?",
                                 (bool(on), found.id))
        return await self.get(domain)

    async def remove(self, domain: str) -> None:
        found = await self.get(domain)

        async def txn_fn(txn):  # type: ignore[no-untyped-def]
            # Revoked and detached: the rows stay for the record, and no longer hold the domain's row.
            await txn.execute("UPDATE credentials SET revoked_at = COALESCE(revoked_at, ?), domain_id = NULL"
                              " WHERE domain_id = ?", (self._clock.seconds(), found.id))
            await txn.execute("DELETE FROM sending_domains WHERE id = ?", (found.id,))

        try:
            await self._pool.interaction("domain_remove", txn_fn)
        except Exception as e:
            raise StorageError(f"cannot remove {found.domain}: {e}")
