"""The session policy: sender rules, the daily quota and the cached directory."""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.policy.directory import AccountFacts, TTLCache
from mailrelay.policy.quota import QuotaTracker
from mailrelay.policy.sender import Route, check_account, check_from_domain
from mailrelay.types import Principal, SMTPReplyError
from tests.support.db import fresh_store


def principal(domain: str | None = None) -> Principal:
    return Principal(account_id=1, account_name="shop", credential_kind="password", domain=domain)


class SenderTests(SynchronousTestCase):
    def test_verified_domain_and_subdomain(self) -> None:
        """A verified domain and its subdomains may send; case and a trailing dot do not matter."""
        verified = frozenset({"example.com"})
        self.assertEqual(check_from_domain(principal(), "example.com", verified, "sandbox.test"), Route.DELIVER)
        self.assertEqual(check_from_domain(principal(), "News.Example.com.", verified, "sandbox.test"), Route.DELIVER)

    def test_unconfigured_domain(self) -> None:
        """Any other domain gets Mailtarget's exact reply, naming the domain."""
        with self.assertRaises(SMTPReplyError) as ctx:
            check_from_domain(principal(), "badexample.com", frozenset({"example.com"}), "sandbox.test")
        self.assertEqual(str(ctx.exception.reply), "550 5.7.1 Unconfigured Sending Domain <badexample.com>")

    def test_credential_domain(self) -> None:
        """A per-domain credential sends only from its own domain, even if the account verified another."""
        verified = frozenset({"example.com", "other.example"})
        with self.assertRaises(SMTPReplyError):
            check_from_domain(principal("example.com"), "other.example", verified, "sandbox.test")
        self.assertEqual(check_from_domain(principal("example.com"), "example.com", verified, "sandbox.test"),
                         Route.DELIVER)

    def test_sandbox(self) -> None:
        """The sandbox domain needs no verified domain and is routed to the sandbox."""
        self.assertEqual(check_from_domain(principal(), "sandbox.test", frozenset(), "sandbox.test"), Route.SANDBOX)

    def test_account_standing(self) -> None:
        """Unknown, unapproved or suspended accounts are not allowed to send."""
        ok = AccountFacts(1, "shop", approved=True, suspended=False, daily_quota=None)
        self.assertIs(check_account(ok), ok)
        for facts in (None, AccountFacts(1, "s", False, False, None), AccountFacts(1, "s", True, True, None)):
            with self.assertRaises(SMTPReplyError) as ctx:
                check_account(facts)
            self.assertEqual(str(ctx.exception.reply), "550 5.7.1 Account is not allowed to send")


class TTLCacheTests(SynchronousTestCase):
    def test_expiry_and_shared_load(self) -> None:
        """Concurrent misses share one load; a value is kept for the TTL, then loaded again."""
        clock = Clock()
        loads: list[Deferred[str]] = []

        def load(key: str) -> Deferred[str]:
            d: Deferred[str] = Deferred()
            loads.append(d)
            return d

        cache: TTLCache[str, str] = TTLCache(clock, 10, load)
        first = ensureDeferred(cache.get("k"))
        second = ensureDeferred(cache.get("k"))
        self.assertEqual(len(loads), 1)
        loads[0].callback("v1")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("v1", "v1"))
        clock.advance(9)
        self.assertEqual(self.successResultOf(ensureDeferred(cache.get("k"))), "v1")
        clock.advance(2)
        third = ensureDeferred(cache.get("k"))
        self.assertEqual(len(loads), 2)
        loads[1].callback("v2")
        self.assertEqual(self.successResultOf(third), "v2")

    def test_fresh(self) -> None:
        """``fresh`` answers from the cache only: nothing while missing, loading or expired."""
        clock = Clock()
        loads: list[Deferred[str | None]] = []

        def load(key: str) -> Deferred[str | None]:
            d: Deferred[str | None] = Deferred()
            loads.append(d)
            return d

        cache: TTLCache[str, str | None] = TTLCache(clock, 10, load)
        self.assertIsNone(cache.fresh("k"))
        d = ensureDeferred(cache.get("k"))
        self.assertIsNone(cache.fresh("k"))
        loads[0].callback(None)
        self.successResultOf(d)
        self.assertEqual(cache.fresh("k"), (None,))  # a cached None is an answer too
        self.assertEqual(len(loads), 1)
        clock.advance(11)
        self.assertIsNone(cache.fresh("k"))
        self.assertEqual(len(loads), 1)


class QuotaTestsMixin:
    engine: str

    async def test_quota_across_processes(self) -> None:
        """Counts are stored: a second tracker (another process) sees the first one's acceptances."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        clock = Clock()
        clock.advance(1_800_000_000)  # 2027-01-15 08:00 UTC
        a = QuotaTracker(store.counters, clock, refresh_interval=0)
        b = QuotaTracker(store.counters, clock, refresh_interval=0)
        await a.check(7, 3, 2)
        a.add(7, 2)
        await a.flush()
        await b.check(7, 3, 1)  # 2 + 1 <= 3
        with self.assertRaises(SMTPReplyError) as ctx:  # type: ignore[attr-defined]
            await b.check(7, 3, 2)
        self.assertEqual(ctx.exception.reply.code, 451)  # type: ignore[attr-defined]
        self.assertIn("Daily sending quota exceeded, resets at 2027-01-16 00:00 UTC",  # type: ignore[attr-defined]
                      str(ctx.exception.reply))
        await a.check(7, None, 1000)  # no quota, no limit
        clock.advance(86400)  # the next UTC day starts from zero
        await b.check(7, 3, 3)

    async def test_unflushed_counts_local(self) -> None:
        """Acceptances not yet flushed still count in the process that made them."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        clock = Clock()
        tracker = QuotaTracker(store.counters, clock)
        tracker.add(1, 5)
        with self.assertRaises(SMTPReplyError):  # type: ignore[attr-defined]
            await tracker.check(1, 5, 1)
        await tracker.stop()
        self.assertEqual(clock.getDelayedCalls(), [])  # type: ignore[attr-defined]


class SQLiteQuotaTests(QuotaTestsMixin, TestCase):
    engine = "sqlite"


class PostgresQuotaTests(QuotaTestsMixin, TestCase):
    engine = "postgresql"


