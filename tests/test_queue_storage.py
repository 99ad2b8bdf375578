"""
The queue's storage side on both engines: the ``recipients`` rows it
writes (batched, coalesced upserts) and ``StoreDirectory`` (accounts,
sending domains with their header/footer, suppressions).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.queue.records import RecipientRecords
from mailrelay.queue.render import StoreDirectory
from tests.support.db import fresh_store


class _Storage:
    engine = "sqlite"

    async def store(self) -> Any:
        return await fresh_store(self, self.engine)  # type: ignore[arg-type]

    async def test_recipient_rows(self) -> None:
        """Rows are upserted in one batch; a later state of the same recipient replaces the earlier one."""
        store = await self.store()
        records = RecipientRecords(store.pool, reactor, interval=0.01)  # type: ignore[arg-type]
        records.put("Q1", 0, "a@example.net", "deferred", 1, "451 4.7.1 later")
        records.put("Q1", 1, "b@example.net", "delivered", 1, "250 ok")
        await records.flush()
        records.put("Q1", 0, "a@example.net", "delivered", 2, "250 ok")
        records.put("Q1", 0, "a@example.net", "delivered", 2, "250 2.0.0 ok")  # same key twice in one batch
        await records.stop()
        rows = await store.pool.execute(
            "t",
            "SELECT rcpt_index, address, state, attempts, last_reply FROM recipients"
            " WHERE queue_id = ? ORDER BY rcpt_index",
            ("Q1",),
        )
        self.assertEqual(
            [tuple(r) for r in rows],
            [(0, "a@example.net", "delivered", 2, "250 2.0.0 ok"), (1, "b@example.net", "delivered", 1, "250 ok")],
        )

    async def test_directory(self) -> None:
        """Account settings, the sending domain's key and footer, and suppressions come through StoreDirectory."""
        store = await self.store()
        account = await store.accounts.create("shop", None)
        await store.accounts.update("shop", open_tracking=True, footer_text="ACCOUNT", notification_address="it@x.test")
        await store.domains.add(account.id, "example.com", "sel", "KEY")
        await store.domains.set_verified("example.com", True)
        await store.pool.execute(
            "t", "UPDATE sending_domains SET footer_html = ? WHERE domain = ?", ("<p>DOMAIN</p>", "example.com")
        )
        directory = StoreDirectory(store, reactor)
        info = await directory.account(account.id)
        assert info is not None and info.decoration is not None
        self.assertEqual(
            (info.open_tracking, info.notification_address, info.decoration.text_footer), (True, "it@x.test", "ACCOUNT")
        )
        self.assertIsNone(await directory.account(999))
        domain = await directory.sending_domain("EXAMPLE.com")
        assert domain is not None and domain.decoration is not None
        self.assertEqual(
            (domain.verified, domain.selector, domain.private_key, domain.decoration.html_footer),
            (True, "sel", "KEY", "<p>DOMAIN</p>"),
        )
        self.assertIsNone(await directory.sending_domain("other.example"))
        await directory.suppress(account.id, "Gone@Example.net", "hard_bounce", "550 5.1.1 unknown", None)
        found = await directory.suppressed(account.id, ["gone@example.net", "ok@example.net"], None)
        self.assertEqual(dict(found), {"gone@example.net": "hard_bounce"})


    async def test_directory_dkim_signing(self) -> None:
        """
        The domain's DKIM signing switch comes through StoreDirectory and,
        like ``verified``, through its cache: a change shows once the
        cached entry expires.
        """
        store = await self.store()
        account = await store.accounts.create("shop", None)
        await store.domains.add(account.id, "example.com", "sel", "KEY")
        await store.domains.set_verified("example.com", True)
        clock = Clock()
        directory = StoreDirectory(store, clock, ttl=60.0)
        domain = await directory.sending_domain("example.com")
        assert domain is not None
        self.assertEqual((domain.dkim_signing, domain.signs), (True, True))
        await store.domains.set_dkim_signing("example.com", False)
        cached = await directory.sending_domain("example.com")
        assert cached is not None
        self.assertTrue(cached.dkim_signing)
        clock.advance(60)
        domain = await directory.sending_domain("example.com")
        assert domain is not None
        self.assertEqual((domain.verified, domain.dkim_signing, domain.signs), (True, False, False))


class SQLiteStorageTests(_Storage, TestCase):
    engine = "sqlite"


class PostgresStorageTests(_Storage, TestCase):
    engine = "postgresql"


class RecordsRetryTests(SynchronousTestCase):
    def test_failed_batch_is_kept(self) -> None:
        """A batch the database refuses is kept and written later, without losing newer states."""
        from twisted.internet.defer import fail, succeed

        calls: list[Any] = []

        class Pool:
            down = True

            def execute(self, desc: str, sql: str, args: Any) -> Any:
                calls.append((sql, list(args)))
                return fail(ConnectionError("down")) if self.down else succeed([])

        pool, clock = Pool(), Clock()
        records = RecipientRecords(pool, clock, interval=1.0)
        records.put("Q", 0, "a@example.net", "deferred", 1)
        clock.advance(1)
        self.assertEqual(len(calls), 1)
        self.assertIn("ON CONFLICT (queue_id, rcpt_index) DO UPDATE", calls[0][0])
        records.put("Q", 0, "a@example.net", "delivered", 2)
        pool.down = False
        clock.advance(1)
        self.assertEqual(calls[-1][1][:5], ["Q", 0, "a@example.net", "delivered", 2])
        self.assertEqual(records.written, 1)
        self.flushLoggedErrors(ConnectionError)
