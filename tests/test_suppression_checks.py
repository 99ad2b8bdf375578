"""Tests for mailrelay.storage.suppressions.CoalescedChecks, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from mailrelay.storage.store import Store
from mailrelay.storage.suppressions import CoalescedChecks, Suppressions
from tests.support.db import fresh_store


class _Counting(Suppressions):
    """The real suppressions, counting the queries."""

    def __init__(self, real: Suppressions) -> None:
        super().__init__(real._pool, real._clock)
        self.queries: list[tuple[int, list[str], str | None]] = []
        self.fail = False

    async def suppressed(self, account_id: int, addresses: Any, list_guid: str | None = None) -> Any:
        addresses = list(addresses)
        self.queries.append((account_id, addresses, list_guid))
        if self.fail:
            raise RuntimeError("database is down")
        return await super().suppressed(account_id, addresses, list_guid)


class CoalescedChecksMixin:
    engine: str

    async def setup_store(self) -> tuple[Store, int, int]:
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        a = await store.accounts.create("a", None)
        b = await store.accounts.create("b", None)
        await store.suppressions.add(a.id, "Dead@Example.com", "hard_bounce")
        await store.suppressions.add(a.id, "l@example.com", "unsubscribe", scope="list:abc")
        await store.suppressions.add(b.id, "other@example.com", "complaint")
        return store, a.id, b.id

    async def test_one_query_per_account_and_list_same_answers(self) -> None:
        """Checks asked in one turn become one query per (account, list); each gets what it alone would."""
        store, a, b = await self.setup_store()
        counting = _Counting(store.suppressions)
        checks = CoalescedChecks(counting, reactor)
        asks = [
            (a, ["dead@example.com", "ok@example.com"], None),
            (a, ["DEAD@example.COM"], None),
            (a, ["l@example.com", "not an address"], None),
            (a, ["l@example.com"], "abc"),
            (b, ["other@example.com", "dead@example.com"], None),
            (a, [], None),
        ]
        got = await gatherResults([checks.suppressed(*ask) for ask in asks])
        self.assertEqual(len(counting.queries), 3)  # type: ignore[attr-defined]
        alone = [await store.suppressions.suppressed(*ask) for ask in asks]
        self.assertEqual(got, alone)  # type: ignore[attr-defined]
        self.assertEqual([sorted(g) for g in got], [  # type: ignore[attr-defined]
            ["dead@example.com"], ["DEAD@example.COM"], [], ["l@example.com"], ["other@example.com"], []])

    async def test_failure_reaches_every_waiter(self) -> None:
        """A failed query fails each check that shared it; the next turn queries again."""
        store, a, _ = await self.setup_store()
        counting = _Counting(store.suppressions)
        counting.fail = True
        checks = CoalescedChecks(counting, reactor)
        first, second = checks.suppressed(a, ["x@example.com"]), checks.suppressed(a, ["y@example.com"])
        for d in (first, second):
            with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
                await d
        counting.fail = False
        self.assertEqual(await checks.suppressed(a, ["dead@example.com"]), {  # type: ignore[attr-defined]
            "dead@example.com": (await store.suppressions.suppressed(a, ["dead@example.com"]))["dead@example.com"]})
        self.assertEqual(len(counting.queries), 2)  # type: ignore[attr-defined]


class SQLiteCoalescedChecksTests(CoalescedChecksMixin, TestCase):
    engine = "sqlite"


class PostgresCoalescedChecksTests(CoalescedChecksMixin, TestCase):
    engine = "postgresql"
