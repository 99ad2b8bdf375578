"""BatchWriter: rows reach the database in multi-row batches, off the caller's path."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.events.writer import BatchWriter
from tests.support.db import fresh_store


class BatchWriterTestsMixin:
    engine: str

    async def test_batches_and_flush(self) -> None:
        """Rows added are written in batches; flush writes what waits; counts are kept."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        writer = BatchWriter(store.pool, reactor, "daily_counts", ("account_id", "day", "dimension", "metric", "value"),
                             interval=0.05, max_rows=10)
        for i in range(25):
            writer.add((1, "2026-11-22", f"d{i}", "m", i))
        await writer.flush()
        rows = await store.pool.execute("t", "SELECT COUNT(*), SUM(value) FROM daily_counts")
        self.assertEqual((int(rows[0][0]), int(rows[0][1])), (25, sum(range(25))))  # type: ignore[attr-defined]
        self.assertEqual(writer.written, 25)  # type: ignore[attr-defined]
        writer.add((1, "2026-11-22", "late", "m", 1))
        await deferLater(reactor, 0.2, lambda: None)  # the timer writes it without a flush
        rows = await store.pool.execute("t", "SELECT COUNT(*) FROM daily_counts")
        self.assertEqual(int(rows[0][0]), 26)  # type: ignore[attr-defined]
        await writer.stop()

    async def test_busy_writer_leaves_a_partial_batch_for_the_interval(self) -> None:
        """Full batches go one after another; the part of a batch left after them waits for the interval."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        clock = Clock()
        writer = BatchWriter(store.pool, clock, "daily_counts", ("account_id", "day", "dimension", "metric", "value"),
                             interval=5.0, max_rows=10)
        for i in range(22):  # the first ten start a write at once; the rest arrive while it runs
            writer.add((1, "2026-11-22", f"d{i}", "m", i))
        await writer._running
        self.assertEqual(writer.written, 20)  # type: ignore[attr-defined]
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [5.0])  # type: ignore[attr-defined]
        clock.advance(5)
        await writer._running
        self.assertEqual(writer.written, 22)  # type: ignore[attr-defined]
        await writer.stop()

    async def test_failed_batch_kept(self) -> None:
        """A batch the database refuses is kept and written once the cause is gone."""
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        await store.pool.execute("t", "CREATE TABLE later (n INTEGER)")
        await store.pool.execute("t", "DROP TABLE later")
        writer = BatchWriter(store.pool, reactor, "later", ("n",), interval=0.05)
        writer.add((1,))
        await writer.flush()
        self.flushLoggedErrors()  # type: ignore[attr-defined]
        self.assertEqual(writer.written, 0)  # type: ignore[attr-defined]
        await store.pool.execute("t", "CREATE TABLE later (n INTEGER)")
        await writer.flush()
        rows = await store.pool.execute("t", "SELECT n FROM later")
        self.assertEqual(rows, [(1,)])  # type: ignore[attr-defined]
        await writer.stop()

    def test_wrong_width(self) -> None:
        """A row of the wrong width is refused at once."""
        writer = BatchWriter(None, reactor, "t", ("a", "b"))  # type: ignore[arg-type]
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            writer.add((1,))


class SQLiteBatchWriterTests(BatchWriterTestsMixin, TestCase):
    engine = "sqlite"


class PostgresBatchWriterTests(BatchWriterTestsMixin, TestCase):
    engine = "postgresql"


class _InstantPool:
    """A pool whose transactions complete at once (as an idle SQLite thread nearly does)."""

    def interaction(self, desc: str, fn: object) -> object:
        from twisted.internet.defer import succeed

        return succeed(None)


class BatchWriterUnitTests(SynchronousTestCase):
    def test_synchronous_flush_finishes(self) -> None:
        """Regression: a flush that completes at once leaves nothing running, and stop() returns (it spun)."""
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.task import Clock

        clock = Clock()
        writer = BatchWriter(_InstantPool(), clock, "t", ("a",), max_rows=1)  # type: ignore[arg-type]
        writer.add((1,))
        writer.add((2,))
        self.successResultOf(ensureDeferred(writer.stop()))
        self.assertEqual(writer.written, 2)
        self.assertEqual(clock.getDelayedCalls(), [])
