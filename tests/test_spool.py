"""
Tests for mailrelay.spool: commit and recovery, streaming large bodies,
group commit, per-recipient outcomes, reclaiming space and locking.

They run on real files in the test's temporary directory with real fsyncs,
a real thread pool and the real reactor (the spool's work happens in
threads), and each finishes in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.interfaces import ISpool, ISpoolWriter
from mailrelay.spool import (
    RecipientState,
    Spool,
    SpoolError,
    SpoolLockedError,
    Status,
    UnknownMessage,
    disk_free_fraction,
)
from mailrelay.spool.ids import LENGTH, QueueIds, is_queue_id, new_queue_id, queue_id_time

reactor: Any = _reactor  # the global reactor provides every interface the spool needs

ENVELOPE = {
    "account": 7,
    "mail_from": "sender@example.com",
    "client": {"ip": "192.0.2.1"},
    "params": {"smtputf8": True},
    "note": "Grüße ✉",
}
RCPTS = ("a@example.org", "b@example.net")


def async_test(f: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    """Let a test be ``async def`` (trial waits for the Deferred it returns)."""

    @functools.wraps(f)
    def wrapper(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(f(self))

    return wrapper


def body_of(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking message bytes of ``size``."""
    block = hashlib.sha256(b"%d" % seed).hexdigest().encode() + b"\r\n"
    return (block * (size // len(block) + 1))[:size]


class SpoolTestCase(unittest.TestCase):
    """A started thread pool and helpers to open, fill and re-open a spool."""

    def setUp(self) -> None:
        self.pool = ThreadPool(2, 4, name="test-spool")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.directory = self.mktemp()
        self.fsyncs = 0
        self.fsync_lock = threading.Lock()

    def counting_fsync(self, fd: int) -> None:
        with self.fsync_lock:
            self.fsyncs += 1
        os.fsync(fd)

    async def open(self, **kwargs: Any) -> tuple[Spool, list[Any]]:
        kwargs.setdefault("fsync", self.counting_fsync)
        kwargs.setdefault("compact_interval", 0)
        spool = Spool(self.directory, reactor, self.pool, reactor, **kwargs)
        self.addCleanup(spool.close)
        recovered = await spool.recover()
        return spool, recovered

    async def reopen(self, spool: Spool, **kwargs: Any) -> tuple[Spool, list[Any]]:
        await spool.close()
        return await self.open(**kwargs)

    async def put(self, spool: Spool, body: bytes, recipients: tuple[str, ...] = RCPTS, chunk: int = 65536) -> str:
        writer = spool.open_message(ENVELOPE, recipients)
        for i in range(0, len(body), chunk):
            writer.write(body[i : i + chunk])
        return await writer.commit()

    def files(self, prefix: str) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if n.startswith(prefix))


class RoundTripTests(SpoolTestCase):
    @async_test
    async def test_provides_interfaces(self) -> None:
        """The spool and its writers provide ISpool and ISpoolWriter."""
        spool, _ = await self.open()
        self.assertTrue(verifyObject(ISpool, spool))
        writer = spool.open_message(ENVELOPE, RCPTS)
        self.assertTrue(verifyObject(ISpoolWriter, writer))
        writer.abort()

    @async_test
    async def test_small_message_survives_reopen(self) -> None:
        """A committed 1 KB message comes back byte-identical from a new Spool object."""
        spool, recovered = await self.open()
        self.assertEqual(recovered, [])
        body = body_of(1024)
        writer = spool.open_message(ENVELOPE, RCPTS)
        writer.write(body[:100])
        writer.write(body[100:])
        self.assertEqual(writer.size, 1024)
        qid = await writer.commit()
        self.assertEqual(qid, writer.queue_id)
        self.assertFalse(writer.spilled)

        spool, recovered = await self.reopen(spool)
        self.assertEqual([m.queue_id for m in recovered], [qid])
        message = recovered[0]
        self.assertEqual(message.envelope, ENVELOPE)
        self.assertEqual(message.recipients, RCPTS)
        self.assertEqual(message.states, (RecipientState(),) * 2)
        self.assertEqual(message.pending_recipients, RCPTS)
        self.assertEqual(message.size, 1024)
        self.assertEqual(await spool.read_message(qid), body)
        reader = spool.open_body(qid)
        self.assertEqual(reader.size, 1024)
        self.assertEqual((await reader.read(0, 10)) + (await reader.read(10, 5000)), body)
        self.assertEqual(await reader.read(1024, 10), b"")
        reader.close()

    @async_test
    async def test_large_message_streams_to_disk(self) -> None:
        """
        A 20 MB body written in 64 KB chunks is spilled to its own file
        instead of accumulating in memory, and comes back byte-identical.
        """
        spool, _ = await self.open()
        chunk = body_of(65536, seed=1)
        count = 20 * 1024 * 1024 // len(chunk)
        writer = spool.open_message(ENVELOPE, RCPTS)
        tracemalloc.start()
        try:
            for _ in range(count):
                writer.write(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertTrue(writer.spilled)
        self.assertEqual(writer.buffered, 0)
        self.assertLess(peak, 2 * 1024 * 1024)
        self.assertEqual(self.files("big-"), [f"big-{writer.queue_id}"])
        self.assertEqual(os.path.getsize(os.path.join(self.directory, f"big-{writer.queue_id}")), 20 << 20)
        qid = await writer.commit()

        spool, recovered = await self.reopen(spool)
        self.assertEqual([(m.queue_id, m.size) for m in recovered], [(qid, 20 << 20)])
        self.assertEqual(recovered[0].envelope, ENVELOPE)
        expected = hashlib.sha256(chunk * count).hexdigest()
        reader = spool.open_body(qid)
        digest = hashlib.sha256()
        offset = 0
        while piece := await reader.read(offset, 1 << 20):
            digest.update(piece)
            offset += len(piece)
        reader.close()
        self.assertEqual(digest.hexdigest(), expected)
        self.assertEqual(hashlib.sha256(await spool.read_message(qid)).hexdigest(), expected)

    @async_test
    async def test_subscribers_hear_of_durable_commits(self) -> None:
        """Listeners get each message once it is durable, before commit() fires."""
        spool, _ = await self.open()
        heard: list[Any] = []
        spool.subscribe(heard.append)
        spool.subscribe(lambda m: 1 / 0)  # a broken listener does not break the commit
        writer = spool.open_message(ENVELOPE, RCPTS)
        writer.write(b"x")
        d = writer.commit()
        self.assertEqual(heard, [])
        qid = await d
        self.assertEqual([(m.queue_id, m.recipients) for m in heard], [(qid, RCPTS)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @async_test
    async def test_abort_leaves_nothing(self) -> None:
        """Aborted messages, small or spilled, leave no file and no message behind."""
        spool, _ = await self.open(spill_threshold=1000)
        small = spool.open_message(ENVELOPE, RCPTS)
        small.write(b"x" * 100)
        small.abort()
        large = spool.open_message(ENVELOPE, RCPTS)
        large.write(b"x" * 5000)
        self.assertEqual(len(self.files("big-")), 1)
        large.abort()
        self.assertRaises(SpoolError, large.write, b"more")
        self.failureResultOf(large.commit(), SpoolError)
        spool, recovered = await self.reopen(spool)
        self.assertEqual(recovered, [])
        self.assertEqual(self.files("big-"), [])
        self.assertEqual(len(spool), 0)

    @async_test
    async def test_uncommitted_message_is_invisible(self) -> None:
        """Bytes written without commit (the session died) are gone after recovery."""
        spool, _ = await self.open(spill_threshold=1000)
        kept = await self.put(spool, b"kept\r\n")
        for size in (100, 5000):
            writer = spool.open_message(ENVELOPE, RCPTS)
            writer.write(b"y" * size)
        spool, recovered = await self.reopen(spool)
        self.assertEqual([m.queue_id for m in recovered], [kept])
        self.assertEqual(self.files("big-"), [])

    @async_test
    async def test_records_of_unknown_or_bad_recipients_fail(self) -> None:
        """Outcomes for unknown messages or recipients are refused, not stored."""
        spool, _ = await self.open()
        qid = await self.put(spool, b"x")
        self.failureResultOf(spool.record("0" * LENGTH, {}), UnknownMessage)
        self.failureResultOf(spool.record(qid, {"c@example.org": RecipientState.delivered()}), ValueError)
        self.assertRaises(ValueError, spool.open_message, ENVELOPE, ["a@x", "a@x"])
        self.assertRaises(ValueError, spool.open_message, ENVELOPE, [])
        self.assertRaises(TypeError, spool.open_message, {"bad": object()}, RCPTS)


class FreshBodyTests(SpoolTestCase):
    """A just-committed body is read once from memory; later reads and evicted ones come from disk."""

    def damage_segments(self) -> None:
        for name in self.files("seg-"):
            path = os.path.join(self.directory, name)
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                data[-3] ^= 0xFF  # inside the last record's body
                f.seek(0)
                f.write(data)

    @async_test
    async def test_first_read_from_memory_then_from_disk(self) -> None:
        """The first read needs no disk (damage on disk does not show); the second checks the CRC there."""
        spool, _ = await self.open()
        body = body_of(2000, 3)
        qid = await self.put(spool, body)
        self.damage_segments()
        self.assertEqual(await spool.read_message(qid), body)
        with self.assertRaisesRegex(ValueError, "checksum"):
            await spool.read_message(qid)

    @async_test
    async def test_budget_keeps_the_next_to_be_read(self) -> None:
        """
        Beyond the budget a new body is not kept (it is read from the segment
        later): the ones kept are older, and the queue reads them first.
        """
        spool, _ = await self.open(fresh_budget=2500)
        ids = [await self.put(spool, body_of(1000, i)) for i in range(3)]
        self.assertEqual(spool._fresh_size, 2000)
        self.damage_segments()  # the last record: read from disk, it fails its checksum
        for i, qid in enumerate(ids[:2]):
            self.assertEqual(await spool.read_message(qid), body_of(1000, i))
        with self.assertRaisesRegex(ValueError, "checksum"):
            await spool.read_message(ids[2])
        self.assertEqual(spool._fresh_size, 0)

    @async_test
    async def test_bodies_kept_too_long_make_room(self) -> None:
        """A body kept longer than ``fresh_age`` (say, a held message) gives its room to a new one."""
        spool, _ = await self.open(fresh_budget=2500, fresh_age=0)
        ids = [await self.put(spool, body_of(1000, i)) for i in range(3)]
        self.assertEqual(spool._fresh_size, 2000)
        self.damage_segments()  # the newest was kept: its damage on disk does not show
        for i, qid in enumerate(ids):
            self.assertEqual(await spool.read_message(qid), body_of(1000, i))
        self.assertEqual(spool._fresh_size, 0)

    @async_test
    async def test_finished_message_is_forgotten(self) -> None:
        """A message finished before its first read leaves nothing in memory."""
        spool, _ = await self.open()
        qid = await self.put(spool, body_of(500))
        self.assertEqual(spool._fresh_size, 500)
        await spool.delete(qid)
        self.assertEqual((spool._fresh_size, len(spool._fresh)), (0, 0))
        self.failureResultOf(spool.read_message(qid), UnknownMessage)


class QueueIdTests(unittest.SynchronousTestCase):
    def test_shape_and_order(self) -> None:
        """Ids are fixed-width file-name-safe strings that sort by creation time."""
        ids = [new_queue_id(1_700_000_000 + i * 0.001) for i in range(200)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 200)
        for qid in ids:
            self.assertTrue(is_queue_id(qid), qid)
            self.assertEqual(len(qid), 18)
        self.assertAlmostEqual(queue_id_time(ids[5]), 1_700_000_000.005, places=3)

    def test_monotonic_within_a_process(self) -> None:
        """Ids from one generator sort in creation order, even within a millisecond or if the clock steps back."""
        make = QueueIds()
        ids = [make(1_700_000_000.0) for _ in range(100)] + [make(1_600_000_000.0) for _ in range(5)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 105)
        self.assertTrue(all(is_queue_id(q) for q in ids))

    def test_unique_within_a_millisecond(self) -> None:
        """Two processes creating ids in the same millisecond do not collide."""
        self.assertEqual(len({new_queue_id(1_700_000_000.0) for _ in range(10000)}), 10000)


class GroupCommitTests(SpoolTestCase):
    @async_test
    async def test_concurrent_commits_share_fsyncs(self) -> None:
        """200 concurrent commits cost a handful of fsync rounds, not 200 fsyncs."""
        spool, _ = await self.open()
        before = self.fsyncs
        writers = []
        for i in range(200):
            writer = spool.open_message(ENVELOPE, RCPTS)
            writer.write(body_of(1000, i))
            writers.append(writer)
        results = await DeferredList([w.commit() for w in writers], fireOnOneErrback=True)
        ids = [qid for _, qid in results]
        self.assertLess(self.fsyncs - before, 20)
        self.assertEqual(spool.stats().commits, 200)
        spool, recovered = await self.reopen(spool)
        self.assertEqual(sorted(ids), [m.queue_id for m in recovered])

    @async_test
    async def test_commit_waits_for_fsync(self) -> None:
        """The commit Deferred fires only after the fsync that covers it returned."""
        gate = threading.Event()
        started = threading.Event()
        blocking = [False]

        def slow_fsync(fd: int) -> None:
            if blocking[0]:
                started.set()
                gate.wait(10)
            os.fsync(fd)

        spool, _ = await self.open(fsync=slow_fsync)
        blocking[0] = True
        writer = spool.open_message(ENVELOPE, RCPTS)
        writer.write(b"hello\r\n")
        d = writer.commit()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(started.is_set())
        self.assertNoResult(d)
        gate.set()
        self.assertEqual(await d, writer.queue_id)

    @async_test
    async def test_failed_fsync_fails_commit_and_spool(self) -> None:
        """After an fsync error no commit is acknowledged and new messages are refused."""
        broken = [False]

        def fsync(fd: int) -> None:
            if broken[0]:
                raise OSError(5, "Input/output error")
            os.fsync(fd)

        spool, _ = await self.open(fsync=fsync)
        broken[0] = True
        writer = spool.open_message(ENVELOPE, RCPTS)
        writer.write(b"x")
        with self.assertRaises(SpoolError):
            await writer.commit()
        self.assertRaises(SpoolError, spool.open_message, ENVELOPE, RCPTS)


class OutcomeTests(SpoolTestCase):
    @async_test
    async def test_outcomes_survive_reopen(self) -> None:
        """A delivered and a deferred recipient come back so; only the deferred one is pending."""
        spool, _ = await self.open()
        qid = await self.put(spool, b"body\r\n")
        deferred = RecipientState.deferred(2, 1_800_000_000.5, "451 4.7.1 try later")
        await spool.record(qid, {RCPTS[0]: RecipientState.delivered("250 2.0.0 ok")})
        await spool.record(qid, {RCPTS[1]: deferred})
        spool, recovered = await self.reopen(spool)
        (message,) = recovered
        self.assertEqual(message.pending_recipients, (RCPTS[1],))
        self.assertEqual(message.state_of(RCPTS[0]).status, Status.DELIVERED)
        self.assertEqual(message.state_of(RCPTS[0]).last_reply, "250 2.0.0 ok")
        self.assertEqual(message.state_of(RCPTS[1]), deferred)

    @async_test
    async def test_final_state_never_changes(self) -> None:
        """A delivered recipient cannot be set back to deferred (no double delivery)."""
        spool, _ = await self.open()
        qid = await self.put(spool, b"body\r\n")
        await spool.record(qid, {RCPTS[0]: RecipientState.delivered("250 ok")})
        self.failureResultOf(spool.record(qid, {RCPTS[0]: RecipientState.deferred(1, 0.0)}), ValueError)
        await spool.record(qid, {RCPTS[0]: RecipientState.delivered("250 ok")})
        self.assertEqual(spool.get(qid).state_of(RCPTS[0]).status, Status.DELIVERED)  # type: ignore[union-attr]

    @async_test
    async def test_get_shares_a_snapshot_until_it_changes(self) -> None:
        """``get`` answers with one snapshot until a record or a hold changes the message."""
        spool, _ = await self.open()
        qid = await self.put(spool, b"body\r\n")
        first = spool.get(qid)
        self.assertIs(spool.get(qid), first)
        await spool.record(qid, {RCPTS[0]: RecipientState.delivered("250 ok")})
        second = spool.get(qid)
        assert first is not None and second is not None
        self.assertEqual(first.state_of(RCPTS[0]).status, Status.PENDING)  # the old snapshot stays as it was
        self.assertEqual(second.state_of(RCPTS[0]).status, Status.DELIVERED)
        await spool.hold(qid)
        held = spool.get(qid)
        assert held is not None
        self.assertEqual((second.held, held.held), (False, True))
        self.assertIs(spool.get(qid), held)

    @async_test
    async def test_hold_release_delete(self) -> None:
        """Hold, release and delete are durable; deleted messages are gone for good."""
        spool, _ = await self.open()
        held = await self.put(spool, b"1")
        released = await self.put(spool, b"2")
        deleted = await self.put(spool, b"3")
        await spool.hold(held)
        await spool.hold(released)
        await spool.release(released)
        await spool.delete(deleted)
        self.assertIsNone(spool.get(deleted))
        self.failureResultOf(spool.read_message(deleted), UnknownMessage)
        spool, recovered = await self.reopen(spool)
        self.assertEqual([(m.queue_id, m.held) for m in recovered], [(held, True), (released, False)])
        self.assertEqual(spool.stats().held, 1)

    @async_test
    async def test_finished_messages_free_their_segments(self) -> None:
        """Once every message of a segment is finished, the segment file is deleted."""
        spool, _ = await self.open(segment_size=4096, spill_threshold=2000)
        ids = [await self.put(spool, body_of(900, i)) for i in range(30)]
        big = await self.put(spool, body_of(5000, 99))
        self.assertGreater(len(self.files("seg-")), 5)
        for qid in [*ids, big]:
            await spool.record(qid, {r: RecipientState.delivered("250 ok") for r in RCPTS})
        await spool.close()  # waits for the deletions
        self.assertEqual(len(self.files("seg-")), 1)  # only the current one
        self.assertEqual(self.files("big-"), [])
        spool, recovered = await self.open(segment_size=4096)
        self.assertEqual(recovered, [])
        self.assertEqual(spool.stats().messages, 0)

    @async_test
    async def test_compaction_keeps_long_lived_messages(self) -> None:
        """
        Compaction moves the few live messages out of old segments so those
        can be deleted, and the moved messages keep body and state.
        """
        spool, _ = await self.open(segment_size=4096, spill_threshold=2000)
        ids = [await self.put(spool, body_of(900, i)) for i in range(30)]
        big = await self.put(spool, body_of(5000, 99))
        keep = {ids[1], ids[12], big}
        deferred = RecipientState.deferred(1, 1_800_000_000.0, "421 busy")
        for qid in ids:
            if qid not in keep:
                await spool.record(qid, {r: RecipientState.delivered("250 ok") for r in RCPTS})
        await spool.record(ids[1], {RCPTS[0]: deferred})
        segments_before = self.files("seg-")
        moved = await spool.compact(min_age=0)
        self.assertEqual(moved, 2)  # ids[1], ids[12]; the big one's segment is the current one
        await spool.record(ids[12], {RCPTS[1]: RecipientState.bounced("550 no such user")})
        await spool.close()
        self.assertLess(len(self.files("seg-")), len(segments_before))
        self.assertNotIn(segments_before[0], self.files("seg-"))
        spool, recovered = await self.open(segment_size=4096)
        self.assertEqual({m.queue_id for m in recovered}, keep)
        self.assertEqual(await spool.read_message(ids[1]), body_of(900, 1))
        self.assertEqual(await spool.read_message(ids[12]), body_of(900, 12))
        self.assertEqual(await spool.read_message(big), body_of(5000, 99))
        self.assertEqual(spool.get(ids[1]).states, (deferred, RecipientState()))  # type: ignore[union-attr]
        self.assertEqual(spool.get(ids[12]).pending_recipients, (RCPTS[0],))  # type: ignore[union-attr]

    @async_test
    async def test_read_during_compaction(self) -> None:
        """A body reader opened before compaction keeps reading after the old segment is deleted."""
        spool, _ = await self.open(segment_size=2048)
        ids = [await self.put(spool, body_of(900, i)) for i in range(8)]
        reader = spool.open_body(ids[0])
        for qid in ids[1:]:
            await spool.record(qid, {r: RecipientState.delivered() for r in RCPTS})
        self.assertEqual(await spool.compact(min_age=0), 1)
        await spool.close()
        self.assertEqual(await reader.read(0, 2000), body_of(900, 0))
        reader.close()

    @async_test
    async def test_checkpoints_bound_the_journal(self) -> None:
        """
        A long history of outcomes is folded into checkpoints: old journals
        are deleted and the state after re-opening is unchanged.
        """
        spool, _ = await self.open(journal_size=2048)
        ids = [await self.put(spool, b"m%d" % i) for i in range(10)]
        for attempt in range(1, 21):
            for qid in ids[1:]:
                await spool.record(qid, {RCPTS[1]: RecipientState.deferred(attempt, 1e9 + attempt, "451")})
        await spool.record(ids[0], {r: RecipientState.delivered() for r in RCPTS})
        await spool.close()
        self.assertEqual(len(self.files("jnl-")), 1)
        self.assertLessEqual(len(self.files("ckpt-")), 1)
        spool, recovered = await self.open(journal_size=2048)
        self.assertEqual([m.queue_id for m in recovered], ids[1:])
        for message in recovered:
            self.assertEqual(message.states[1], RecipientState.deferred(20, 1e9 + 20, "451"))
            self.assertEqual(message.states[0], RecipientState())

    @async_test
    async def test_stats(self) -> None:
        """stats() counts live messages, recipients by state and bytes."""
        spool, _ = await self.open()
        a = await self.put(spool, b"x" * 100)
        await self.put(spool, b"y" * 50)
        await spool.record(a, {RCPTS[0]: RecipientState.deferred(1, 0.0)})
        stats = spool.stats()
        self.assertEqual(stats.messages, 2)
        self.assertEqual(stats.body_bytes, 150)
        self.assertEqual(dict(stats.recipients), {"pending": 3, "deferred": 1, "delivered": 0, "bounced": 0})
        self.assertGreater(stats.disk_bytes, 150)
        self.assertEqual(stats.commits, 2)
        self.assertEqual([m.queue_id for m in spool.messages()], sorted(m.queue_id for m in spool.messages()))


class LockTests(SpoolTestCase):
    @async_test
    async def test_second_open_is_refused(self) -> None:
        """A directory that is open cannot be opened again; the error says why and by whom."""
        spool, _ = await self.open()
        with self.assertRaises(SpoolLockedError) as caught:
            Spool(self.directory, reactor, self.pool, reactor)
        self.assertIn(str(os.getpid()), str(caught.exception))
        self.assertIn(os.path.abspath(self.directory), str(caught.exception))
        await spool.close()
        spool, _ = await self.open()
        self.assertEqual(len(spool), 0)

    def test_disk_free_fraction(self) -> None:
        """The free fraction is a number between 0 and 1."""
        os.makedirs(self.directory)
        fraction = disk_free_fraction(self.directory)
        self.assertTrue(0.0 <= fraction <= 1.0, fraction)
