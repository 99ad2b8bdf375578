"""Generated credentials: SMTP users, API tokens and API keys (stored as SHA-256)."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailrelay.interfaces import ICredentialStore
from mailrelay.storage.accounts import Accounts
from mailrelay.storage.database import DatabasePool, Row
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.model import Credential, LoginRecord

KINDS = ("smtp_user", "api_token", "api_key")

# Every scope a key may carry; "smtp:send" is what the injection user needs.
SCOPES = frozenset({
    "smtp:send", "stats:read", "events:read", "messages:read", "suppressions:read", "suppressions:write",
    "lists:read", "lists:write", "campaigns:read", "campaigns:write", "domains:read", "domains:write",
    "credentials:write", "webhooks:read", "webhooks:write",
})

_COLUMNS = ("c.id, c.account_id, c.kind, c.username, c.scopes, d.domain, c.label, c.created_at, c.revoked_at,"
            " c.last_used_at")
_FROM = " FROM credentials c LEFT JOIN sending_domains d ON d.id = c.domain_id"


def _credential(row: Row) -> Credential:
    return Credential(id=int(row[0]), account_id=int(row[1]), kind=row[2], username=row[3],
                      scopes=frozenset(row[4].split()), domain=row[5], label=row[6],
                      created_at=float(row[7]), revoked_at=row[8], last_used_at=row[9])


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(scopes)
    unknown = sorted(wanted - SCOPES)
    if unknown:
        raise StorageError(f"unknown scope {unknown[0]!r}; known scopes: {', '.join(sorted(SCOPES))}")
    return wanted


@implementer(ICredentialStore)
class Credentials:
    def __init__(self, pool: DatabasePool, clock: IReactorTime, accounts: Accounts) -> None:
        self._pool = pool
        self._clock = clock
        self._accounts = accounts

    async def create(self, account_id: int, kind: str, secret_hash: str, username: str | None = None,
                     scopes: Iterable[str] = (), domain_id: int | None = None,
                     label: str | None = None) -> Credential:
        if kind not in KINDS:
            raise StorageError(f"unknown credential kind {kind!r}")
        scopes = check_scopes(scopes)
        if username is not None:
            taken = await self._pool.execute("credential_username", "SELECT id FROM credentials"
                                             " WHERE username = ?", (username,))
            if taken:
                raise Conflict(f"the user name {username!r} is taken")
        await self._pool.execute(
            "credential_create",
            "INSERT INTO credentials (account_id, kind, username, secret_hash, scopes, domain_id, label,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (account_id, kind, username, secret_hash, " ".join(sorted(scopes)), domain_id, label,
             self._clock.seconds()),
        )
        rows = await self._pool.execute("credential_get", "SELECT " + _COLUMNS + _FROM + " WHERE c.secret_hash = ?",
                                        (secret_hash,))
        return _credential(rows[0])

    async def list(self, account_id: int, kind: str | None = None, domain_id: int | None = None,
                   include_revoked: bool = False) -> list[Credential]:
        sql = "SELECT " + _COLUMNS + _FROM + " WHERE c.account_id = ?"
        args: list[object] = [account_id]
        if kind is not None:
            sql += " AND c.kind = ?"
            args.append(kind)
        if domain_id is not None:
            sql += " AND c.domain_id = ?"
            args.append(domain_id)
        if not include_revoked:
            sql += " AND c.revoked_at IS NULL"
        rows = await self._pool.execute("credential_list", sql + " ORDER BY c.id", args)
        return [_credential(r) for r in rows]

    async def revoke(self, account_id: int, credential_id: int | None = None,
                     username: str | None = None) -> Credential:
        if username is not None:
            rows = await self._pool.execute("credential_find", "SELECT " + _COLUMNS + _FROM +
                                            " WHERE c.username = ? AND c.account_id = ?", (username, account_id))
        else:
            rows = await self._pool.execute("credential_find", "SELECT " + _COLUMNS + _FROM +
                                            " WHERE c.id = ? AND c.account_id = ?", (credential_id, account_id))
        if not rows or rows[0][8] is not None:
            raise NotFound(f"no active credential {username or credential_id} for this account")
        await self._pool.execute("credential_revoke", "UPDATE credentials SET revoked_at = ? WHERE id = ?",
                                 (self._clock.seconds(), rows[0][0]))
        return _credential(rows[0])

    async def account_login(self, name: str) -> LoginRecord | None:
        return await self._accounts.login_record(name)

    async def token_login(self, kind: str, secret_hash: str) -> LoginRecord | None:
        rows = await self._pool.execute(
            "credential_login",
            "SELECT c.id, c.scopes, d.domain, a.id, a.name, p.name, a.parent_id, a.approved, a.suspended, c.username"
            " FROM credentials c JOIN accounts a ON a.id = c.account_id"
            " LEFT JOIN accounts p ON p.id = a.parent_id"
            " LEFT JOIN sending_domains d ON d.id = c.domain_id"
            " WHERE c.secret_hash = ? AND c.kind = ? AND c.revoked_at IS NULL",
            (secret_hash, kind),
        )
        if not rows:
            return None
        r = rows[0]
        return LoginRecord(account_id=int(r[3]), account_name=f"{r[5]}\\{r[4]}" if r[5] else r[4],
                           parent_id=r[6], approved=bool(r[7]), suspended=bool(r[8]), kind=kind,
                           credential_id=int(r[0]), scopes=frozenset(r[1].split()), domain=r[2], username=r[9])
