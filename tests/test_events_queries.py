"""Event queries (filters, cursor pages, message history) and the Stats API, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.events.model import EventType
from mailrelay.events.queries import EventFilter, EventQueries, StoredEvent, parse_types
from mailrelay.events.sink import EventSink
from mailrelay.events.stats import Stats
from tests.support.db import fresh_store
from tests.test_events_sink import DAY, T0, ev, later

reactor: Any = global_reactor

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


class ParseTypesTests(SynchronousTestCase):
    def test_types(self) -> None:
        """Types may repeat or be comma-separated; an unknown one names the valid ones."""
        self.assertEqual(parse_types(["bounced,Opened", "bounced"]), {EventType.BOUNCED, EventType.OPENED})
        with self.assertRaises(ValueError) as ctx:
            parse_types(["bounce"])
        self.assertIn("unknown event type 'bounce'", str(ctx.exception))
        self.assertIn("complained", str(ctx.exception))


class EventQueriesTestsMixin(_Base):
    engine: str

    async def setup_events(self) -> EventQueries:
        self.store = await fresh_store(self, self.engine)
        self.shop = await self.store.accounts.create("shop", None)
        self.other = await self.store.accounts.create("other", None)
        sink = EventSink(self.store.pool, Clock(), reactor, os.path.abspath(self.mktemp()))
        await sink.start()
        s = self.shop.id
        for event in [
            ev(
                EventType.QUEUED,
                s,
                0,
                queue_id="Q1",
                message_id="<m1@x>",
                transmission_id="T1",
                recipient="a@x.test",
                campaign_id=9,
                tags=("Promo", "a,b"),
            ),
            ev(
                EventType.QUEUED,
                s,
                1,
                queue_id="Q2",
                message_id="<m2@x>",
                transmission_id="T1",
                recipient="b@x.test",
                tags=("promo",),
            ),
            ev(
                EventType.DELIVERED,
                s,
                10,
                queue_id="Q1",
                message_id="<m1@x>",
                transmission_id="T1",
                recipient="a@x.test",
                campaign_id=9,
                detail={"mx": "mx.x.test"},
            ),
            ev(
                EventType.BOUNCED,
                s,
                20,
                queue_id="Q2",
                message_id="<m2@x>",
                transmission_id="T1",
                recipient="b@x.test",
                detail={"class": "hard", "reply": "550 5.1.1 no"},
            ),
            ev(EventType.OPENED, s, 30, queue_id="Q1", recipient="a@x.test", campaign_id=9, detail={"first": True}),
            ev(EventType.QUEUED, self.other.id, 40, queue_id="Q9", message_id="<m1@x>", recipient="a@x.test"),
        ]:
            sink.emit(event)
        await sink.stop()
        return EventQueries(self.store.pool)

    def queues(self, found: list[StoredEvent] | tuple[StoredEvent, ...]) -> list[tuple[str, str | None]]:
        return [(s.event.type.value, s.event.queue_id) for s in found]

    async def test_filters(self) -> None:
        """Account, type, recipient, campaign, tag (exact, commas allowed) and time filters combine."""
        q = await self.setup_events()
        s = self.shop.id
        everything = await q.find(EventFilter(account_id=s))
        self.assertEqual(len(everything.events), 5)
        self.assertIsNone(everything.cursor)
        stored = everything.events[3].event
        self.assertEqual(
            (stored.detail, stored.tags, stored.campaign_id), ({"class": "hard", "reply": "550 5.1.1 no"}, (), None)
        )
        bounced = await q.find(EventFilter(account_id=s, types=frozenset({EventType.BOUNCED, EventType.OPENED})))
        self.assertEqual(self.queues(bounced.events), [("bounced", "Q2"), ("opened", "Q1")])
        by_rcpt = await q.find(EventFilter(account_id=s, recipient="a@x.test"))
        self.assertEqual(self.queues(by_rcpt.events), [("queued", "Q1"), ("delivered", "Q1"), ("opened", "Q1")])
        campaign = await q.find(EventFilter(account_id=s, campaign_id=9, types=frozenset({EventType.DELIVERED})))
        self.assertEqual(self.queues(campaign.events), [("delivered", "Q1")])
        promo = await q.find(EventFilter(account_id=s, tag="promo"))
        self.assertEqual(self.queues(promo.events), [("queued", "Q2")])
        comma = await q.find(EventFilter(account_id=s, tag="a,b"))
        self.assertEqual(self.queues(comma.events), [("queued", "Q1")])
        window = await q.find(EventFilter(account_id=s, since=T0 + 10, until=T0 + 30))
        self.assertEqual(self.queues(window.events), [("delivered", "Q1"), ("bounced", "Q2")])

    async def test_cursor_pages(self) -> None:
        """Pages joined in either direction give every event once; a short filtered page still continues."""
        q = await self.setup_events()
        where = EventFilter(account_id=self.shop.id)
        for newest_first in (False, True):
            ids: list[int] = []
            cursor = None
            while True:
                page = await q.find(where, cursor=cursor, limit=2, newest_first=newest_first)
                ids.extend(s.id for s in page.events)
                if page.cursor is None:
                    break
                cursor = page.cursor
            self.assertEqual(len(ids), 5)
            self.assertEqual(ids, sorted(ids, reverse=newest_first))
        # SQLite's LIKE ignores case, so its first page of one scans "Promo", drops it and goes on.
        promo: list[StoredEvent] = []
        cursor = None
        while True:
            page = await q.find(EventFilter(account_id=self.shop.id, tag="promo"), cursor=cursor, limit=1)
            promo.extend(page.events)
            if page.cursor is None:
                break
            cursor = page.cursor
        self.assertEqual(self.queues(promo), [("queued", "Q2")])
        with self.assertRaises(ValueError):
            await q.find(where, limit=0)

    async def test_history(self) -> None:
        """One message's history by queue id, transmission id or Message-ID, confined to an account."""
        q = await self.setup_events()
        by_queue = await q.history(queue_id="Q1")
        self.assertEqual([s.event.type.value for s in by_queue], ["queued", "delivered", "opened"])
        by_transmission = await q.history(transmission_id="T1")
        self.assertEqual(len(by_transmission), 4)
        everywhere = await q.history(message_id="<m1@x>")
        self.assertEqual([s.event.queue_id for s in everywhere], ["Q1", "Q1", "Q9"])
        mine = await q.history(message_id="<m1@x>", account_id=self.other.id)
        self.assertEqual([s.event.queue_id for s in mine], ["Q9"])
        self.assertGreater(await q.newest_id(), 0)
        with self.assertRaises(ValueError):
            await q.history()

    async def test_stats_arguments(self) -> None:
        """Days are validated, one filter at a time, and by_day lists every day of the range, zeros too."""
        await self.setup_events()
        stats = Stats(self.store.pool)
        report = await stats.stats(self.shop.id, "2023-11-13", "2023-11-15", by_day=True)
        self.assertEqual(
            [(d.day, d.sent) for d in report.days],
            [("2023-11-13", 0), (DAY, 2), ("2023-11-15", 0)],
        )
        self.assertEqual(report.totals.day, None)
        for bad in (("2023-11-15", "2023-11-14"), ("yesterday", DAY)):
            with self.assertRaises(ValueError):
                await stats.stats(self.shop.id, *bad)
        with self.assertRaises(ValueError):
            await stats.stats(self.shop.id, DAY, DAY, campaign_id=9, tag="promo")
        with self.assertRaises(ValueError):
            await stats.breakdown(self.shop.id, DAY, DAY, "country")
        campaigns = await stats.breakdown(self.shop.id, DAY, DAY, "campaign")
        self.assertEqual([(b.key, b.counts.sent, b.counts.unique_opens) for b in campaigns], [("9", 1, 1)])


class SQLiteEventQueriesTests(EventQueriesTestsMixin, TestCase):
    engine = "sqlite"


class PostgresEventQueriesTests(EventQueriesTestsMixin, TestCase):
    engine = "postgresql"


del later
