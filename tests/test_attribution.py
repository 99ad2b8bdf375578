"""
Campaign and list attribution (``mailrelay.policy.attribution``) against a
real store, on SQLite and PostgreSQL: the Moosend rules, refusals naming
the header, list expansion with suppressions and its cap, and membership
adds batched off the accept path.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailrelay.policy.attribution import Attribution, UnknownCampaign, UnknownList
from mailrelay.storage.campaigns import TRANSACTIONAL_CAMPAIGN
from mailrelay.storage.lists import TRANSACTIONAL_LIST
from mailrelay.storage.store import Store
from tests.support.db import fresh_store


class AttributionTestsMixin:
    engine: str

    async def setup(self) -> tuple[Store, Attribution, Clock, int, int]:
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        shop = await store.accounts.create("shop", None)
        other = await store.accounts.create("other", None)
        clock = Clock()
        return store, Attribution(store, clock, max_list_members=5), clock, shop.id, other.id

    async def test_transactional_defaults_created_once(self) -> None:
        """Without headers or a matching subject: "Transactional Campaign" and its recipients list, made once."""
        store, attribution, _, shop, _ = await self.setup()
        first = await attribution.attribute(shop, "Order 1")
        second = await attribution.attribute(shop, "Order 2")
        self.assertEqual(first, second)  # type: ignore[attr-defined]
        campaigns = await store.campaigns.list(shop)
        self.assertEqual([(c.id, c.name) for c in campaigns], [(first.campaign_id, TRANSACTIONAL_CAMPAIGN)])  # type: ignore[attr-defined]
        lists = await store.lists.list(shop)
        self.assertEqual([(x.id, x.name) for x in lists], [(first.list_id, TRANSACTIONAL_LIST)])  # type: ignore[attr-defined]

    async def test_header_campaign_then_subject(self) -> None:
        """campaign_guid wins over the subject; the subject wins over the default; the campaign's list is used."""
        store, attribution, _, shop, _ = await self.setup()
        linked = await store.lists.create(shop, "Buyers")
        named = await store.campaigns.create(shop, "Spring", guid="c-spring")
        by_subject = await store.campaigns.create(shop, "Receipts", subject="Your receipt", list_id=linked.id)
        got = await attribution.attribute(shop, "Your receipt", campaign=("c-spring", "campaign_guid"))
        self.assertEqual(got.campaign_id, named.id)  # type: ignore[attr-defined]
        got = await attribution.attribute(shop, "Your receipt")
        self.assertEqual((got.campaign_id, got.list_id, got.list_guid), (by_subject.id, linked.id, linked.guid))  # type: ignore[attr-defined]
        got = await attribution.attribute(shop, "Something else")
        self.assertNotIn(got.campaign_id, (named.id, by_subject.id))  # type: ignore[attr-defined]

    async def test_campaign_created_after_caching_is_found(self) -> None:
        """A campaign created after the account's index was cached is still found (re-read once, not refused)."""
        store, attribution, _, shop, _ = await self.setup()
        await attribution.attribute(shop, "x")  # caches the index
        fresh = await store.campaigns.create(shop, "New", guid="c-new")
        got = await attribution.attribute(shop, "x", campaign=("c-new", "X-Mailrelay-Campaign"))
        self.assertEqual(got.campaign_id, fresh.id)  # type: ignore[attr-defined]

    async def test_unknown_or_foreign_campaign_refused(self) -> None:
        """Another account's campaign is as unknown as a made-up id; the reply names the header."""
        store, attribution, _, shop, other = await self.setup()
        await store.campaigns.create(other, "Theirs", guid="c-theirs")
        for ref in ("c-theirs", "nope"):
            try:
                await attribution.attribute(shop, "s", campaign=(ref, "campaign_guid"))
            except UnknownCampaign as e:
                self.assertEqual(str(e.reply), f"550 5.6.0 Unknown campaign {ref} in campaign_guid header")  # type: ignore[attr-defined]
            else:
                self.fail(f"{ref} accepted")  # type: ignore[attr-defined]

    async def test_list_header_must_be_own_list(self) -> None:
        """mailing_list_id picks the account's list; another account's list is refused naming the header."""
        store, attribution, _, shop, other = await self.setup()
        mine = await store.lists.create(shop, "Mine", guid="l-mine")
        await store.lists.create(other, "Theirs", guid="l-theirs")
        got = await attribution.attribute(shop, "s", mailing_list=("l-mine", "mailing_list_id"))
        self.assertEqual((got.list_id, got.list_guid), (mine.id, "l-mine"))  # type: ignore[attr-defined]
        try:
            await attribution.attribute(shop, "s", mailing_list=("l-theirs", "mailing_list_id"))
        except UnknownList as e:
            self.assertEqual(str(e.reply), "550 5.6.0 Unknown list l-theirs in mailing_list_id header")  # type: ignore[attr-defined]
        else:
            self.fail("another account's list accepted")  # type: ignore[attr-defined]
        self.assertIsNone(await attribution.list_address(shop, "l-theirs"))  # type: ignore[attr-defined]
        self.assertEqual((await attribution.list_address(shop, "L-MINE")).id, mine.id)  # type: ignore[attr-defined, union-attr]

    async def test_expand_leaves_out_suppressed(self) -> None:
        """Expansion gives the members minus account-scope and this list's suppressions, not other lists'."""
        store, attribution, _, shop, _ = await self.setup()
        members = await store.lists.create(shop, "Members", guid="l-m")
        await store.lists.add_members(members.id, ["a@x.example", "b@x.example", "c@x.example", "d@x.example"])
        await store.suppressions.add(shop, "b@x.example", "hard_bounce")
        await store.suppressions.add(shop, "c@x.example", "unsubscribe", scope="list:l-m")
        await store.suppressions.add(shop, "d@x.example", "unsubscribe", scope="list:other")
        got = await attribution.expand(shop, members)
        self.assertEqual(sorted(got), ["a@x.example", "d@x.example"])  # type: ignore[attr-defined]

    async def test_expand_cap(self) -> None:
        """A list beyond the expansion cap is refused with 550 5.5.3 naming the list and the limit."""
        store, attribution, _, shop, _ = await self.setup()
        big = await store.lists.create(shop, "Big", guid="l-big")
        await store.lists.add_members(big.id, [f"m{i}@x.example" for i in range(6)])
        try:
            await attribution.expand(shop, big)
        except Exception as e:
            self.assertEqual(str(e.reply), "550 5.5.3 Too many recipients: list l-big has more than 5 members")  # type: ignore[attr-defined]
        else:
            self.fail("a list over the cap expanded")  # type: ignore[attr-defined]
        await store.lists.remove_members(big.id, ["m0@x.example"])
        self.assertEqual(len(await attribution.expand(shop, big)), 5)  # type: ignore[attr-defined]

    async def test_membership_batched(self) -> None:
        """remember() writes nothing at once; one flush interval later the recipients are members; stop() flushes."""
        store, attribution, clock, shop, _ = await self.setup()
        target = await store.lists.create(shop, "T")
        attribution.remember(target.id, ["A@x.example", "b@x.example"])
        attribution.remember(target.id, ["a@x.example"])
        self.assertEqual(await store.lists.members(target.id), [])  # type: ignore[attr-defined]
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # type: ignore[attr-defined]
        clock.advance(1.0)
        await attribution.stop()
        self.assertEqual([m.address for m in await store.lists.members(target.id)], ["a@x.example", "b@x.example"])  # type: ignore[attr-defined]
        attribution.remember(target.id, ["c@x.example"])
        await attribution.stop()  # shutdown: written without waiting for the timer
        self.assertEqual(len(await store.lists.members(target.id)), 3)  # type: ignore[attr-defined]
        self.assertEqual(clock.getDelayedCalls(), [])  # type: ignore[attr-defined]


class SQLiteAttributionTests(AttributionTestsMixin, TestCase):
    engine = "sqlite"


class PostgresAttributionTests(AttributionTestsMixin, TestCase):
    engine = "postgresql"
