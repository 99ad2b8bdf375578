"""
The storage layer, run once on SQLite and once on PostgreSQL.

Each test class at the bottom binds the shared tests to one engine.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from mailrelay import secrets
from mailrelay.storage import migrations
from mailrelay.storage.campaigns import TRANSACTIONAL_CAMPAIGN
from mailrelay.storage.database import DatabaseUnavailable, SQLiteTransactionError, Transaction, make_pool
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.lists import TRANSACTIONAL_LIST
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
        self.assertEqual(  # type: ignore[attr-defined]
            [d.domain for d in await store.domains.list(account.id)],  # type: ignore[attr-defined]
            ["mail.example.com"],
        )

    async def test_domain_remove_revokes_its_credentials(self) -> None:
        """A domain with SMTP users and tokens (one revoked already) is removed; none of them logs in again."""
        store = await self.store()
        account = await store.accounts.create("shop", None)
        domain = await store.domains.add(account.id, "example.com", "mr1", "PEM")
        await store.credentials.create(account.id, "smtp_user", secrets.secret_hash("pw1"), username="u1@example.com",
                                       domain_id=domain.id)
        old = await store.credentials.create(account.id, "api_token", secrets.secret_hash("t1"), domain_id=domain.id)
        await store.credentials.revoke(account.id, old.id)
        await store.domains.remove("example.com")
        with self.assertRaises(NotFound):  # type: ignore[attr-defined]
            await store.domains.get("example.com")
        self.assertIsNone(await store.credentials.token_login("smtp_user", secrets.secret_hash("pw1")))  # type: ignore[attr-defined]
        self.assertEqual(await store.credentials.list(account.id), [])  # type: ignore[attr-defined]
        again = await store.domains.add(account.id, "example.com", "mr2", "PEM")
        await store.credentials.create(account.id, "smtp_user", secrets.secret_hash("pw2"), username="u2@example.com",
                                       domain_id=again.id)
        login = await store.credentials.token_login("smtp_user", secrets.secret_hash("pw2"))
        self.assertEqual(login.domain if login else None, "example.com")  # type: ignore[attr-defined]

    async def test_domain_dkim_signing(self) -> None:
        """A domain signs by default; ``set_dkim_signing`` switches it off and on; an unknown domain is NotFound."""
        store = await self.store()
        account = await store.accounts.create("shop", None)
        added = await store.domains.add(account.id, "mail.example.com", "mr1", "PEM")
        self.assertIs(added.dkim_signing, True)  # type: ignore[attr-defined]
        off = await store.domains.set_dkim_signing("Mail.Example.com", False)
        self.assertIs(off.dkim_signing, False)  # type: ignore[attr-defined]
        self.assertIs((await store.domains.get("mail.example.com")).dkim_signing, False)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            [d.dkim_signing for d in await store.domains.list(account.id)], [False]
        )
        # Verification leaves the switch alone.
        verified = await store.domains.set_verified("mail.example.com", True)
        self.assertEqual((verified.verified, verified.dkim_signing), (True, False))  # type: ignore[attr-defined]
        on = await store.domains.set_dkim_signing("mail.example.com", True)
        self.assertIs(on.dkim_signing, True)  # type: ignore[attr-defined]
        self.assertIs((await store.domains.get("mail.example.com")).dkim_signing, True)  # type: ignore[attr-defined]
        with self.assertRaises(NotFound):  # type: ignore[attr-defined]
            await store.domains.set_dkim_signing("other.example.com", False)

    async def test_migration_005_existing_domains_keep_signing(self) -> None:
        """
        Migration 005 applied to a version-4 database adds the switch, on
        for the domains already there (verified or not) and for new ones.
        """
        from twisted.internet import reactor

        url = fresh_database_url(self, self.engine)  # type: ignore[arg-type]
        store = await open_store(url, reactor, pool_size=2, apply_migrations=False)
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))  # type: ignore[attr-defined]
        await migrations.migrate(store.pool, target=4)
        self.assertEqual(await migrations.schema_version(store.pool), 4)  # type: ignore[attr-defined]

        async def seed(txn: Transaction) -> None:
            account = await txn.insert("INSERT INTO accounts (name, created_at) VALUES (?, ?)", ("shop", 0.0))
            for name, verified in (("a.example", True), ("b.example", False)):
                await txn.execute(
                    "INSERT INTO sending_domains (account_id, domain, verified, dkim_selector, dkim_private_key,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (account, name, verified, "s1", "PEM", 1.0),
                )

        await store.pool.interaction("seed", seed)
        applied = await migrations.migrate(store.pool)
        self.assertEqual([m.version for m in applied][:1], [5])  # type: ignore[attr-defined]
        found = await store.domains.list()
        self.assertEqual(  # type: ignore[attr-defined]
            [(d.domain, d.verified, d.dkim_signing) for d in found],
            [("a.example", True, True), ("b.example", False, True)],
        )
        added = await store.domains.add(found[0].account_id, "c.example", "s1", "PEM")
        self.assertIs(added.dkim_signing, True)  # type: ignore[attr-defined]
        off = await store.domains.set_dkim_signing("a.example", False)
        self.assertIs(off.dkim_signing, False)  # type: ignore[attr-defined]

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
        self.assertEqual(  # type: ignore[attr-defined]
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

    async def stores_on_one_database(self, count: int) -> list[Store]:
        """``count`` stores (as on several nodes) on one fresh, migrated database."""
        from twisted.internet import reactor

        url = fresh_database_url(self, self.engine)  # type: ignore[arg-type]
        stores = []
        for _ in range(count):
            store = await open_store(url, reactor, pool_size=2)
            self.addCleanup(lambda s=store: Deferred.fromCoroutine(s.close()))  # type: ignore[attr-defined]
            stores.append(store)
        return stores

    async def test_transactional_campaign_concurrent_first_use(self) -> None:
        """
        Two nodes finding-or-creating an account's Transactional Campaign at
        once get the same campaign, and the account has exactly one.
        """
        first, second = await self.stores_on_one_database(2)
        accounts = [await first.accounts.create(f"acct{n}", None) for n in range(5)]
        calls = [
            Deferred.fromCoroutine(store.campaigns.named(a.id, TRANSACTIONAL_CAMPAIGN))
            for a in accounts
            for store in (first, second)
        ]
        results = await gatherResults(calls)
        for n, account in enumerate(accounts):
            mine, theirs = results[2 * n], results[2 * n + 1]
            self.assertEqual(mine.id, theirs.id)  # type: ignore[attr-defined]
            self.assertEqual(mine.guid, theirs.guid)  # type: ignore[attr-defined]
            self.assertEqual([c.id for c in await first.campaigns.list(account.id)], [mine.id])  # type: ignore[attr-defined]
        again = await second.campaigns.named(accounts[0].id, TRANSACTIONAL_CAMPAIGN)
        self.assertEqual(again.id, results[0].id)  # type: ignore[attr-defined]

    async def test_transactional_list_concurrent_first_use(self) -> None:
        """
        Two nodes finding-or-creating an account's Transactional list at once
        get the same list (no error from the losing insert), and there is one.
        """
        first, second = await self.stores_on_one_database(2)
        accounts = [await first.accounts.create(f"acct{n}", None) for n in range(5)]
        calls = [
            Deferred.fromCoroutine(store.lists.get_or_create(a.id, TRANSACTIONAL_LIST))
            for a in accounts
            for store in (first, second)
        ]
        results = await gatherResults(calls)
        for n, account in enumerate(accounts):
            self.assertEqual(results[2 * n].id, results[2 * n + 1].id)  # type: ignore[attr-defined]
            self.assertEqual([x.id for x in await second.lists.list(account.id)], [results[2 * n].id])  # type: ignore[attr-defined]

    async def test_second_transactional_campaign_refused(self) -> None:
        """Creating another campaign called "Transactional Campaign" is a Conflict, not a duplicate."""
        store = await self.store()
        a = await store.accounts.create("a", None)
        existing = await store.campaigns.named(a.id, TRANSACTIONAL_CAMPAIGN)
        with self.assertRaises(Conflict):  # type: ignore[attr-defined]
            await store.campaigns.create(a.id, TRANSACTIONAL_CAMPAIGN, subject="Hi")
        with self.assertRaises(Conflict):  # type: ignore[attr-defined]
            await store.campaigns.create(a.id, "Other", guid=existing.guid)
        self.assertEqual([c.id for c in await store.campaigns.list(a.id)], [existing.id])  # type: ignore[attr-defined]

    async def test_migration_004_merges_duplicate_transactional_campaigns(self) -> None:
        """
        Migration 004 applied to a version-3 database with duplicate
        Transactional Campaigns keeps the oldest of each account, points
        messages, events and statistics of the others at it, and adds the
        unique index.
        """
        from twisted.internet import reactor

        url = fresh_database_url(self, self.engine)  # type: ignore[arg-type]
        store = await open_store(url, reactor, pool_size=2, apply_migrations=False)
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))  # type: ignore[attr-defined]
        await migrations.migrate(store.pool, target=3)
        self.assertEqual(await migrations.schema_version(store.pool), 3)  # type: ignore[attr-defined]
        ids: dict[str, int] = {}

        async def seed(txn: Transaction) -> None:
            for name in ("a", "b"):
                ids[name] = await txn.insert("INSERT INTO accounts (name, created_at) VALUES (?, ?)", (name, 0.0))
            campaign = "INSERT INTO campaigns (account_id, guid, name, subject, created_at) VALUES (?, ?, ?, ?, ?)"
            for key, account, name, subject in [
                ("a1", "a", TRANSACTIONAL_CAMPAIGN, None),
                ("a2", "a", TRANSACTIONAL_CAMPAIGN, None),
                ("b1", "b", TRANSACTIONAL_CAMPAIGN, None),
                ("a3", "a", TRANSACTIONAL_CAMPAIGN, None),
                ("a-other", "a", "Receipts", "Your receipt"),
            ]:
                ids[key] = await txn.insert(campaign, (ids[account], key, name, subject, 1.0))
            for n, key in enumerate(["a1", "a2", "a3", "a-other", "b1"]):
                await txn.execute(
                    "INSERT INTO messages (queue_id, account_id, mail_from, campaign_id, size, recipients,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (f"q{n}", ids[key[0]], "s@example.com", ids[key], 10, 1, 2.0),
                )
                await txn.execute(
                    "INSERT INTO events (ts, account_id, type, queue_id, campaign_id) VALUES (?, ?, ?, ?, ?)",
                    (2.0, ids[key[0]], "queued", f"q{n}", ids[key]),
                )
            counts = [
                ("a1", "sent", 1),
                ("a2", "sent", 2),
                ("a3", "sent", 4),
                ("a3", "delivered", 3),
                ("a-other", "sent", 7),
                ("b1", "sent", 5),
            ]
            for key, metric, value in counts:
                await txn.execute(
                    "INSERT INTO daily_counts (account_id, day, dimension, metric, value) VALUES (?, ?, ?, ?, ?)",
                    (ids[key[0]], "2026-01-01", f"campaign:{ids[key]}", metric, value),
                )
            await txn.execute(
                "INSERT INTO daily_counts (account_id, day, dimension, metric, value) VALUES (?, ?, ?, ?, ?)",
                (ids["a"], "2026-01-01", "", "sent", 14),
            )

        await store.pool.interaction("seed", seed)

        applied = await migrations.migrate(store.pool)
        self.assertEqual([m.version for m in applied][:1], [4])  # type: ignore[attr-defined]
        self.assertEqual(await migrations.schema_version(store.pool), migrations.latest_version())  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            sorted(c.id for c in await store.campaigns.list(ids["a"])), sorted([ids["a1"], ids["a-other"]])
        )
        self.assertEqual([c.id for c in await store.campaigns.list(ids["b"])], [ids["b1"]])  # type: ignore[attr-defined]
        expected = [ids["a1"], ids["a1"], ids["a1"], ids["a-other"], ids["b1"]]
        rows = await store.pool.execute("t", "SELECT campaign_id FROM messages ORDER BY queue_id")
        self.assertEqual([r[0] for r in rows], expected)  # type: ignore[attr-defined]
        rows = await store.pool.execute("t", "SELECT campaign_id FROM events ORDER BY queue_id")
        self.assertEqual([r[0] for r in rows], expected)  # type: ignore[attr-defined]
        rows = await store.pool.execute(
            "t", "SELECT account_id, dimension, metric, value FROM daily_counts ORDER BY account_id, dimension, metric"
        )
        self.assertEqual(  # type: ignore[attr-defined]
            sorted(tuple(r) for r in rows),
            sorted([
                (ids["a"], "", "sent", 14),
                (ids["a"], f"campaign:{ids['a1']}", "delivered", 3),
                (ids["a"], f"campaign:{ids['a1']}", "sent", 7),
                (ids["a"], f"campaign:{ids['a-other']}", "sent", 7),
                (ids["b"], f"campaign:{ids['b1']}", "sent", 5),
            ]),
        )
        found = await store.campaigns.named(ids["a"], TRANSACTIONAL_CAMPAIGN)
        self.assertEqual(found.id, ids["a1"])  # type: ignore[attr-defined]

        async def duplicate(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO campaigns (account_id, guid, name, created_at) VALUES (?, ?, ?, ?)",
                (ids["a"], "another", TRANSACTIONAL_CAMPAIGN, 3.0),
            )

        integrity: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
        if self.engine == "postgresql":
            import psycopg2

            integrity = (psycopg2.IntegrityError,)
        with self.assertRaises(integrity):  # type: ignore[attr-defined]
            await store.pool.interaction("t", duplicate)

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

    async def test_suppression_check_every_batch_size(self) -> None:
        """Checks of 1 to 1,100 addresses (a few statement shapes, 512 per query) find exactly the suppressed."""
        store = await self.store()
        a = await store.accounts.create("a", None)
        dead = {f"dead{i}@example.com" for i in (0, 2, 510, 511, 512, 1099)}
        for address in dead:
            await store.suppressions.add(a.id, address, "hard_bounce")
        for n in (1, 2, 3, 5, 511, 512, 513, 1100):
            asked = [f"dead{i}@example.com" for i in range(n)]
            found = await store.suppressions.suppressed(a.id, asked)
            self.assertEqual(set(found), {x for x in asked if x in dead}, n)  # type: ignore[attr-defined]

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


class SQLiteTransactionTests(TestCase):
    """On SQLite a whole transaction runs on the database thread: one hop, the same outcome."""

    async def test_one_thread_hop_per_transaction(self) -> None:
        store = await fresh_store(self, "sqlite")
        pool = store.pool
        hops = []
        real_run = pool._run  # type: ignore[attr-defined]

        def counting(fn: Any, *args: Any) -> Any:
            hops.append(fn)
            return real_run(fn, *args)

        self.patch(pool, "_run", counting)

        async def three_statements(txn: Transaction) -> int:
            await txn.execute("CREATE TABLE t (x INTEGER)")
            await txn.execute_many("INSERT INTO t (x) VALUES", [(1,), (2,)])
            return await txn.update("UPDATE t SET x = x + 1")

        self.assertEqual(await pool.interaction("t", three_statements), 2)
        self.assertEqual(len(hops), 1)
        self.assertEqual(await pool.execute("t", "SELECT sum(x) FROM t"), [(5,)])

    async def test_waiting_for_something_else_rolls_back(self) -> None:
        """A transaction function that waits for a Deferred fails clearly and leaves nothing behind."""
        store = await fresh_store(self, "sqlite")
        pool = store.pool
        await pool.execute("t", "CREATE TABLE t (x INTEGER)")

        async def waits(txn: Transaction) -> None:
            await txn.execute("INSERT INTO t (x) VALUES (1)")
            await Deferred()

        with self.assertRaises(SQLiteTransactionError):
            await pool.interaction("t", waits)
        self.assertEqual(await pool.execute("t", "SELECT count(*) FROM t"), [(0,)])
        await pool.execute("t", "INSERT INTO t (x) VALUES (2)")  # the connection is usable again
        self.assertEqual(await pool.execute("t", "SELECT x FROM t"), [(2,)])
