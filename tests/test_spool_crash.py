"""
Crash tests for mailrelay.spool: files cut at every byte of their last
record (what a crash in the middle of a write leaves), and a real process
killed with SIGKILL while it commits and records outcomes.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor as _reactor

import mailrelay
from mailrelay.spool import RecipientState, Spool, Status
from mailrelay.spool import records as rec
from tests.support import spool_crash_writer as child
from tests.test_spool import ENVELOPE, RCPTS, SpoolTestCase, async_test

reactor: Any = _reactor  # the global reactor provides every interface the spool needs


class TornTailTests(SpoolTestCase):
    async def cut_and_recover(self, name: str, start: int, end: int, step: int = 1) -> list[list[Any]]:
        """
        For every length in [start, end), recover a copy of the spool as it
        was closed (on the first call) with file ``name`` cut to that length;
        returns what each recovery found.
        """
        pristine = self.directory + ".pristine"
        if not os.path.exists(pristine):
            shutil.copytree(self.directory, pristine)
        results = []
        for length in range(start, end, step):
            shutil.rmtree(self.directory)
            shutil.copytree(pristine, self.directory)
            with open(os.path.join(self.directory, name), "r+b") as f:
                f.truncate(length)
            spool = Spool(self.directory, reactor, self.pool, reactor, compact_interval=0)
            recovered = await spool.recover()
            results.append([(m, await spool.read_message(m.queue_id)) for m in recovered])
            await spool.close()
        return results

    @async_test
    async def test_torn_segment_tail(self) -> None:
        """A message record cut anywhere is ignored; the message before it is intact."""
        spool, _ = await self.open()
        first = await self.put(spool, b"first body\r\n")
        second = await self.put(spool, b"second body\r\n")
        await spool.close()
        (name,) = self.files("seg-")
        path = os.path.join(self.directory, name)
        frames = rec.read_frames(path)
        self.assertEqual(frames[-1].kind, rec.K_MSG_INLINE)
        size = os.path.getsize(path)
        self.assertEqual(frames[-1].offset + frames[-1].length, size)

        results = await self.cut_and_recover(name, frames[-1].offset, size)
        self.assertEqual(len(results), frames[-1].length)
        for found in results:
            self.assertEqual([(m.queue_id, body) for m, body in found], [(first, b"first body\r\n")])
            self.assertEqual(found[0][0].envelope, ENVELOPE)
        # Uncut, both are there.
        results = await self.cut_and_recover(name, size, size + 1)
        self.assertEqual([m.queue_id for m, _ in results[0]], [first, second])

    @async_test
    async def test_torn_journal_tail(self) -> None:
        """An outcome record cut anywhere is ignored; the outcome before it holds."""
        spool, _ = await self.open()
        qid = await self.put(spool, b"body\r\n")
        await spool.record(qid, {RCPTS[0]: RecipientState.delivered("250 ok")})
        await spool.record(qid, {RCPTS[1]: RecipientState.delivered("250 ok")})
        await spool.close()
        (name,) = self.files("jnl-")
        path = os.path.join(self.directory, name)
        frames = rec.read_frames(path)
        self.assertEqual([f.kind for f in frames[1:]], [rec.K_OUTCOME, rec.K_OUTCOME])
        size = os.path.getsize(path)

        results = await self.cut_and_recover(name, frames[-1].offset, size)
        for found in results:
            (message, body) = found[0]
            self.assertEqual(body, b"body\r\n")
            self.assertEqual([s.status for s in message.states], [Status.DELIVERED, Status.PENDING])
        # Uncut, the message is finished and gone.
        self.assertEqual((await self.cut_and_recover(name, size, size + 1))[0], [])

    @async_test
    async def test_large_message_record_torn(self) -> None:
        """A large message whose record is cut is dropped together with its body file."""
        spool, _ = await self.open(spill_threshold=1000)
        small = await self.put(spool, b"small\r\n")
        large = await self.put(spool, b"L" * 5000)
        await spool.close()
        (name,) = self.files("seg-")
        path = os.path.join(self.directory, name)
        last = rec.read_frames(path)[-1]
        self.assertEqual(last.kind, rec.K_MSG_FILE)
        for found in await self.cut_and_recover(name, last.offset, last.offset + last.length, step=7):
            self.assertEqual([m.queue_id for m, _ in found], [small])
            self.assertEqual(self.files("big-"), [])
        found = (await self.cut_and_recover(name, last.offset + last.length, last.offset + last.length + 1))[0]
        self.assertEqual([(m.queue_id, b) for m, b in found], [(small, b"small\r\n"), (large, b"L" * 5000)])

    @async_test
    async def test_leftover_temporary_checkpoint_ignored(self) -> None:
        """A half-written checkpoint (a crash while writing it) is removed and changes nothing."""
        spool, _ = await self.open()
        qid = await self.put(spool, b"x")
        await spool.close()
        with open(os.path.join(self.directory, "tmp-ckpt-00000099"), "wb") as f:
            f.write(rec.file_header("checkpoint", 99) + b"MR\x30")
        spool, recovered = await self.open()
        self.assertEqual([m.queue_id for m in recovered], [qid])
        self.assertEqual(self.files("tmp-"), [])


class KilledProcessTests(SpoolTestCase):
    def run_until_killed(self, first: int, lines: int) -> list[list[str]]:
        """
        Run the writer child on the spool until it printed ``lines`` lines,
        SIGKILL it, and return every line it printed (split).
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(mailrelay.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        proc = subprocess.Popen(
            [sys.executable, child.__file__, os.path.abspath(self.directory), str(first)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
        )
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 30
        try:
            while out.count(b"\n") < lines:
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.fail(f"writer stopped or stalled after {len(out.splitlines())} lines")
                ready, _, _ = select.select([proc.stdout], [], [], 1)
                if ready:
                    out += os.read(proc.stdout.fileno(), 65536)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        out += proc.stdout.read()
        proc.stdout.close()
        # Each line is one write(2) smaller than PIPE_BUF, so none is cut short.
        return [line.split() for line in out.decode().split("\n")[:-1]]

    @async_test
    async def test_sigkill_loses_nothing_acknowledged(self) -> None:
        """
        Three times, a process committing and recording outcomes is killed
        at some point; every message it reported committed is recovered
        byte-identical, with every outcome it reported, and every message it
        reported finished stays finished.
        """
        committed: dict[str, int] = {}
        first_done: set[str] = set()
        finished: set[str] = set()
        first = 0
        for lines in (300, 700, 150):
            for parts in self.run_until_killed(first, lines):
                if parts[0] == "C":
                    committed[parts[1]] = int(parts[2])
                elif parts[0] == "R":
                    first_done.add(parts[1])
                elif parts[0] == "F":
                    finished.add(parts[1])
            first = max(committed.values()) + 1
            spool = child.open_spool(self.directory, reactor, self.pool)
            self.addCleanup(spool.close)
            recovered = {m.queue_id: m for m in await spool.recover()}
            for qid, n in committed.items():
                if qid in finished:
                    self.assertNotIn(qid, recovered, f"finished message {n} came back")
                    continue
                if child.plan(n) == "finish" and qid in first_done and qid not in recovered:
                    continue  # finishing it had started; it may have become durable unreported
                self.assertIn(qid, recovered, f"message {n} lost")
                message = recovered[qid]
                self.assertEqual(message.envelope["n"], n)
                self.assertEqual(await spool.read_message(qid), child.body_for(n))
                if qid in first_done:
                    self.assertEqual(message.states[0].status, Status.DELIVERED)
                self.assertEqual(message.states[1].status, Status.PENDING)
            await spool.close()
        self.assertGreater(len(committed), 400)
        self.assertGreater(len(finished), 200)
