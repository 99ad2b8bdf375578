"""
The event sink: batched writes with roll-ups, the outage buffer and replay,
on SQLite and PostgreSQL; the roll-up rules and the buffer file alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailrelay.events.buffer import FILE, REJECTED, EventBufferError, OutageBuffer
from mailrelay.events.model import Event, EventType
from mailrelay.events.sink import EventSink
from mailrelay.events.stats import Stats, dimensions_of, increments, metrics_of
from mailrelay.interfaces import IEventSink
from mailrelay.storage.database import DatabasePool, Transaction
from mailrelay.storage.store import Store, open_store
from tests.support.db import fresh_database_url, fresh_store

reactor: Any = global_reactor

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

T = TypeVar("T")

MIDNIGHT = 1699920000.0  # 2023-11-14 00:00:00 UTC
T0 = MIDNIGHT + 3600
DAY = "2023-11-14"


def ev(kind: EventType, account_id: int, n: int = 0, **kw: Any) -> Event:
    return Event(type=kind, ts=T0 + n, account_id=account_id, **kw)


def later(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


def later_close(store: Store) -> Deferred[None]:
    return later(store.close())


class FlakyPool(DatabasePool):
    """A real pool that fails every transaction while ``down``, or loses the answer of a commit."""

    def __init__(self, real: DatabasePool) -> None:
        self.real = real
        self.engine = real.engine
        self.url = real.url
        self.down = False
        self.lose_answers = 0
        self.attempts = 0

    def start(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> Deferred[T]:
        self.attempts += 1
        if self.down:
            return fail(ConnectionRefusedError("database down"))
        d = self.real.interaction(desc, fn)
        if self.lose_answers:
            self.lose_answers -= 1

            def lost(_: object) -> T:
                raise ConnectionLost("the answer to COMMIT was lost")

            d.addCallback(lost)
        return d


class HeldPool(FlakyPool):
    """A real pool whose event batches, their rows inserted, stay uncommitted until ``gate`` fires (a slow node)."""

    def __init__(self, real: DatabasePool, gate: Deferred[None]) -> None:
        super().__init__(real)
        self.gate = gate
        self.worked: Deferred[None] = Deferred()

    def interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> Deferred[T]:
        if desc != "events_store":
            return self.real.interaction(desc, fn)

        async def held(txn: Transaction) -> T:
            result = await fn(txn)
            if not self.worked.called:
                self.worked.callback(None)
            await self.gate
            return result

        return self.real.interaction(desc, held)


async def count(store: Store, sql: str, args: tuple[Any, ...] = ()) -> int:
    rows = await store.pool.execute("t", sql, args)
    return int(rows[0][0])


class RollupTests(SynchronousTestCase):
    def test_metrics(self) -> None:
        """Bounces count by class, opens and clicks count unique only when detail["first"] is true."""
        self.assertEqual(metrics_of(ev(EventType.QUEUED, 1)), ["sent"])
        self.assertEqual(metrics_of(ev(EventType.BOUNCED, 1, detail={"class": "block"})), ["bounced", "block_bounced"])
        self.assertEqual(metrics_of(ev(EventType.BOUNCED, 1, detail={"class": "odd"})), ["bounced"])
        self.assertEqual(metrics_of(ev(EventType.OPENED, 1, detail={"first": True})), ["opens", "unique_opens"])
        self.assertEqual(metrics_of(ev(EventType.OPENED, 1, detail={"first": False})), ["opens"])
        self.assertEqual(metrics_of(ev(EventType.CLICKED, 1, detail={"first": 1})), ["clicks", "unique_clicks"])
        self.assertEqual(metrics_of(ev(EventType.COMPLAINED, 1)), ["complaints"])

    def test_dimensions(self) -> None:
        """A sub-account's event counts for itself (total, campaign, tags once) and its parent ('' and sub:<id>)."""
        event = ev(EventType.QUEUED, 7, campaign_id=3, tags=("a", "b", "a"))
        self.assertEqual(dimensions_of(event, None), [(7, ""), (7, "campaign:3"), (7, "tag:a"), (7, "tag:b")])
        self.assertEqual(dimensions_of(event, 2)[-2:], [(2, ""), (2, "sub:7")])

    def test_increments_merge_by_day(self) -> None:
        """Increments of one batch are merged per key and split by UTC day."""
        events = [ev(EventType.QUEUED, 1), ev(EventType.QUEUED, 1, 60), ev(EventType.QUEUED, 1, 86400)]
        merged = increments(events, {})
        self.assertEqual(merged, {(1, DAY, "", "sent"): 2, (1, "2023-11-15", "", "sent"): 1})


class OutageBufferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()

    def test_append_read_advance(self) -> None:
        """Lines come back in order; once all are replayed the file is emptied."""
        buf = OutageBuffer(self.dir)
        buf.open()
        self.addCleanup(buf.close)
        buf.append(b'{"a":1}\n')
        buf.append(b'{"b":2}\n')
        line, end = buf.read_next() or (b"", 0)
        self.assertEqual(line, b'{"a":1}\n')
        buf.advance(end)
        self.assertTrue(buf.pending)
        line, end = buf.read_next() or (b"", 0)
        self.assertEqual(line, b'{"b":2}\n')
        buf.advance(end)
        self.assertFalse(buf.pending)
        self.assertEqual(os.path.getsize(os.path.join(self.dir, FILE)), 0)

    def test_reopen_resumes_and_drops_torn_line(self) -> None:
        """A reopened buffer resumes after the replayed lines and drops a torn last line."""
        buf = OutageBuffer(self.dir)
        buf.open()
        buf.append(b"one\n")
        buf.append(b"two\n")
        buf.advance((buf.read_next() or (b"", 0))[1])
        buf.close()
        with open(os.path.join(self.dir, FILE), "ab") as f:
            f.write(b'{"torn')
        again = OutageBuffer(self.dir)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.truncated, 6)
        self.assertEqual(again.read_next(), (b"two\n", 8))

    def test_one_process_per_directory(self) -> None:
        """A second buffer on a locked directory is refused with a sentence."""
        buf = OutageBuffer(self.dir)
        buf.open()
        self.addCleanup(buf.close)
        with self.assertRaises(EventBufferError) as ctx:
            OutageBuffer(self.dir).open()
        self.assertIn("in use by another process", str(ctx.exception))


class EventSinkTestsMixin(_Base):
    engine: str

    async def setup_store(self) -> Store:
        self.store = await fresh_store(self, self.engine)
        self.parent = await self.store.accounts.create("shop", None)
        self.child = await self.store.accounts.create("billing", None, parent="shop")
        self.clock = Clock()
        self.received: list[Event] = []
        return self.store

    async def make_sink(self, pool: DatabasePool | None = None, directory: str | None = None, **kw: Any) -> EventSink:
        self.buffer_dir = directory or getattr(self, "buffer_dir", None) or os.path.abspath(self.mktemp())
        sink = EventSink(pool or self.store.pool, self.clock, reactor, self.buffer_dir, **kw)
        sink.subscribe(self.received.append)
        await sink.start()
        self.addCleanup(lambda: later(sink.stop()))
        return sink

    async def stored(self) -> list[tuple[Any, ...]]:
        rows = await self.store.pool.execute("t", "SELECT type, recipient, account_id FROM events ORDER BY id")
        return [tuple(r) for r in rows]

    async def test_batched_write(self) -> None:
        """Events wait for the interval, then go in one transaction, in order; subscribers follow."""
        await self.setup_store()
        pool = FlakyPool(self.store.pool)
        sink = await self.make_sink(pool, max_rows=3)
        verifyObject(IEventSink, sink)
        sink.emit(ev(EventType.QUEUED, self.parent.id, recipient="a@x.test"))
        sink.emit(ev(EventType.DELIVERED, self.parent.id, 1, recipient="a@x.test"))
        self.assertEqual(pool.attempts, 0)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [0.5])
        sink.emit(ev(EventType.QUEUED, self.parent.id, 2, recipient="b@x.test"))
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [0.0])  # a full batch goes now
        self.clock.advance(0)
        await sink.flush()
        self.assertEqual(pool.attempts, 1)
        self.assertEqual(
            await self.stored(),
            [
                ("queued", "a@x.test", self.parent.id),
                ("delivered", "a@x.test", self.parent.id),
                ("queued", "b@x.test", self.parent.id),
            ],
        )
        self.assertEqual([e.recipient for e in self.received], ["a@x.test", "a@x.test", "b@x.test"])
        self.assertEqual(sink.written, 3)

    async def test_busy_sink_leaves_a_partial_batch_for_the_interval(self) -> None:
        """
        Full batches go one after another; less than a full batch left after
        them waits for the interval, not for the last write to finish (a few
        large transactions a second, not one per write).
        """
        await self.setup_store()
        sink = await self.make_sink(max_rows=10, interval=5.0)
        for n in range(10):
            sink.emit(ev(EventType.QUEUED, self.parent.id, n))
        self.clock.advance(0)  # the full batch starts at once
        for n in range(12):  # arrive while it is written
            sink.emit(ev(EventType.DELIVERED, self.parent.id, n))
        await sink._wait_idle()
        self.assertEqual((sink.written, sink.queued), (20, 2))
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [5.0])
        self.clock.advance(5)
        await sink._wait_idle()
        self.assertEqual((sink.written, sink.queued), (22, 0))
        self.assertEqual(await count(self.store, "SELECT COUNT(*) FROM events"), 22)

    async def test_rollups(self) -> None:
        """Counts land per account, sub-account (also under the parent), campaign, tag and day."""
        await self.setup_store()
        sink = await self.make_sink()
        p, c = self.parent.id, self.child.id
        for event in [
            ev(EventType.QUEUED, p, campaign_id=5, tags=("promo",)),
            ev(EventType.QUEUED, p, 1, tags=("promo", "nov")),
            ev(EventType.DELIVERED, p, 2, campaign_id=5),
            ev(EventType.BOUNCED, p, 3, detail={"class": "hard"}, tags=("nov",)),
            ev(EventType.OPENED, p, 4, campaign_id=5, detail={"first": True}),
            ev(EventType.OPENED, p, 5, campaign_id=5, detail={"first": False}),
            ev(EventType.CLICKED, p, 6, detail={"first": True, "url": "https://x.test/"}),
            ev(EventType.QUEUED, c, 7),
            ev(EventType.BOUNCED, c, 8, detail={"class": "block"}),
            ev(EventType.QUEUED, p, 86400),
        ]:
            sink.emit(event)
        await sink.flush()
        stats = Stats(self.store.pool)
        whole = await stats.stats(p, DAY, "2023-11-15", by_day=True)
        totals = whole.totals
        self.assertEqual(
            (totals.sent, totals.delivered, totals.bounced, totals.hard_bounced, totals.block_bounced),
            (4, 1, 2, 1, 1),
        )
        self.assertEqual((totals.opens, totals.unique_opens, totals.clicks, totals.unique_clicks), (2, 1, 1, 1))
        self.assertEqual([(d.day, d.sent) for d in whole.days], [(DAY, 3), ("2023-11-15", 1)])
        child = (await stats.stats(c, DAY, DAY)).totals
        via_parent = (await stats.stats(p, DAY, DAY, subaccount_id=c)).totals
        self.assertEqual((child.sent, child.bounced, child.block_bounced), (1, 1, 1))
        self.assertEqual(child, via_parent)
        campaign = (await stats.stats(p, DAY, DAY, campaign_id=5)).totals
        self.assertEqual((campaign.sent, campaign.delivered, campaign.opens, campaign.unique_opens), (1, 1, 2, 1))
        tag = (await stats.stats(p, DAY, DAY, tag="nov")).totals
        self.assertEqual((tag.sent, tag.bounced), (1, 1))
        tags = await stats.breakdown(p, DAY, DAY, "tag")
        self.assertEqual([(b.key, b.counts.sent) for b in tags], [("promo", 2), ("nov", 1)])
        subs = await stats.breakdown(p, DAY, DAY, "subaccount")
        self.assertEqual([(b.key, b.counts.sent) for b in subs], [(str(c), 1)])

    async def test_outage_buffers_and_replays_in_order(self) -> None:
        """While the database is down batches go to disk (without new attempts); they replay in order after."""
        await self.setup_store()
        pool = FlakyPool(self.store.pool)
        sink = await self.make_sink(pool, retry_interval=5.0)
        pool.down = True
        for i in range(3):
            sink.emit(ev(EventType.QUEUED, self.parent.id, i, recipient=f"r{i}@x.test"))
        self.clock.advance(0.5)
        await sink.flush()
        self.assertEqual((pool.attempts, sink.spilled), (1, 3))
        for i in range(3, 5):
            sink.emit(ev(EventType.QUEUED, self.parent.id, i, recipient=f"r{i}@x.test"))
        self.clock.advance(0.5)
        await sink.flush()
        self.assertEqual((pool.attempts, sink.spilled), (1, 5))
        with open(os.path.join(self.buffer_dir, FILE), "rb") as f:
            self.assertEqual(len(f.read().splitlines()), 2)
        self.assertEqual((await self.stored(), self.received), ([], []))

        pool.down = False
        sink.emit(ev(EventType.QUEUED, self.parent.id, 5, recipient="r5@x.test"))
        self.clock.advance(4.0)  # the retry is due at 5.5; the new event must wait behind the buffer
        await sink.flush()
        self.assertEqual(await self.stored(), [])
        self.clock.advance(1.0)
        await sink.flush()
        expected = [f"r{i}@x.test" for i in range(6)]
        self.assertEqual([r[1] for r in await self.stored()], expected)
        self.assertEqual([e.recipient for e in self.received], expected)
        self.assertEqual((sink.replayed, sink.buffered_bytes), (6, 0))  # r5 joined the buffer too
        self.assertEqual(os.path.getsize(os.path.join(self.buffer_dir, FILE)), 0)
        report = await Stats(self.store.pool).stats(self.parent.id, DAY, DAY)
        self.assertEqual(report.totals.sent, 6)

    async def test_restart_replays_buffer(self) -> None:
        """Events buffered by a process that stopped during an outage are stored by the next one."""
        await self.setup_store()
        down = FlakyPool(self.store.pool)
        down.down = True
        directory = os.path.abspath(self.mktemp())
        first = EventSink(down, self.clock, reactor, directory)
        await first.start()
        for i in range(4):
            first.emit(ev(EventType.DELIVERED, self.child.id, i, recipient=f"r{i}@x.test"))
        await first.stop()
        self.assertGreater(os.path.getsize(os.path.join(directory, FILE)), 0)

        second = await self.make_sink(directory=directory)
        self.clock.advance(0)
        await second.flush()
        self.assertEqual([r[1] for r in await self.stored()], [f"r{i}@x.test" for i in range(4)])
        self.assertEqual(second.replayed, 4)
        parent = await Stats(self.store.pool).stats(self.parent.id, DAY, DAY)
        self.assertEqual(parent.totals.delivered, 4)

    async def test_lost_commit_answer_stored_once(self) -> None:
        """A batch that committed although the answer was lost is buffered, then recognised: stored once."""
        await self.setup_store()
        pool = FlakyPool(self.store.pool)
        sink = await self.make_sink(pool)
        pool.lose_answers = 1
        sink.emit(ev(EventType.QUEUED, self.parent.id, recipient="a@x.test"))
        sink.emit(ev(EventType.QUEUED, self.parent.id, 1, recipient="b@x.test"))
        await sink.flush()
        self.assertEqual(sink.spilled, 2)
        self.clock.advance(5.0)
        await sink.flush()
        self.assertEqual(len(await self.stored()), 2)
        self.assertEqual((sink.duplicates, sink.replayed), (2, 0))
        self.assertEqual((await Stats(self.store.pool).stats(self.parent.id, DAY, DAY)).totals.sent, 2)
        self.assertEqual([e.recipient for e in self.received], ["a@x.test", "b@x.test"])

    async def test_refused_event_set_aside(self) -> None:
        """An event the database refuses goes to rejected.jsonl; the rest of its batch and later ones are stored."""
        await self.setup_store()
        sink = await self.make_sink()
        sink.emit(ev(EventType.QUEUED, self.parent.id, recipient="good1@x.test"))
        sink.emit(ev(EventType.QUEUED, self.parent.id, 1, recipient="bad@x.test", campaign_id=2**70))
        sink.emit(ev(EventType.QUEUED, self.parent.id, 2, recipient="good2@x.test"))
        await sink.flush()
        sink.emit(ev(EventType.QUEUED, self.parent.id, 3, recipient="good3@x.test"))
        self.clock.advance(5.0)
        await sink.flush()
        await sink.flush()
        self.flushLoggedErrors()
        self.assertEqual([r[1] for r in await self.stored()], ["good1@x.test", "good2@x.test", "good3@x.test"])
        self.assertEqual(sink.rejected, 1)
        with open(os.path.join(self.buffer_dir, REJECTED)) as f:
            kept = [json.loads(line) for line in f]
        self.assertEqual([e["recipient"] for line in kept for e in line["events"]], ["bad@x.test"])

    async def test_nodes_add_up(self) -> None:
        """Two processes on one database writing the same counters at once lose no increment."""
        url = fresh_database_url(self, self.engine)
        stores = [await open_store(url, reactor, pool_size=2) for _ in range(2)]
        for store in stores:
            self.addCleanup(later_close, store)
        account = await stores[0].accounts.create("shop", None)
        self.clock = Clock()
        self.received = []
        sinks = [await self.make_sink(store.pool, os.path.abspath(self.mktemp()), max_rows=7) for store in stores]
        for i in range(60):
            for sink in sinks:
                sink.emit(ev(EventType.QUEUED, account.id, i, tags=("t",)))
        await gatherResults([later(sink.flush()) for sink in sinks])
        report = await Stats(stores[0].pool).stats(account.id, DAY, DAY, tag="t")
        self.assertEqual(report.totals.sent, 120)

    async def test_subscriber_failures_are_contained(self) -> None:
        """A raising or failing subscriber neither stops storage nor the other subscribers."""
        await self.setup_store()
        sink = await self.make_sink()

        def broken(event: Event) -> None:
            raise ZeroDivisionError("broken webhook")

        async def failing(event: Event) -> None:
            raise KeyError("failing webhook")

        sink.subscribe(broken)
        sink.subscribe(failing)
        later_ones: list[Event] = []
        sink.subscribe(later_ones.append)
        sink.emit(ev(EventType.QUEUED, self.parent.id))
        sink.emit("not an event")  # type: ignore[arg-type]
        await sink.flush()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, KeyError)), 2)
        self.assertEqual((len(later_ones), len(await self.stored())), (1, 1))

    async def test_emitted_before_start(self) -> None:
        """Events emitted before start are kept and written once the sink starts."""
        await self.setup_store()
        sink = EventSink(self.store.pool, self.clock, reactor, os.path.abspath(self.mktemp()))
        sink.emit(ev(EventType.QUEUED, self.parent.id))
        await sink.start()
        self.addCleanup(lambda: later(sink.stop()))
        self.clock.advance(0.5)
        await sink.flush()
        self.assertEqual(len(await self.stored()), 1)

    async def test_batch_ids_pruned(self) -> None:
        """Batch ids older than the retention are deleted, at most once an hour."""
        await self.setup_store()
        sink = await self.make_sink(batch_retention=10.0)
        sink.emit(ev(EventType.QUEUED, self.parent.id))
        await sink.flush()
        self.clock.advance(3601)
        sink.emit(ev(EventType.QUEUED, self.parent.id, 1))
        await sink.flush()
        self.assertEqual(await count(self.store, "SELECT COUNT(*) FROM event_batches"), 1)
        self.assertEqual(len(await self.stored()), 2)


class SQLiteEventSinkTests(EventSinkTestsMixin, TestCase):
    engine = "sqlite"


class PostgresEventSinkTests(EventSinkTestsMixin, TestCase):
    engine = "postgresql"

    async def test_batches_commit_in_id_order(self) -> None:
        """
        A batch waits while another process's batch is still being written,
        so event ids become visible in order: a webhook cursor ("the events
        after id N") cannot move past an id that commits later.
        """
        await self.setup_store()  # its pool has two connections: two writers at once
        gate: Deferred[None] = Deferred()
        slow = HeldPool(self.store.pool, gate)
        first = await self.make_sink(slow, directory=os.path.abspath(self.mktemp()))
        second = await self.make_sink(directory=os.path.abspath(self.mktemp()))
        self.addCleanup(lambda: None if gate.called else gate.callback(None))  # a failure must not hang the sinks
        first.emit(ev(EventType.QUEUED, self.parent.id, recipient="first@x.test"))
        first_done = later(first.flush())
        await slow.worked  # its rows are inserted, its id taken; not committed
        # Another type: the two batches share no statistics row that would make one wait for the other.
        second.emit(ev(EventType.DELIVERED, self.parent.id, recipient="second@x.test"))
        second_done = later(second.flush())
        await deferLater(reactor, 0.3)
        self.assertFalse(second_done.called)  # (both of the pool's connections are busy: nothing else to ask)
        gate.callback(None)
        await gatherResults([first_done, second_done])
        self.assertEqual([r[1] for r in await self.stored()], ["first@x.test", "second@x.test"])
