"""
Tests for mailrelay.storage.changes: the admin change counter (triggers, on
SQLite and PostgreSQL) and ``ChangeWatcher`` (on a Clock), and the caches it
clears not keeping a value read before the clear.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.policy.directory import TTLCache
from mailrelay.queue.render import StoreDirectory
from mailrelay.smtp.auth import LoginCache
from mailrelay.storage.changes import ChangeWatcher
from tests.support.db import fresh_store


class CounterMixin:
    engine: str

    async def test_counter_moves_on_admin_changes(self) -> None:
        """Accounts, credentials and sending domains move the counter, whoever writes; other tables do not."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        watcher = ChangeWatcher(store.pool, Clock())
        seen = [await watcher.generation()]

        async def moved() -> bool:
            now = await watcher.generation()
            changed = now != seen[-1]
            seen.append(now)
            return changed

        account = await store.accounts.create("shop", "hash")
        self.assertTrue(await moved())  # type: ignore[attr-defined]
        await store.accounts.update("shop", suspended=True)
        self.assertTrue(await moved())  # type: ignore[attr-defined]
        domain = await store.domains.add(account.id, "example.com", "s1", "key")
        self.assertTrue(await moved())  # type: ignore[attr-defined]
        await store.domains.set_verified("example.com", True)
        self.assertTrue(await moved())  # type: ignore[attr-defined]
        credential = await store.credentials.create(account.id, "api_token", "0" * 64, domain_id=domain.id)
        self.assertTrue(await moved())  # type: ignore[attr-defined]
        await store.credentials.revoke(account.id, credential.id)
        self.assertTrue(await moved())  # type: ignore[attr-defined]
        await store.suppressions.add(account.id, "dead@example.net", "hard_bounce")
        await store.campaigns.named(account.id, "spring")
        self.assertFalse(await moved())  # type: ignore[attr-defined]
        await store.domains.remove("example.com")
        self.assertTrue(await moved())  # type: ignore[attr-defined]

    async def test_watcher_on_the_database(self) -> None:
        """A change by another writer (another Store on the same database) clears the subscribers once."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        watcher = ChangeWatcher(store.pool, Clock())
        told: list[str] = []
        watcher.subscribe(lambda: told.append("forget"))
        await watcher.start()
        self.assertEqual((await watcher.poll(), told), (False, []))  # type: ignore[attr-defined]
        await store.accounts.create("shop", "hash")
        self.assertEqual((await watcher.poll(), told), (True, ["forget"]))  # type: ignore[attr-defined]
        self.assertEqual((await watcher.poll(), told), (False, ["forget"]))  # type: ignore[attr-defined]
        await watcher.stop()


class SQLiteCounterTests(CounterMixin, TestCase):
    engine = "sqlite"


class PostgresCounterTests(CounterMixin, TestCase):
    engine = "postgresql"


class _Pool:
    """Answers the counter's query from ``value``; ``error`` makes it fail, ``hold`` keeps it pending."""

    def __init__(self) -> None:
        self.value = 0
        self.error = False
        self.hold: Deferred[Any] | None = None
        self.reads = 0

    def execute(self, desc: str, sql: str, args: Any = ()) -> Deferred[Any]:
        self.reads += 1
        if self.hold is not None:
            return self.hold
        if self.error:
            return fail(RuntimeError("database is down"))
        return succeed([(self.value,)])


class WatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = _Pool()
        self.watcher = ChangeWatcher(self.pool, self.clock, interval=1.0)  # type: ignore[arg-type]
        self.told: list[int] = []
        self.watcher.subscribe(lambda: self.told.append(self.pool.value))

    def start(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.watcher.start()))

    def test_polls_every_interval_and_tells_once_per_change(self) -> None:
        self.start()
        self.assertEqual((self.pool.reads, self.told), (1, []))
        self.clock.advance(1.0)
        self.assertEqual((self.pool.reads, self.told), (2, []))
        self.pool.value = 5
        self.clock.advance(0.5)
        self.assertEqual(self.told, [])
        self.clock.advance(0.5)
        self.assertEqual((self.pool.reads, self.told), (3, [5]))
        self.clock.advance(1.0)
        self.assertEqual((self.pool.reads, self.told), (4, [5]))

    def test_failed_read_then_success_clears(self) -> None:
        """What changed while the counter could not be read is unknown: the next good read clears."""
        self.start()
        self.pool.error = True
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.told, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged once, not every second
        self.pool.error = False
        self.clock.advance(1.0)
        self.assertEqual(self.told, [0])
        self.clock.advance(1.0)
        self.assertEqual(self.told, [0])

    def test_failing_subscriber_does_not_stop_the_others(self) -> None:
        def broken() -> None:
            raise ValueError("broken cache")

        self.watcher._subscribers.insert(0, broken)
        self.start()
        self.pool.value = 1
        self.clock.advance(1.0)
        self.assertEqual(self.told, [1])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.pool.value = 2
        self.clock.advance(1.0)
        self.assertEqual(self.told, [1, 2])
        self.flushLoggedErrors(ValueError)

    def test_stop_cancels_and_waits_for_a_read(self) -> None:
        self.start()
        self.pool.hold = Deferred()
        self.clock.advance(1.0)
        stopped = self.watcher.stop()
        self.assertNoResult(stopped)
        self.pool.value = 7
        self.pool.hold.callback([(7,)])
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.told, [7])  # the read under way still counts

    def test_interval_zero_reads_once(self) -> None:
        self.watcher.interval = 0
        self.start()
        self.assertEqual((self.pool.reads, self.clock.getDelayedCalls()), (1, []))
        self.successResultOf(self.watcher.stop())


class CachesKeepNothingReadBeforeAClear(SynchronousTestCase):
    """A value loaded while the watcher clears may be stale: it is handed out, not kept."""

    def test_ttl_cache(self) -> None:
        clock = Clock()
        pending: list[Deferred[str]] = []

        def load(key: str) -> Deferred[str]:
            d: Deferred[str] = Deferred()
            pending.append(d)
            return d

        cache: TTLCache[str, str] = TTLCache(clock, 30.0, load)  # type: ignore[arg-type]
        got = Deferred.fromCoroutine(cache.get("a"))
        cache.clear()
        pending[0].callback("old")
        self.assertEqual(self.successResultOf(got), "old")
        self.assertIsNone(cache.fresh("a"))
        got = Deferred.fromCoroutine(cache.get("a"))
        pending[1].callback("new")
        self.assertEqual((self.successResultOf(got), cache.fresh("a")), ("new", ("new",)))

    def test_login_cache(self) -> None:
        cache = LoginCache(Clock(), 60.0)
        key = cache.key("user", "secret")
        epoch = cache.epoch
        cache.clear()
        cache.put(key, object(), epoch)  # type: ignore[arg-type]
        self.assertIsNone(cache.get(key))
        cache.put(key, "principal", cache.epoch)  # type: ignore[arg-type]
        self.assertEqual(cache.get(key), "principal")

    def test_queue_directory(self) -> None:
        accounts: list[Deferred[Any]] = []

        class Accounts:
            def by_id(self, account_id: int) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                accounts.append(d)
                return d

        class Store:
            suppressions = None

        store = Store()
        store.accounts = Accounts()  # type: ignore[attr-defined]
        directory = StoreDirectory(store, Clock())
        row = _Account()
        first = Deferred.fromCoroutine(directory.account(1))
        directory.forget_all()
        accounts[0].callback(row)
        self.assertEqual(self.successResultOf(first).id, 1)
        second = Deferred.fromCoroutine(directory.account(1))
        self.assertEqual(len(accounts), 2)  # not kept: read again
        accounts[1].callback(row)
        self.successResultOf(second)
        self.successResultOf(Deferred.fromCoroutine(directory.account(1)))
        self.assertEqual(len(accounts), 2)  # kept now


class _Account:
    id = 1
    open_tracking = click_tracking = unsubscribe_link = False
    notification_address = header_text = footer_text = header_html = footer_html = None
