"""
Spool micro-benchmark: commits per second with 50 concurrent writers.

    .venv/bin/python bench/spool_bench.py [--seconds 5] [--writers 50] [--dir DIR]

For 1 KB and 20 KB bodies it measures:

* ``spool``: ``mailrelay.spool.Spool`` (segments + group commit);
* ``spool+outcome``: the same, and each message then gets both recipients
  recorded delivered (commit, then a second durable write, then the message
  is finished and its space reclaimed): the accept-and-deliver cycle;
* ``file-per-message``: the Postfix-style baseline: write a new file, fsync
  it, rename it into place, fsync the directory, one message per worker
  thread (50 threads, so fsyncs overlap as they would across smtpd processes).

The directory should be on the disk the spool will use (default: a temporary
directory next to this file, removed afterwards).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import react
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mailrelay.spool import RecipientState, Spool

RCPTS = ("rcpt1@example.org", "rcpt2@example.net")
ENVELOPE = {"account": 1, "mail_from": "sender@example.com", "client": "192.0.2.1"}


async def timed(
    reactor: Any, seconds: float, writers: int, one: Callable[[int], Coroutine[Any, Any, None]]
) -> tuple[int, float]:
    deadline = time.perf_counter() + seconds
    count = 0

    async def loop(w: int) -> None:
        nonlocal count
        i = 0
        while time.perf_counter() < deadline:
            await one(w * 1_000_000 + i)
            i += 1
            count += 1

    start = time.perf_counter()
    await DeferredList([Deferred.fromCoroutine(loop(w)) for w in range(writers)], fireOnOneErrback=True)
    return count, time.perf_counter() - start


async def bench_spool(
    reactor: Any, base: str, size: int, seconds: float, writers: int, outcome: bool
) -> tuple[float, str]:
    directory = tempfile.mkdtemp(dir=base)
    pool = ThreadPool(2, 4, name="bench-spool")
    pool.start()
    spool = Spool(directory, reactor, pool, reactor)
    await spool.recover()
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"\r\n"
    delivered = {r: RecipientState.delivered("250 2.0.0 ok") for r in RCPTS}

    async def one(_: int) -> None:
        writer = spool.open_message(ENVELOPE, RCPTS)
        for i in range(0, len(body), 16384):
            writer.write(body[i : i + 16384])
        qid = await writer.commit()
        if outcome:
            await spool.record(qid, delivered)

    count, elapsed = await timed(reactor, seconds, writers, one)
    stats = spool.stats()
    await spool.close()
    pool.stop()
    shutil.rmtree(directory)
    note = f"{stats.syncs} fsync rounds, {count / max(stats.syncs, 1):.1f} commits/round"
    return count / elapsed, note


async def bench_files(reactor: Any, base: str, size: int, seconds: float, writers: int) -> tuple[float, str]:
    directory = tempfile.mkdtemp(dir=base)
    os.mkdir(os.path.join(directory, "tmp"))
    os.mkdir(os.path.join(directory, "queue"))
    dirfd = os.open(os.path.join(directory, "queue"), os.O_RDONLY | os.O_DIRECTORY)
    pool = ThreadPool(writers, writers, name="bench-files")
    pool.start()
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"\r\n"

    def store(n: int) -> None:
        tmp = os.path.join(directory, "tmp", str(n))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"envelope\n" + body)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(directory, "queue", str(n)))
        os.fsync(dirfd)

    async def one(n: int) -> None:
        await deferToThreadPool(reactor, pool, store, n)

    count, elapsed = await timed(reactor, seconds, writers, one)
    pool.stop()
    os.close(dirfd)
    shutil.rmtree(directory)
    return count / elapsed, ""


async def main(reactor: Any, args: argparse.Namespace) -> None:
    base = args.dir or tempfile.mkdtemp(prefix="spool-bench-", dir=os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(base, exist_ok=True)
    try:
        print(f"{args.writers} concurrent writers, {args.seconds:g} s per run, in {base}")
        for size in (1024, 20 * 1024):
            for name in ("spool", "spool+outcome", "file-per-message"):
                if name == "file-per-message":
                    rate, note = await bench_files(reactor, base, size, args.seconds, args.writers)
                else:
                    outcome = name == "spool+outcome"
                    rate, note = await bench_spool(reactor, base, size, args.seconds, args.writers, outcome)
                print(f"{size // 1024:>3} KB  {name:<17} {rate:8.0f} msg/s  {note}")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--dir", default=None)
    arguments = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
