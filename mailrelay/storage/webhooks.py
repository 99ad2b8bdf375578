"""
Webhook endpoints per account, and the record of every delivery attempt.

Each endpoint also keeps its place in the ``events`` table
(``delivered_through``: the last event it acknowledged) and a lease naming
the node that delivers to it: events are stored before anyone sees them,
so the dispatcher reads what an endpoint still needs from the table, and a
restart (or another node taking over) resumes where the acknowledgements
stopped instead of losing what was waiting in memory.

The signing secret is stored as given (not hashed): the relay needs it to
sign every POST.  It is shown to the account owner once, when the webhook
is created or its secret rotated, and never listed again.
"""

from __future__ import annotations

import builtins
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs
from twisted.internet.interfaces import IReactorTime

from mailrelay.storage.database import DatabasePool, Row, Transaction
from mailrelay.storage.errors import NotFound, StorageError

#: Event types a webhook may ask for (``mailrelay.events.model.EventType`` values).
EVENT_TYPES = (
    "queued",
    "delivered",
    "deferred",
    "bounced",
    "suppressed",
    "sandboxed",
    "opened",
    "clicked",
    "unsubscribed",
    "complained",
)
MAX_URL_LENGTH = 2000

_COLUMNS = "id, account_id, url, event_types, secret, failing, created_at, delivered_through"
#: The columns of an event row as ``events_after`` returns them.
EVENT_ROW_COLUMNS = (
    "id, ts, account_id, type, queue_id, message_id, transmission_id, recipient, campaign_id, tags, detail"
)
_MAX_EVENT_ID = "(SELECT COALESCE(MAX(id), 0) FROM events)"
_ATTEMPT_COLUMNS = "a.id, a.webhook_id, a.ts, a.status, a.error, a.events"


@attrs.frozen
class Webhook:
    """
    One endpoint.  ``event_types`` empty means every type.  ``failing``
    is set when deliveries kept failing for the whole retry period; no
    events are sent to a failing endpoint until it is re-enabled.
    """

    id: int
    account_id: int
    url: str
    event_types: frozenset[str]
    secret: str = attrs.field(repr=False)
    failing: bool
    created_at: float
    #: The id of the last event the endpoint acknowledged (or was skipped past).
    cursor: int = 0

    def wants(self, event_type: str) -> bool:
        return not self.event_types or event_type in self.event_types


@attrs.frozen
class WebhookAttempt:
    """One POST: ``status`` is the HTTP status (None when no answer came), ``error`` why it failed."""

    id: int
    webhook_id: int
    ts: float
    status: int | None
    error: str | None
    events: int


def _webhook(row: Row) -> Webhook:
    return Webhook(
        id=int(row[0]),
        account_id=int(row[1]),
        url=row[2],
        event_types=frozenset(row[3].split()),
        secret=row[4],
        failing=bool(row[5]),
        created_at=float(row[6]),
        cursor=int(row[7] or 0),
    )


def _attempt(row: Row) -> WebhookAttempt:
    return WebhookAttempt(
        id=int(row[0]),
        webhook_id=int(row[1]),
        ts=float(row[2]),
        status=None if row[3] is None else int(row[3]),
        error=row[4],
        events=int(row[5]),
    )


def check_event_types(types: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(types)
    unknown = sorted(wanted - set(EVENT_TYPES))
    if unknown:
        raise StorageError(f"unknown event type {unknown[0]!r}; known types: {', '.join(EVENT_TYPES)}")
    return wanted


def check_url(url: str, allow_private: bool = False) -> str:
    """
    An http(s) URL with a host.  Unless ``allow_private``, literal
    loopback, private and link-local addresses are refused, so an account
    cannot point the relay at the operator's internal services by IP.
    (Names that resolve to such addresses are the operator's firewall's job.)
    """
    if len(url) > MAX_URL_LENGTH or any(ch.isspace() for ch in url):
        raise StorageError("the webhook URL is too long or contains spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError("the webhook URL must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise StorageError("the webhook URL must not carry a user name or password")
    if not allow_private:
        host = parts.hostname
        if host == "localhost" or host.endswith(".localhost"):
            raise StorageError("the webhook URL points at this machine")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            # What the resolver would still read as an IPv4 literal: 127.1, 2130706433, 0x7f000001.
            try:
                address = ipaddress.IPv4Address(socket.inet_aton(host))
            except OSError:
                address = None
        if address is not None:
            if not address.is_global:
                raise StorageError(f"the webhook URL points at a non-public address ({host})")
    return url


class Webhooks:
    def __init__(self, pool: DatabasePool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock

    async def create(self, account_id: int, url: str, secret: str, event_types: Iterable[str] = ()) -> Webhook:
        types = " ".join(sorted(check_event_types(event_types)))

        async def txn_fn(txn: Transaction) -> int:
            # A new endpoint starts at the present: it gets the events recorded after it was made.
            return await txn.insert(
                "INSERT INTO webhooks (account_id, url, event_types, secret, created_at, delivered_through)"
                f" VALUES (?, ?, ?, ?, ?, {_MAX_EVENT_ID})",
                (account_id, url, types, secret, self._clock.seconds()),
            )

        webhook_id = await self._pool.interaction("webhook_create", txn_fn)
        return await self.get(account_id, webhook_id)

    async def get(self, account_id: int, webhook_id: int) -> Webhook:
        """A webhook of this account; another account's is not found."""
        rows = await self._pool.execute(
            "webhook_get", f"SELECT {_COLUMNS} FROM webhooks WHERE id = ? AND account_id = ?", (webhook_id, account_id)
        )
        if not rows:
            raise NotFound(f"no webhook {webhook_id} in this account")
        return _webhook(rows[0])

    async def list(self, account_id: int) -> builtins.list[Webhook]:
        rows = await self._pool.execute(
            "webhook_list", f"SELECT {_COLUMNS} FROM webhooks WHERE account_id = ? ORDER BY id", (account_id,)
        )
        return [_webhook(r) for r in rows]

    async def update(
        self,
        account_id: int,
        webhook_id: int,
        *,
        url: str | None = None,
        event_types: Iterable[str] | None = None,
        secret: str | None = None,
        failing: bool | None = None,
    ) -> Webhook:
        """Change what is given; the others stay."""
        await self.get(account_id, webhook_id)
        changes: dict[str, object] = {}
        if url is not None:
            changes["url"] = url
        if event_types is not None:
            changes["event_types"] = " ".join(sorted(check_event_types(event_types)))
        if secret is not None:
            changes["secret"] = secret
        if failing is not None:
            changes["failing"] = failing
        if changes:
            assignments = ", ".join(f"{key} = ?" for key in changes)
            if failing is not None:
                # Failing drops the backlog, and a re-enabled endpoint starts at the present.
                assignments += f", delivered_through = {_MAX_EVENT_ID}"
            await self._pool.execute(
                "webhook_update",
                f"UPDATE webhooks SET {assignments} WHERE id = ? AND account_id = ?",
                (*changes.values(), webhook_id, account_id),
            )
        return await self.get(account_id, webhook_id)

    async def set_failing(self, webhook_id: int, failing: bool) -> None:
        """Mark an endpoint failing (by the dispatcher, which knows only its id)."""
        await self._pool.execute(
            "webhook_failing",
            f"UPDATE webhooks SET failing = ?, delivered_through = {_MAX_EVENT_ID} WHERE id = ?",
            (failing, webhook_id),
        )

    async def active(self) -> builtins.list[Webhook]:
        """Every endpoint not failing, of every account: what a starting dispatcher resumes."""
        rows = await self._pool.execute(
            "webhook_active", f"SELECT {_COLUMNS} FROM webhooks WHERE failing = ? ORDER BY id", (False,)
        )
        return [_webhook(r) for r in rows]

    async def events_after(
        self, account_id: int, after_id: int, event_types: frozenset[str], limit: int
    ) -> builtins.list[Row]:
        """
        The account's stored events with an id above ``after_id`` (of
        ``event_types``, or all when empty), oldest first: rows of
        ``EVENT_ROW_COLUMNS``.
        """
        sql = f"SELECT {EVENT_ROW_COLUMNS} FROM events WHERE account_id = ? AND id > ?"
        args: builtins.list[object] = [account_id, after_id]
        if event_types:
            sql += f" AND type IN ({', '.join('?' * len(event_types))})"
            args.extend(sorted(event_types))
        return await self._pool.execute("webhook_events_after", sql + " ORDER BY id LIMIT ?", [*args, limit])

    async def claim(self, webhook_id: int, owner: str, until: float) -> int | None:
        """
        Take or renew the delivery lease of ``webhook_id`` for ``owner``
        until ``until``: the endpoint's stored cursor, or None while another
        node's lease runs (or the endpoint is failing or gone).
        """

        async def txn_fn(txn: Transaction) -> int | None:
            changed = await txn.update(
                "UPDATE webhooks SET lease_owner = ?, lease_until = ? WHERE id = ? AND failing = ?"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
                (owner, until, webhook_id, False, owner, self._clock.seconds()),
            )
            if not changed:
                return None
            rows = await txn.execute("SELECT delivered_through FROM webhooks WHERE id = ?", (webhook_id,))
            return int(rows[0][0]) if rows else None

        return await self._pool.interaction("webhook_claim", txn_fn)

    async def release(self, webhook_id: int, owner: str) -> None:
        """Give up the lease at shutdown, so another node need not wait for it to run out."""
        await self._pool.execute(
            "webhook_release",
            "UPDATE webhooks SET lease_owner = NULL, lease_until = 0 WHERE id = ? AND lease_owner = ?",
            (webhook_id, owner),
        )

    async def advance(self, webhook_id: int, event_id: int) -> None:
        """Record that the endpoint acknowledged every event up to ``event_id`` (never moves back)."""
        await self._pool.execute(
            "webhook_advance",
            "UPDATE webhooks SET delivered_through = ? WHERE id = ? AND delivered_through < ?",
            (event_id, webhook_id, event_id),
        )

    async def delete(self, account_id: int, webhook_id: int) -> None:
        async def txn_fn(txn: Transaction) -> int:
            # Explicitly, as SQLite enforces ON DELETE CASCADE only with foreign keys on.
            await txn.execute(
                "DELETE FROM webhook_attempts WHERE webhook_id IN"
                " (SELECT id FROM webhooks WHERE id = ? AND account_id = ?)",
                (webhook_id, account_id),
            )
            return await txn.update("DELETE FROM webhooks WHERE id = ? AND account_id = ?", (webhook_id, account_id))

        if not await self._pool.interaction("webhook_delete", txn_fn):
            raise NotFound(f"no webhook {webhook_id} in this account")

    async def record_attempt(
        self, webhook_id: int, ts: float, status: int | None, error: str | None, events: int
    ) -> None:
        await self._pool.execute(
            "webhook_attempt",
            "INSERT INTO webhook_attempts (webhook_id, ts, status, error, events) VALUES (?, ?, ?, ?, ?)",
            (webhook_id, ts, status, error, events),
        )

    async def attempts(
        self, account_id: int, webhook_id: int, limit: int = 100, before_id: int | None = None
    ) -> builtins.list[WebhookAttempt]:
        """The latest attempts first; ``before_id`` pages back in time."""
        sql = (
            f"SELECT {_ATTEMPT_COLUMNS} FROM webhook_attempts a JOIN webhooks w ON w.id = a.webhook_id"
            " WHERE a.webhook_id = ? AND w.account_id = ?"
        )
        args: builtins.list[object] = [webhook_id, account_id]
        if before_id is not None:
            sql += " AND a.id < ?"
            args.append(before_id)
        rows = await self._pool.execute("webhook_attempts", sql + " ORDER BY a.id DESC LIMIT ?", [*args, limit])
        return [_attempt(r) for r in rows]
