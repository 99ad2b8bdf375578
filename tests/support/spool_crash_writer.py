"""
Child process for the spool crash test: commits messages as fast as it can
and prints a line only after the spool said the thing is durable, so the
parent knows exactly what must survive the ``SIGKILL`` it sends at a random
moment.

Usage: ``python spool_crash_writer.py DIRECTORY FIRST_NUMBER``.  Lines:
``C <queue id> <n>`` committed message number n; ``R <queue id>`` its first
recipient recorded delivered; ``F <queue id>`` all recipients delivered
(finished).  Bodies are a function of n (see ``body_for``), every seventh one
larger than the spill threshold, so both storage kinds are exercised; small
segment and journal sizes make rotation, checkpoints, segment deletion and
compaction happen while the process may be killed.
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import react
from twisted.python.threadpool import ThreadPool

from mailrelay.spool import RecipientState, Spool

SPILL = 8 * 1024
RECIPIENTS = ("one@example.com", "two@example.org")


def plan(n: int) -> str:
    """
    What happens to message n after commit: "keep" (nothing), "first" (its
    first recipient is delivered) or "finish" (both are).  Most finish, so
    segments become mostly dead and compaction and deletion run.
    """
    return {1: "keep", 2: "first"}.get(n % 8, "finish")


def body_for(n: int) -> bytes:
    line = f"Message {n} line of text that is repeated\r\n".encode()
    repeat = (SPILL // len(line)) + 40 if n % 7 == 3 else n % 30 + 1
    return b"Subject: crash test %d\r\n\r\n" % n + line * repeat


def open_spool(directory: str, reactor: object, pool: ThreadPool) -> Spool:
    return Spool(
        directory,
        reactor,  # type: ignore[arg-type]
        pool,
        reactor,  # type: ignore[arg-type]
        spill_threshold=SPILL,
        segment_size=32 * 1024,
        journal_size=4 * 1024,
        compact_after=0.0,
        compact_interval=0.05,
    )


async def run(reactor: object, directory: str, first: int) -> None:
    pool = ThreadPool(2, 4, name="spool-crash")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)  # type: ignore[attr-defined]
    spool = open_spool(directory, reactor, pool)
    await spool.recover()
    out = sys.stdout
    counter = iter(range(first, first + 10**9))

    async def worker() -> None:
        for n in counter:
            writer = spool.open_message({"n": n, "mail_from": "s@example.net"}, RECIPIENTS)
            body = body_for(n)
            for i in range(0, len(body), 4096):
                writer.write(body[i : i + 4096])
            qid = await writer.commit()
            out.write(f"C {qid} {n}\n")
            out.flush()
            if plan(n) != "keep":
                await spool.record(qid, {RECIPIENTS[0]: RecipientState.delivered("250 ok")})
                out.write(f"R {qid}\n")
                out.flush()
                if plan(n) == "finish":
                    await spool.record(qid, {RECIPIENTS[1]: RecipientState.delivered("250 ok")})
                    out.write(f"F {qid}\n")
                    out.flush()

    await DeferredList([Deferred.fromCoroutine(worker()) for _ in range(8)], fireOnOneErrback=True)


def main(reactor: object) -> Deferred[None]:
    return Deferred.fromCoroutine(run(reactor, sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    react(main)
