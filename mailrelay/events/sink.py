"""
``EventSink``: where every stage reports what happened (``IEventSink``).

``emit`` only appends to a list, so the SMTP and delivery paths never wait
on the database.  A worker stores the events in batches: one transaction
per batch holds a multi-row ``INSERT`` into ``events`` and the upserts of
the statistics roll-ups (``mailrelay.events.stats``), so counts and events
never disagree.  Subscribers (webhooks) get each event after it is stored.

When a batch cannot be written, it is appended to an on-disk buffer
(``mailrelay.events.buffer``) and so is everything after it, to keep the
order; the worker retries every ``retry_interval`` seconds, replays the
buffer oldest first, then writes directly again.  A restarted process
replays what its buffer still holds.  Each batch carries a random id stored
in ``event_batches`` in the same transaction, so a batch written twice (a
commit whose answer was lost, a crash between the commit and recording the
replay position) is stored once.  A batch the database refuses although it
answers is split and stored event by event; an event it still refuses goes
to ``rejected.jsonl`` next to the buffer instead of blocking every later one.
"""

from __future__ import annotations

import inspect
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.events.buffer import OutageBuffer
from mailrelay.events.model import Event, EventType
from mailrelay.events.stats import increments
from mailrelay.interfaces import IEventSink
from mailrelay.storage.database import DatabasePool, Transaction

T = TypeVar("T")
Subscriber = Callable[[Event], object]

log = Logger()

EVENT_COLUMNS = (
    "ts",
    "account_id",
    "type",
    "queue_id",
    "message_id",
    "transmission_id",
    "recipient",
    "campaign_id",
    "tags",
    "detail",
)
_INSERT_EVENTS = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES"
_INSERT_COUNTS = "INSERT INTO daily_counts (account_id, day, dimension, metric, value) VALUES"
_ADD_COUNTS = (
    "ON CONFLICT (account_id, day, dimension, metric) DO UPDATE SET value = daily_counts.value + excluded.value"
)
_MARK = "INSERT INTO event_batches (id, ts) VALUES (?, ?) ON CONFLICT (id) DO NOTHING"
_EVENTS_ORDER_LOCK = 7212346  # the key of the lock that commits event batches in id order (the schema's is 7212345)
_PRUNE_EVERY = 3600.0


def encode_tags(tags: Sequence[str]) -> str:
    """Tags as stored in ``events.tags``: a JSON array, or '' for none (tags may hold commas)."""
    return json.dumps(list(tags)) if tags else ""


def decode_tags(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


# One encoder for every event (``json.dumps`` with options builds a new one per call).
_DETAIL_ENCODER = json.JSONEncoder(default=str, sort_keys=True)


def encode_detail(detail: dict[str, Any]) -> str | None:
    if not detail:
        return None
    try:
        return _DETAIL_ENCODER.encode(detail)
    except (ValueError, TypeError):  # a circular structure or odd keys: keep what can be told
        return json.dumps({"unencodable": repr(detail)})


def _text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; one such value would make the whole batch fail.
    return value.replace("\x00", "") if value else value


def event_row(event: Event) -> tuple[Any, ...]:
    return (
        event.ts,
        event.account_id,
        event.type.value,
        _text(event.queue_id),
        _text(event.message_id),
        _text(event.transmission_id),
        _text(event.recipient),
        event.campaign_id,
        _text(encode_tags(event.tags)),
        _text(encode_detail(event.detail)),
    )


def encode_batch(batch_id: str, events: Iterable[Event]) -> bytes:
    """One buffer line (ASCII JSON, so it never holds a raw newline)."""
    items = [{**e.to_json(), "detail": json.loads(encode_detail(e.detail) or "{}")} for e in events]
    line = json.dumps({"batch": batch_id, "events": items}, separators=(",", ":"), default=str)
    return line.encode("ascii") + b"\n"


async def insert_rows(txn: Transaction, sql: str, rows: Sequence[Sequence[Any]], suffix: str = "") -> None:
    """Multi-row ``INSERT`` (``sql`` ends in ``VALUES``), chunked under SQLite's parameter limit."""
    if not rows:
        return
    width = len(rows[0])
    group = "(" + ", ".join("?" * width) + ")"
    step = max(1, 30000 // width)
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        statement = f"{sql} {', '.join([group] * len(chunk))}"
        await txn.execute(f"{statement} {suffix}" if suffix else statement, [v for row in chunk for v in row])


@implementer(IEventSink)
class EventSink:
    """
    ``pool`` and ``clock`` as everywhere; ``reactor`` and ``threadpool`` run
    the buffer's file I/O off the reactor thread (a one-thread pool of its
    own when None); ``buffer_dir`` is this process's own directory.  Call
    ``start`` before and ``stop`` after use.
    """

    def __init__(
        self,
        pool: DatabasePool,
        clock: IReactorTime,
        reactor: IReactorFromThreads,
        buffer_dir: str | os.PathLike[str],
        threadpool: ThreadPool | None = None,
        interval: float = 0.5,
        max_rows: int = 500,
        retry_interval: float = 5.0,
        write_timeout: float = 60.0,
        max_memory: int = 200_000,
        batch_retention: float = 30 * 86400.0,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._reactor = reactor
        self._own_threads = threadpool is None
        self._threads = threadpool or ThreadPool(minthreads=1, maxthreads=1, name="mailrelay-events")
        self._buffer = OutageBuffer(os.fspath(buffer_dir))
        self._interval = interval
        self._max_rows = max_rows
        self._retry_interval = retry_interval
        self._write_timeout = write_timeout
        self._max_memory = max_memory
        self._batch_retention = batch_retention
        self._queue: list[Event] = []
        self._subscribers: list[Subscriber] = []
        self._parents: dict[int, int | None] = {}
        self._timer: IDelayedCall | None = None
        self._worker: Deferred[None] | None = None
        self._idle: list[Deferred[None]] = []
        self._started = False
        self._closing = False
        self._outage = False
        self._retry_at = 0.0  # no database attempt before this while the buffer holds batches
        self._disk_retry_at = 0.0  # no buffer write before this after a failed one
        self._last_prune = clock.seconds()
        self.written = 0  # stored directly
        self.spilled = 0  # appended to the buffer
        self.replayed = 0  # stored from the buffer
        self.duplicates = 0  # replayed but already stored
        self.rejected = 0  # refused by the database one by one: in rejected.jsonl
        self.dropped = 0  # lost: memory full while neither database nor disk took them

    # -- the interface -------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue ``event``; never blocks, never raises."""
        try:
            if not isinstance(event, Event) or not isinstance(event.type, EventType):
                log.error("not an Event, ignored: {event!r}", event=event)
                return
            if self._closing and not self._started:
                log.warn("event emitted after the sink stopped, not stored: {event!r}", event=event)
                return
            self._queue.append(event)
            if len(self._queue) > self._max_memory:
                excess = len(self._queue) - self._max_memory
                del self._queue[:excess]
                self.dropped += excess
                log.error("event sink: neither the database nor the buffer keeps up; dropped {n} event(s)", n=excess)
            if self._started and not self._closing:
                self._run_after(0 if len(self._queue) >= self._max_rows else self._interval)
        except Exception:
            log.failure("event not recorded: {event!r}", event=event)

    def subscribe(self, subscriber: Subscriber) -> None:
        """
        Call ``subscriber(event)`` for every event once stored: at least
        once, in order; a Deferred or coroutine it returns is not awaited.
        """
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.remove(subscriber)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of batches in the outage buffer waiting to be replayed."""
        return self._buffer.size - self._buffer.offset

    @property
    def queued(self) -> int:
        """Events in memory, not yet stored nor buffered."""
        return len(self._queue)

    async def start(self) -> None:
        """Open (and lock) the buffer; replay what a previous run left in it."""
        if self._own_threads:
            self._threads.start()
        try:
            await self._in_thread(self._buffer.open)
        except BaseException:
            if self._own_threads:
                self._threads.stop()
            raise
        if self._buffer.truncated:
            log.warn("event buffer: dropped a torn last line of {n} bytes", n=self._buffer.truncated)
        if self._buffer.pending:
            log.info("event buffer: {n} bytes of events to replay", n=self.buffered_bytes)
        self._started = True
        self._rearm()

    async def flush(self) -> None:
        """Store or buffer everything emitted so far (and replay, if a retry is due)."""
        await self._wait_idle()
        self._start_worker(everything=True)
        await self._wait_idle()

    async def stop(self) -> None:
        """Flush without replaying; what the database does not take stays in the buffer."""
        self._closing = True
        if not self._started:
            return
        await self.flush()
        self._started = False
        await self._in_thread(self._buffer.close)
        if self._own_threads:
            self._threads.stop()

    # -- scheduling ------------------------------------------------------------

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threads, f, *args)

    def _run_after(self, delay: float) -> None:
        if self._worker is not None:
            return  # the running worker takes the new events; _rearm follows it
        when = self._clock.seconds() + delay
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._start_worker)

    def _start_worker(self, everything: bool = False) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._worker is not None:
            return
        d = Deferred.fromCoroutine(self._work(everything))
        self._worker = d
        d.addErrback(lambda f: log.failure("event sink worker failed", f))
        d.addBoth(self._worker_done)

    def _worker_done(self, _: object) -> None:
        self._worker = None
        self._rearm()  # first: a waiter sees the next run already planned
        waiters, self._idle = self._idle, []
        for d in waiters:
            d.callback(None)

    def _rearm(self) -> None:
        if not self._started or self._closing:
            return
        now = self._clock.seconds()
        if self._queue:
            delay = 0.0 if len(self._queue) >= self._max_rows else self._interval
            self._run_after(max(delay, self._disk_retry_at - now))
        elif self._buffer.pending:
            self._run_after(max(0.0, self._retry_at - now))

    async def _wait_idle(self) -> None:
        if self._worker is not None:
            d: Deferred[None] = Deferred()
            self._idle.append(d)
            await d

    # -- the worker --------------------------------------------------------------

    def _take(self) -> list[Event]:
        batch = self._queue[: self._max_rows]
        del self._queue[: len(batch)]
        return batch

    async def _work(self, everything: bool = False) -> None:
        """
        Store (or buffer) what is queued.  Unless ``everything``, stop once
        less than a full batch is left: the rest waits for the interval, so a
        busy relay makes a few large transactions a second rather than one
        per write's duration (each costs every index's last pages again).
        """
        if not self._started:
            return
        while True:
            if self._buffer.pending:
                if not self._closing and self._clock.seconds() >= self._retry_at:
                    if await self._replay_next() and len(self._queue) < self._max_rows:
                        continue
                # The database is down, or enough waits in memory: join the buffer's end.
                if not self._queue or not await self._spill(uuid.uuid4().hex, self._take()):
                    return
                continue
            if not self._queue:
                return
            if not await self._write(self._take()):
                return
            if not everything and len(self._queue) < self._max_rows:
                return

    async def _write(self, batch: list[Event]) -> bool:
        """Store one batch, or buffer it; False when neither worked (it is back in the queue)."""
        batch_id = uuid.uuid4().hex
        try:
            await self._store(batch_id, batch)
        except Exception as e:
            self._database_down(e)
            return await self._spill(batch_id, batch)
        self.written += len(batch)
        if self._outage:
            self._outage = False
            log.info("events: the database is back")
        self._notify(batch)
        await self._maybe_prune()
        return True

    async def _spill(self, batch_id: str, batch: list[Event]) -> bool:
        try:
            await self._in_thread(self._buffer.append, encode_batch(batch_id, batch))
        except Exception:
            log.failure(
                "cannot write the event buffer in {dir}; keeping {n} event(s) in memory",
                dir=self._buffer.directory,
                n=len(batch),
            )
            self._queue[:0] = batch
            self._disk_retry_at = self._clock.seconds() + self._retry_interval
            return False
        self.spilled += len(batch)
        return True

    def _database_down(self, error: BaseException) -> None:
        self._retry_at = self._clock.seconds() + self._retry_interval
        if not self._outage:
            self._outage = True
            log.warn(
                "events: the database is unavailable ({error}); buffering in {dir}",
                error=repr(error),
                dir=self._buffer.directory,
            )

    async def _replay_next(self) -> bool:
        """Store the oldest buffered batch; False when the database (or the disk) failed."""
        try:
            found = await self._in_thread(self._buffer.read_next)
            if found is None:  # cannot happen after open() dropped a torn line; resynchronise
                await self._in_thread(self._buffer.advance, self._buffer.size)
                return True
            line, end = found
            try:
                data = json.loads(line)
                batch_id = str(data["batch"])
                events = [Event.from_json(item) for item in data["events"]]
            except (ValueError, KeyError, TypeError):
                log.error(
                    "event buffer: unreadable line at offset {at}, moved to rejected.jsonl", at=self._buffer.offset
                )
                await self._in_thread(self._buffer.reject, line)
                self.rejected += 1
                await self._in_thread(self._buffer.advance, end)
                return True
        except Exception:
            log.failure("cannot read the event buffer in {dir}", dir=self._buffer.directory)
            self._retry_at = self._clock.seconds() + self._retry_interval
            return False
        try:
            result = await self._store(batch_id, events, check_split=True)
        except Exception as e:
            if not await self._database_answers():
                self._database_down(e)
                return False
            log.failure("events: the database refused a batch of {n}; storing it event by event", n=len(events))
            result = "split"
        if result == "split" and not await self._store_singly(batch_id, events):
            return False
        try:
            await self._in_thread(self._buffer.advance, end)
        except Exception:
            log.failure("cannot record the event buffer's replay position")
            self._retry_at = self._clock.seconds() + self._retry_interval
            return False
        if result == "duplicate":
            self.duplicates += len(events)
        elif result == "stored":
            self.replayed += len(events)
        self._notify(events)
        if not self._buffer.pending and self._outage:
            self._outage = False
            log.info("events: buffer replayed; writing to the database again")
        return True

    async def _store_singly(self, batch_id: str, events: list[Event]) -> bool:
        """Store a refused batch event by event; the ones still refused go to rejected.jsonl."""
        try:
            await self._pool.execute("events_split", _MARK, (f"{batch_id}/split", self._clock.seconds()))
            for index, event in enumerate(events):
                try:
                    result = await self._store(f"{batch_id}/{index}", [event])
                except Exception:
                    if not await self._database_answers():
                        raise
                    log.failure("events: the database refused {event!r}; kept in rejected.jsonl", event=event)
                    await self._in_thread(self._buffer.reject, encode_batch(f"{batch_id}/{index}", [event]))
                    self.rejected += 1
                    continue
                if result == "stored":
                    self.replayed += 1
                else:
                    self.duplicates += 1
        except Exception as e:
            self._database_down(e)
            return False
        return True

    async def _database_answers(self) -> bool:
        d = self._pool.execute("events_ping", "SELECT 1")
        d.addTimeout(self._write_timeout, self._clock)
        try:
            await d
        except Exception:
            return False
        return True

    async def _store(self, batch_id: str, events: list[Event], check_split: bool = False) -> str:
        """One transaction: the batch mark, the events and the roll-ups; "stored", "duplicate" or "split"."""
        now = self._clock.seconds()
        rows = [event_row(e) for e in events]

        async def txn_fn(txn: Transaction) -> str:
            lock = txn.engine.xact_lock
            if lock:
                # Event ids are read in order by cursors (webhooks: "id > last acknowledged").
                # PostgreSQL hands out ids when rows are inserted, not when they commit: without
                # this lock a batch from another process could commit a higher id first, a
                # cursor would move past it, and the lower id, committed a moment later, would
                # never be sent.  Batches are short (one multi-row insert), so waiting is brief.
                await txn.execute(lock, (_EVENTS_ORDER_LOCK,))
            if check_split:
                split = await txn.execute("SELECT 1 FROM event_batches WHERE id = ?", (f"{batch_id}/split",))
                if split:
                    return "split"
            if not await txn.update(_MARK, (batch_id, now)):
                return "duplicate"
            parents = await self._lookup_parents(txn, {e.account_id for e in events})
            await insert_rows(txn, _INSERT_EVENTS, rows)
            counts = increments(events, parents)
            # Sorted keys: concurrent nodes lock the same rows in the same order, so never deadlock.
            await insert_rows(txn, _INSERT_COUNTS, [(*key, n) for key, n in sorted(counts.items())], _ADD_COUNTS)
            return "stored"

        d = self._pool.interaction("events_store", txn_fn)
        d.addTimeout(self._write_timeout, self._clock)
        return await d

    async def _lookup_parents(self, txn: Transaction, account_ids: set[int]) -> dict[int, int | None]:
        # A sub-account never changes parent, so what was read once stays true.
        missing = sorted(a for a in account_ids if a not in self._parents)
        if missing:
            marks = ", ".join("?" * len(missing))
            rows = await txn.execute(f"SELECT id, parent_id FROM accounts WHERE id IN ({marks})", missing)
            for account_id, parent_id in rows:
                self._parents[int(account_id)] = None if parent_id is None else int(parent_id)
        return {a: self._parents.get(a) for a in account_ids}

    def _notify(self, events: Iterable[Event]) -> None:
        subscribers = list(self._subscribers)
        if not subscribers:
            return
        for event in events:
            for subscriber in subscribers:
                try:
                    result = subscriber(event)
                    if inspect.isawaitable(result):
                        ensureDeferred(_awaited(result)).addErrback(_subscriber_failed, subscriber)
                except Exception:
                    log.failure("event subscriber {s!r} failed", s=subscriber)

    async def _maybe_prune(self) -> None:
        """Forget batch ids older than ``batch_retention``: no buffer holds them any more."""
        now = self._clock.seconds()
        if now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            await self._pool.execute(
                "events_prune", "DELETE FROM event_batches WHERE ts < ?", (now - self._batch_retention,)
            )
        except Exception:
            log.failure("events: cannot prune event_batches")


async def _awaited(result: Awaitable[Any]) -> Any:
    return await result


def _subscriber_failed(failure: Failure, subscriber: Subscriber) -> None:
    log.failure("event subscriber {s!r} failed", failure, s=subscriber)
