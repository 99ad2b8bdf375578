"""
The storage layer, run once on SQLite and once on PostgreSQL.

Each test class at the bottom binds the shared tests to one engine.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from mailrelay import secrets
from mailrelay.storage import migrations
from mailrelay.storage.database import DatabaseUnavailable, make_pool
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.migrations import SchemaTooNew
from mailrelay.storage.store import Store, open_store
from tests.support.db import fresh_database_url, fresh_store


class StorageTestsMixin:
    engine: str

    async def store(self) -> Store:
        return await fresh_store(self, self.engine)  # type: ignore[arg-type]

    async def test_migrations_recorded(self) -> None:
        """Opening a store applies every migration and records the latest version."""
        store = await self.store()
        version = await migrations.schema_version(store.pool)
        self.assertEqual(version, migrations.latest_version())  # type: ignore[attr-defined]
        self.assertEqual(await migrations.migrate(store.pool), [])  # type: ignore[attr-defined]

    async def test_newer_schema_refused(self) -> None:
        """A database migrated by a newer binary is refused with a sentence saying so."""
        url = fresh_database_url(self, self.engine)  # type: ignore[arg-type]
        store = await open_store(url, __import__("twisted.internet.reactor").internet.reactor)
        newer = migrations.latest_version() + 1
        await store.pool.execute(
            "t", "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", (newer, "future", 0.0)
        )
        await store.close()
        from twisted.internet import reactor

        try:
            await open_store(url, reactor)
        except SchemaTooNew as e:
            self.assertIn(f"schema version {newer}", str(e))  # type: ignore[attr-defined]
            self.assertIn("upgrade mailrelay", str(e))  # type: ignore[attr-defined]
        else:
            self.fail("a newer schema was accepted")  # type: ignore[attr-defined]

    async def test_accounts_and_subaccounts(self) -> None:
        """Accounts, sub-accounts (parent\\child logins), flags and quotas round-trip."""
        store = await self.store()
        parent = await store.accounts.create("shop", secrets.hash_password("pw"), daily_quota=100)
        child = await store.accounts.create("billing", None, parent="shop")
        self.assertEqual(child.parent_id, parent.id)  # type: ignore[attr-defined]
        self.assertEqual(child.login, "shop\\billing")  # type: ignore[attr-defined]
        self.assertEqual((await store.accounts.get("shop\\billing")).id, child.id)  # type: ignore[attr-defined]
        self.assertEqual(parent.daily_quota, 100)  # type: ignore[attr-defined]
        suspended = await store.accounts.update("shop", suspended=True)
        self.assertFalse(suspended.can_send)  # type: ignore[attr-defined]
        with self.assertRaises(Conflict):  # type: ignore[attr-defined]
            await store.accounts.create("shop", None)
        with self.assertRaises(NotFound):  # type: ignore[attr-defined]
            await store.accounts.create("x", None, parent="nobody")
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            await store.accounts.create("bad name", None)
        record = await store.credentials.account_login("shop")
        assert record is not None
        self.assertTrue(secrets.verify_password(record.password_hash or "", "pw"))  # type: ignore[attr-defined]
        self.assertFalse(secrets.verify_password(record.password_hash or "", "nope"))  # type: ignore[attr-defined]
        self.assertIsNone(await store.credentials.account_login("nobody"))  # type: ignore[attr-defined]

    async def test_domains(self) -> None:
        """Sending domains are unique, normalised, and carry their verification state."""
        store = await self.store()
        account = await store.accounts.create("shop", None)
        added = await store.domains.add(account.id, "Mail.Example.COM", "mr1", "PEM")
        self.assertEqual(added.domain, "mail.example.com")  # type: ignore[attr-defined]
        self.assertFalse(added.verified)  # type: ignore[attr-defined]
        verified = await store.domains.set_verified("mail.example.com", True)
        self.assertTrue(verified.verified)  # type: ignore[attr-defined]
        self.assertIsNotNone(verified.verified_at)  # type: ignore[attr-defined]
        with self.assertRaises(Conflict):  # type: ignore[attr-defined]
            await store.domains.add(account.id, "mail.example.com", "mr1", "PEM")
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            await store.domains.add(account.id, "not a domain", "mr1", "PEM")
        self.assertEqual(
            [d.domain for d in await store.domains.list(account.id)],  # type: ignore[attr-defined]
            ["mail.example.com"],
        )

    async def test_credentials(self) -> None:
        """Generated credentials are found by their SHA-256 only, with scopes, until revoked."""
        store = await self.store()
        account = await store.accounts.create("shop", None)
        domain = await store.domains.add(account.id, "example.com", "mr1", "PEM")
        secret = secrets.new_secret("api_key")
        cred = await store.credentials.create(account.id, "api_key", secrets.secret_hash(secret), scopes=["smtp:send"])
        self.assertEqual(cred.scopes, frozenset({"smtp:send"}))  # type: ignore[attr-defined]
        record = await store.credentials.token_login("api_key", secrets.secret_hash(secret))
        assert record is not None
        self.assertEqual((record.account_id, record.scopes), (account.id, frozenset({"smtp:send"})))  # type: ignore[attr-defined]
        self.assertIsNone(await store.credentials.token_login("api_token", secrets.secret_hash(secret)))  # type: ignore[attr-defined]
        user = await store.credentials.create(
            account.id, "smtp_user", secrets.secret_hash("pw2"), username="u1@example.com", domain_id=domain.id
        )
        login = await store.credentials.token_login("smtp_user", secrets.secret_hash("pw2"))
        assert login is not None
        self.assertEqual((login.domain, login.username), ("example.com", "u1@example.com"))  # type: ignore[attr-defined]
        await store.credentials.revoke(account.id, username="u1@example.com")
        self.assertIsNone(await store.credentials.token_login("smtp_user", secrets.secret_hash("pw2")))  # type: ignore[attr-defined]
        self.assertEqual([c.id for c in await store.credentials.list(account.id)], [cred.id])  # type: ignore[attr-defined]
        self.assertNotEqual(user.id, cred.id)  # type: ignore[attr-defined]
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            await store.credentials.create(account.id, "api_key", "x", scopes=["root"])

    async def test_lists_and_members(self) -> None:
        """Lists belong to one account; members are deduplicated; another account cannot see them."""
        store = await self.store()
        a = await store.accounts.create("a", None)
        b = await store.accounts.create("b", None)
        lst = await store.lists.create(a.id, "Customers")
        added = await store.lists.add_members(lst.id, ["x@Example.com", "x@example.com", "y@example.com"])
        self.assertEqual(added, 2)  # type: ignore[attr-defined]
        self.assertEqual(await store.lists.add_members(lst.id, ["y@example.com"]), 0)  # type: ignore[attr-defined]
        self.assertEqual(
            [m.address for m in await store.lists.members(lst.id)],  # type: ignore[attr-defined]
            ["x@example.com", "y@example.com"],
        )
        self.assertEqual((await store.lists.get(a.id, lst.guid)).members, 2)  # type: ignore[attr-defined]
        with self.assertRaises(NotFound):  # type: ignore[attr-defined]
            await store.lists.get(b.id, lst.guid)
        self.assertEqual(await store.lists.remove_members(lst.id, ["x@example.com"]), 1)  # type: ignore[attr-defined]
        again = await store.lists.get_or_create(a.id, "Customers")
        self.assertEqual(again.id, lst.id)  # type: ignore[attr-defined]

    async def test_campaigns(self) -> None:
        """Campaigns are found by guid within the account, or by subject; named ones are created once."""
        store = await self.store()
        a = await store.accounts.create("a", None)
        c = await store.campaigns.create(a.id, "Welcome", subject="Welcome aboard")
        self.assertEqual((await store.campaigns.get(a.id, c.guid)).name, "Welcome")  # type: ignore[attr-defined]
        found = await store.campaigns.by_subject(a.id, "Welcome aboard")
        assert found is not None
        self.assertEqual(found.id, c.id)  # type: ignore[attr-defined]
        self.assertIsNone(await store.campaigns.by_subject(a.id, "Other"))  # type: ignore[attr-defined]
        first = await store.campaigns.named(a.id, "Transactional Campaign")
        second = await store.campaigns.named(a.id, "Transactional Campaign")
        self.assertEqual(first.id, second.id)  # type: ignore[attr-defined]

    async def test_suppressions(self) -> None:
        """Suppressions upsert, expire, respect scopes, and are removable."""
        store = await self.store()
        a = await store.accounts.create("a", None)
        await store.suppressions.add(a.id, "Dead@Example.com", "hard_bounce", detail="550 5.1.1")
        await store.suppressions.add(a.id, "old@example.com", "manual", expires_at=1.0)
        await store.suppressions.add(a.id, "l@example.com", "unsubscribe", scope="list:abc")
        found = await store.suppressions.suppressed(
            a.id, ["dead@example.com", "old@example.com", "l@example.com", "ok@example.com"]
        )
        self.assertEqual(sorted(found), ["dead@example.com"])  # type: ignore[attr-defined]
        with_list = await store.suppressions.suppressed(a.id, ["l@example.com"], list_guid="abc")
        self.assertEqual(list(with_list), ["l@example.com"])  # type: ignore[attr-defined]
        await store.suppressions.add(a.id, "dead@example.com", "complaint")
        listed = await store.suppressions.list(a.id)
        self.assertEqual(len(listed), 3)  # type: ignore[attr-defined]
        self.assertIn("complaint", [s.reason for s in listed])  # type: ignore[attr-defined]
        await store.suppressions.remove(a.id, "dead@example.com")
        with self.assertRaises(NotFound):  # type: ignore[attr-defined]
            await store.suppressions.remove(a.id, "dead@example.com")
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            await store.suppressions.add(a.id, "x@example.com", "because")

    async def test_counters(self) -> None:
        """Daily counters add up across separate increments (upsert)."""
        store = await self.store()
        await store.counters.add([(1, "2026-11-22", "", "sent", 2), (1, "2026-11-22", "", "sent", 3)])
        await store.counters.add([(1, "2026-11-22", "", "sent", 5)])
        self.assertEqual(await store.counters.get(1, "2026-11-22", "sent"), 10)  # type: ignore[attr-defined]
        self.assertEqual(await store.counters.get(1, "2026-11-23", "sent"), 0)  # type: ignore[attr-defined]

    async def test_rollback(self) -> None:
        """A transaction that raises leaves nothing behind."""
        store = await self.store()

        async def fail(txn):  # type: ignore[no-untyped-def]
            await txn.execute("INSERT INTO accounts (name, created_at) VALUES (?, ?)", ("ghost", 0.0))
            raise ValueError("stop")

        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            await store.pool.interaction("t", fail)
        self.assertEqual(await store.accounts.list(), [])  # type: ignore[attr-defined]


class SQLiteStorageTests(StorageTestsMixin, TestCase):
    engine = "sqlite"


class PostgresStorageTests(StorageTestsMixin, TestCase):
    engine = "postgresql"


class UnreachableDatabaseTests(TestCase):
    async def test_unreachable_postgres(self) -> None:
        """A PostgreSQL nobody listens on gives one sentence naming it, without the password."""
        from twisted.internet import reactor

        pool = make_pool("postgresql://u:s3cret@127.0.0.1:1/db?connect_timeout=2", reactor)
        with self.assertRaises(DatabaseUnavailable) as ctx:
            await pool.start()
        self.assertIn("cannot connect to PostgreSQL", str(ctx.exception))
        self.assertNotIn("s3cret", str(ctx.exception))
