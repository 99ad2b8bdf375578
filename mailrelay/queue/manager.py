"""
The queue manager: which recipient of which spooled message is tried when,
where, and what becomes of the result.  Postfix's qmgr is the model
(``SCHEDULER_README``); the differences are in ``docs/queue.md``.

**Feeding.**  At start the manager loads the live messages the spool
recovered, a slice at a time (``slice_size`` per reactor turn, so ten
thousand messages never stall the reactor); afterwards the SMTP accept path
calls ``add(queue_id)`` after each commit.  Every known message is an
``_Entry`` in memory (a few hundred bytes; the spool already keeps the
envelope and states), waiting in a heap ordered by when it is due.

**Active window.**  At most ``active_window`` messages are *active* at a
time: admitted from the heap, their due recipients looked up (suppression),
grouped by destination and handed to the destinations' job queues.  A
message leaves the active window when every job of its pass has finished;
it then goes back to the heap at its earliest next attempt, or disappears
once the spool says it is finished.  Bodies are read only when a job starts
and are kept in a small LRU (``body_cache_bytes``), so memory is bounded by
what is being delivered, not by what is queued.

**Destinations.**  Jobs wait per destination (the recipient domain, or the
one smarthost).  The dispatcher goes round-robin over destinations with
work and starts jobs while the destination's window
(``mailrelay.queue.destinations``: slow start, shrink on connection
failures, dead timer) and the global ``max_concurrency`` allow.  When a
destination dies, its waiting jobs are deferred at once ("delivery
temporarily suspended") so they leave the active window instead of
clogging it.

**Outcomes.**  Each result is recorded durably with ``spool.record``
*before* any event is emitted, so after a crash a recipient that an event
calls delivered is never delivered again.  Delivery is at-least-once: a
recipient whose delivery was under way when the process died (the remote
accepted, the record had not reached the disk) is tried again.  Permanent
failures of one pass are collected and, at the end of the pass, the DSN is
committed to the spool first and the bounces recorded after it: a crash in
between sends the recipient through one more (failing) attempt rather than
losing the notice.  Deferrals are retried with ``retry_delay`` (exponential,
jittered, clamped) until ``max_age``, then bounced with a DSN.

**Routes.**  ``deliver``: the above.  ``sandbox``: nothing leaves; every
recipient is recorded final with a ``sandboxed`` event.  ``inbound`` (mail
for the relay's VERP addresses): the raw message goes to the feedback
handler, then it is final; nothing is delivered.
"""

from __future__ import annotations

import heapq
import inspect
import random
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailrelay.delivery.classify import classify
from mailrelay.delivery.client import results_for_error
from mailrelay.delivery.model import (
    DeliveryResult,
    DeliveryStatus,
    DestinationError,
    OutboundMessage,
)
from mailrelay.delivery.model import Destination as DeliveryDestination
from mailrelay.events.model import Event, EventType
from mailrelay.interfaces import IEventSink, ISpoolWriter
from mailrelay.queue.backoff import expired, next_attempt_time, retry_delay
from mailrelay.queue.destinations import Destination, is_connection_failure
from mailrelay.queue.dsn import Action, DSNRecipient, build_dsn, status_of
from mailrelay.queue.records import RecipientRecords
from mailrelay.queue.render import Directory, Prepared, Renderer, message_id_for
from mailrelay.spool.model import RecipientState, SpooledMessage, Status, UnknownMessage
from mailrelay.types import Reply, address_domain

log = Logger()

#: How long a hard-bounced address stays suppressed (the account can lift it earlier).
HARD_BOUNCE_SUPPRESSION_DAYS = 180
#: Replies the relay writes itself.
SUSPENDED = "4.4.1"
SANDBOX_REPLY = "250 2.0.0 sandbox: accepted, not delivered"
FEEDBACK_REPLY = "250 2.0.0 handed to the feedback handler"
_REPLY = re.compile(r"(4\d\d)(?: (\d\.\d{1,3}\.\d{1,3}))?\b")


class QueueSpool(Protocol):
    """What the manager uses of ``mailrelay.spool.Spool`` (a test's fake provides the same)."""

    spill_threshold: int

    def get(self, queue_id: str) -> SpooledMessage | None: ...

    def messages(self) -> list[SpooledMessage]: ...

    def record(self, queue_id: str, outcomes: Mapping[str, RecipientState]) -> Deferred[None]: ...

    def hold(self, queue_id: str) -> Deferred[None]: ...

    def release(self, queue_id: str) -> Deferred[None]: ...

    def delete(self, queue_id: str) -> Deferred[None]: ...

    def read_message(self, queue_id: str) -> Deferred[bytes]: ...

    def open_body(self, queue_id: str) -> Any: ...

    def open_message(self, envelope: Mapping[str, Any], recipients: Sequence[str]) -> ISpoolWriter: ...


class Resolver(Protocol):
    def resolve(self, domain: str) -> Deferred[DeliveryDestination]: ...


class Client(Protocol):
    def deliver(self, destination: DeliveryDestination, message: OutboundMessage) -> Deferred[list[DeliveryResult]]: ...


#: ``handler(queue_id, envelope, message_bytes)``; may return a Deferred or a coroutine.
FeedbackHandler = Callable[[str, Mapping[str, Any], bytes], Any]


@attrs.frozen
class QueueSettings:
    """The manager's knobs (from ``[delivery]``, plus constants with reasons in ``docs/queue.md``)."""

    hostname: str
    bounce_domain: str
    retry_min: float = 300.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    concurrency_per_destination: int = 20
    active_window: int = 10000
    delay_notice_after: float | None = None
    smarthost: str | None = None
    max_concurrency: int = 200
    dead_time: float | None = None  # default: retry_min
    slice_size: int = 200
    body_cache_bytes: int = 64 * 1024 * 1024
    suppression_days: float = HARD_BOUNCE_SUPPRESSION_DAYS
    shutdown_grace: float = 10.0


@attrs.define(eq=False)
class _Bounce:
    result: DeliveryResult
    attempts: int
    expired: bool = False


@attrs.define(eq=False)
class _Entry:
    """The manager's view of one live message."""

    queue_id: str
    created: float
    due: float = 0.0
    state: str = "waiting"  # waiting | active | held
    seq: int = 0
    force: bool = False
    jobs_left: int = 0
    notified: bool = False
    prepared: Prepared | None = None
    bounces: dict[str, _Bounce] = attrs.field(factory=dict)
    last: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # recipient -> last result details


@attrs.define(eq=False)
class _Job:
    entry: _Entry
    key: str
    domain: str
    recipients: list[str]


class _BodyCache:
    """
    Message bodies by queue id, least recently used first out, within a byte
    budget; a body in use (``acquire``d) is never evicted.  Loads are shared:
    concurrent jobs of one message read the spool once.
    """

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._users: dict[str, int] = {}
        self._loading: dict[str, list[Deferred[bytes]]] = {}

    async def acquire(self, queue_id: str, load: Callable[[], Deferred[bytes]]) -> bytes:
        self._users[queue_id] = self._users.get(queue_id, 0) + 1
        try:
            body = self._bodies.get(queue_id)
            if body is not None:
                self._bodies.move_to_end(queue_id)
                return body
            waiters = self._loading.get(queue_id)
            if waiters is not None:
                d: Deferred[bytes] = Deferred()
                waiters.append(d)
                return await d
            self._loading[queue_id] = []
            try:
                body = await load()
            except BaseException as e:
                for w in self._loading.pop(queue_id, []):
                    w.errback(e)
                raise
            self._bodies[queue_id] = body
            self._size += len(body)
            for w in self._loading.pop(queue_id, []):
                w.callback(body)
            return body
        except BaseException:
            self.release(queue_id)
            raise

    def release(self, queue_id: str) -> None:
        n = self._users.get(queue_id, 0) - 1
        if n > 0:
            self._users[queue_id] = n
        else:
            self._users.pop(queue_id, None)
        self._evict()

    def forget(self, queue_id: str) -> None:
        if queue_id not in self._users and queue_id in self._bodies:
            self._size -= len(self._bodies.pop(queue_id))

    def _evict(self) -> None:
        if self._size <= self._budget:
            return
        for qid in list(self._bodies):
            if self._size <= self._budget:
                break
            if qid not in self._users:
                self._size -= len(self._bodies.pop(qid))

    @property
    def size(self) -> int:
        return self._size


class QueueManager:
    """
    Schedules delivery of everything in the spool.  ``start()`` loads what
    the spool recovered; ``add(queue_id)`` takes new mail; ``stop()`` lets
    deliveries under way finish (up to ``shutdown_grace`` seconds).

    Dependencies come in through the constructor: ``clock`` (all timers),
    ``spool``, ``resolver`` (``MXResolver`` or ``SmarthostResolver``),
    ``client`` (``DeliveryClient``), ``renderer``, ``directory`` (accounts,
    suppressions), ``events`` (an ``IEventSink``), ``feedback`` (the
    inbound route's handler), ``rng`` (jitter), ``records`` (the optional
    ``recipients`` table writer).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        spool: QueueSpool,
        resolver: Resolver,
        client: Client,
        renderer: Renderer,
        directory: Directory,
        events: IEventSink,
        settings: QueueSettings,
        feedback: FeedbackHandler | None = None,
        rng: random.Random | None = None,
        records: RecipientRecords | None = None,
    ) -> None:
        self.clock = clock
        self.spool = spool
        self.resolver = resolver
        self.client = client
        self.renderer = renderer
        self.directory = directory
        self.events = events
        self.settings = settings
        self.feedback = feedback
        self.rng = rng or random.Random()
        self.records = records
        # Told (destination, +1 / -1) when a delivery to a destination starts and ends: metrics.
        self.activity: Callable[[str, int], None] | None = None
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._active = 0
        self._running = 0
        self._destinations: dict[str, Destination] = {}
        self._ready: deque[str] = deque()
        self._ready_set: set[str] = set()
        self._bodies = _BodyCache(settings.body_cache_bytes)
        self._kick_call: IDelayedCall | None = None
        self._wakeup: IDelayedCall | None = None
        self._wakeup_at: float | None = None
        self._tasks: set[Deferred[Any]] = set()
        self._started = False
        self._stopping = False
        self._loading = 0
        self.counters: dict[str, int] = {
            "delivered": 0,
            "deferred": 0,
            "bounced": 0,
            "suppressed": 0,
            "sandboxed": 0,
            "inbound": 0,
            "notices": 0,
        }

    # -- public: feeding -------------------------------------------------------

    @property
    def message_count(self) -> int:
        """Live messages the queue knows (O(1): for the SMTP layer's backpressure)."""
        return len(self._entries)

    @property
    def active_count(self) -> int:
        return self._active

    @property
    def running(self) -> int:
        """Deliveries in progress."""
        return self._running

    def start(self, messages: Iterable[SpooledMessage] | None = None) -> Deferred[None]:
        """
        Begin scheduling ``messages`` (default: every live message in the
        spool).  Fires once they are all *known* (loaded in slices), not
        delivered; mail keeps flowing meanwhile.
        """
        self._started = True
        found = list(messages) if messages is not None else self.spool.messages()
        return ensureDeferred(self._load(found))

    async def _load(self, messages: list[SpooledMessage]) -> None:
        self._loading += 1
        try:
            now = self.clock.seconds()
            step = max(1, self.settings.slice_size)
            for i in range(0, len(messages), step):
                for m in messages[i : i + step]:
                    if m.queue_id not in self._entries:
                        entry = self._new_entry(m)
                        delay_after = self.settings.delay_notice_after
                        # Assume a notice went out before the restart rather than risk sending two.
                        entry.notified = delay_after is not None and now - m.created >= delay_after
                        self._place(entry, m)
                self._kick()
                if i + step < len(messages):
                    await self._yield()
        finally:
            self._loading -= 1
        log.info("queue: {n} message(s) scheduled", n=len(messages))

    def add(self, queue_id: str) -> None:
        """A message was committed (``Submission.on_queued``): schedule it now."""
        if self._stopping or queue_id in self._entries:
            return
        message = self.spool.get(queue_id)
        if message is None:
            return
        entry = self._new_entry(message)
        self._place(entry, message)
        self._emit_queued(message)
        self._kick()

    def _new_entry(self, message: SpooledMessage) -> _Entry:
        entry = _Entry(message.queue_id, message.created)
        self._entries[message.queue_id] = entry
        return entry

    def _place(self, entry: _Entry, message: SpooledMessage) -> None:
        """Put an entry back where it belongs: held, or waiting until its earliest due recipient."""
        if message.held:
            entry.state = "held"
            return
        now = self.clock.seconds()
        dues = [s.next_attempt if s.next_attempt is not None else now for s in message.states if not s.is_final]
        self._push(entry, now if entry.force or not dues else min(dues))

    # -- the scheduling loop ---------------------------------------------------

    def _yield(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.clock.callLater(0, d.callback, None)
        return d

    def _kick(self) -> None:
        """Run the loop soon (coalesced: many events in one turn cost one run)."""
        if self._kick_call is None and self._started and not self._stopping:
            self._kick_call = self.clock.callLater(0, self._run)

    def _run(self) -> None:
        self._kick_call = None
        if self._stopping:
            return
        budget = max(1, self.settings.slice_size)
        now = self.clock.seconds()
        # Admission: due messages into the active window.
        while self._heap and self._active < self.settings.active_window and budget > 0:
            due, seq, qid = self._heap[0]
            if due > now:
                break
            heapq.heappop(self._heap)
            entry = self._entries.get(qid)
            if entry is None or entry.state != "waiting" or entry.seq != seq:
                continue  # stale heap item
            entry.state = "active"
            self._active += 1
            budget -= 1
            self._spawn(self._pass(entry), f"pass of {qid}")
        # Dispatch: round-robin over destinations with work.
        rounds = len(self._ready)
        while rounds > 0 and self._running < self.settings.max_concurrency and budget > 0:
            rounds -= 1
            key = self._ready.popleft()
            dest = self._destinations.get(key)
            if dest is None or not dest.jobs:
                self._ready_set.discard(key)
                continue
            if dest.dead(now):
                self._suspend(dest)
                self._ready_set.discard(key)
                continue
            started = 0
            while dest.jobs and dest.can_start(now) and self._running < self.settings.max_concurrency and budget:
                job = dest.jobs.popleft()
                budget -= 1
                started += 1
                self._start_job(dest, job)
            if dest.jobs:
                self._ready.append(key)
            else:
                self._ready_set.discard(key)
        if budget <= 0:
            self._kick()
        self._schedule_wakeup()

    def _schedule_wakeup(self) -> None:
        """One timer for the earliest future event: a message coming due or a dead destination reviving."""
        now = self.clock.seconds()
        times = []
        while self._heap:
            due, seq, qid = self._heap[0]
            entry = self._entries.get(qid)
            if entry is None or entry.state != "waiting" or entry.seq != seq:
                heapq.heappop(self._heap)
                continue
            if self._active < self.settings.active_window:
                times.append(due)
            break
        for key in self._ready:
            dest = self._destinations.get(key)
            if dest is not None and dest.dead_until is not None:
                times.append(dest.dead_until)
        if not times or self._stopping:
            return
        at = max(now, min(times))
        if self._wakeup is not None and self._wakeup.active():
            if self._wakeup_at is not None and self._wakeup_at <= at:
                return
            self._wakeup.cancel()
        self._wakeup_at = at
        self._wakeup = self.clock.callLater(at - now, self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        self._wakeup_at = None
        self._run()

    def _spawn(self, coro: Any, what: str) -> None:
        d = ensureDeferred(coro)
        self._tasks.add(d)

        def done(result: object) -> None:
            self._tasks.discard(d)
            from twisted.python.failure import Failure

            if isinstance(result, Failure):
                log.failure("queue: {what} failed", result, what=what)

        d.addBoth(done)

    # -- one pass of one message -----------------------------------------------

    async def _pass(self, entry: _Entry) -> None:
        try:
            message = self.spool.get(entry.queue_id)
            if message is None:
                self._forget(entry)
                return
            if message.held:
                entry.state = "held"
                self._active -= 1
                self._kick()
                return
            now = self.clock.seconds()
            force, entry.force = entry.force, False
            due = [
                r
                for r, s in zip(message.recipients, message.states, strict=True)
                if not s.is_final and (force or s.next_attempt is None or s.next_attempt <= now + 0.001)
            ]
            route = message.envelope.get("route", "deliver")
            if due and route == "sandbox":
                await self._sandbox(message, due)
            elif due and route == "inbound":
                await self._inbound(entry, message, due)
            elif due:
                await self._plan(entry, message, due)
                if entry.jobs_left:
                    return  # the last job ends the pass
        except Exception:
            log.failure("queue: cannot schedule {qid}; trying again later", qid=entry.queue_id)
            self._end_pass(entry, retry_after=self.settings.retry_min)
            return
        await self._finish_pass(entry)

    async def _plan(self, entry: _Entry, message: SpooledMessage, due: list[str]) -> None:
        env = message.envelope
        account_id = env.get("account_id")
        if account_id is not None and not env.get("dsn"):
            controls = env.get("controls") or {}
            suppressed = await self.directory.suppressed(account_id, due, controls.get("mailing_list"))
            if suppressed:
                await self._suppress(entry, message, {r: suppressed[r] for r in due if r in suppressed})
                due = [r for r in due if r not in suppressed]
        if not due:
            return
        prepared = await self.renderer.prepare(message)
        entry.prepared = prepared
        groups: dict[str, list[str]] = {}
        for rcpt in due:
            groups.setdefault(self._key(rcpt), []).append(rcpt)
        jobs: list[_Job] = []
        for key, rcpts in groups.items():
            if prepared.varies_per_recipient:
                jobs.extend(_Job(entry, key, address_domain(r), [r]) for r in rcpts)
            else:
                by_domain: dict[str, list[str]] = {}
                for r in rcpts:
                    by_domain.setdefault(address_domain(r), []).append(r)
                jobs.extend(_Job(entry, key, domain, rs) for domain, rs in by_domain.items())
        entry.jobs_left = len(jobs)
        for job in jobs:
            dest = self._destination(job.key)
            dest.jobs.append(job)
            if job.key not in self._ready_set:
                self._ready_set.add(job.key)
                self._ready.append(job.key)
        self._kick()

    def _key(self, recipient: str) -> str:
        if self.settings.smarthost:
            return f"[{self.settings.smarthost}]"
        return address_domain(recipient)

    def _destination(self, key: str) -> Destination:
        dest = self._destinations.get(key)
        if dest is None:
            dest = Destination(
                key,
                self.settings.concurrency_per_destination,
                self.settings.dead_time if self.settings.dead_time is not None else self.settings.retry_min,
            )
            self._destinations[key] = dest
        return dest

    async def _finish_pass(self, entry: _Entry) -> None:
        message = self.spool.get(entry.queue_id)
        if message is not None and entry.bounces:
            await self._bounce(entry, message)
            message = self.spool.get(entry.queue_id)
        if message is not None:
            await self._maybe_delay_notice(entry, message)
        self._end_pass(entry)

    def _end_pass(self, entry: _Entry, retry_after: float | None = None) -> None:
        entry.prepared = None
        entry.bounces = {}
        entry.jobs_left = 0
        self._bodies.forget(entry.queue_id)
        if entry.state == "active":
            self._active -= 1
            entry.state = "ending"
        message = self.spool.get(entry.queue_id)
        now = self.clock.seconds()
        if message is None:
            self._forget(entry)
        elif message.held:
            entry.state = "held"
        elif retry_after is not None:
            self._push(entry, now + retry_after)
        else:
            self._place(entry, message)
            if entry.state == "waiting" and entry.due <= now and not entry.force:
                # Still due right after a pass means nothing could be recorded
                # (a failing spool): do not spin on it.
                self._push(entry, now + 1.0)
        self._kick()

    def _push(self, entry: _Entry, due: float) -> None:
        entry.state = "waiting"
        entry.due = due
        self._seq += 1
        entry.seq = self._seq
        heapq.heappush(self._heap, (due, entry.seq, entry.queue_id))

    def _forget(self, entry: _Entry) -> None:
        if entry.state == "active":
            self._active -= 1
        entry.state = "gone"
        self._entries.pop(entry.queue_id, None)
        self._bodies.forget(entry.queue_id)
        self._kick()

    # -- jobs ------------------------------------------------------------------

    def _start_job(self, dest: Destination, job: _Job) -> None:
        message = self.spool.get(job.entry.queue_id)
        if message is None or message.held:
            # Held or deleted while waiting for a slot: not tried; the pass just ends.
            self._job_done(job)
            return
        dest.active += 1
        self._running += 1
        if self.activity is not None:
            self.activity(dest.key, 1)
        self._spawn(self._run_job(dest, job), f"delivery of {job.entry.queue_id}")

    async def _run_job(self, dest: Destination, job: _Job) -> None:
        try:
            results = await self._attempt(job)
        finally:
            dest.active -= 1
            if self.activity is not None:
                self.activity(dest.key, -1)
            self._running -= 1
        now = self.clock.seconds()
        failures = [r for r in results if is_connection_failure(r)]
        if failures:
            if dest.failure(now, str(failures[0].reply)):
                log.warn(
                    "queue: destination {key} is dead until {until}: {reply}",
                    key=dest.key,
                    until=dest.dead_until,
                    reply=str(failures[0].reply),
                )
                self._suspend(dest)
        else:
            dest.success()
        try:
            await self._outcomes(job.entry, results)
        finally:
            self._job_done(job)
            if dest.idle and len(self._destinations) > 1000:
                self._destinations.pop(dest.key, None)

    def _job_done(self, job: _Job) -> None:
        entry = job.entry
        entry.jobs_left -= 1
        if entry.jobs_left <= 0 and entry.state == "active":
            if entry.bounces or (self.settings.delay_notice_after is not None and not entry.notified):
                self._spawn(self._finish_pass(entry), f"end of pass of {entry.queue_id}")
            else:
                self._end_pass(entry)  # no notice to send: the usual end of a pass needs no coroutine
        self._kick()

    def _suspend(self, dest: Destination) -> None:
        """A dead destination's waiting jobs are deferred now, not when it revives (Postfix does the same)."""
        jobs, dest.jobs = list(dest.jobs), deque()
        reply = Reply(451, SUSPENDED, f"delivery temporarily suspended: {dest.last_failure or 'destination is down'}")
        for job in jobs:
            results = [DeliveryResult(r, DeliveryStatus.DEFERRED, reply) for r in job.recipients]
            self._spawn(self._suspended(job, results, dest.dead_until), f"suspension of {job.entry.queue_id}")

    async def _suspended(self, job: _Job, results: list[DeliveryResult], until: float | None) -> None:
        try:
            await self._outcomes(job.entry, results, counted=False, not_before=until)
        finally:
            self._job_done(job)

    async def _attempt(self, job: _Job) -> list[DeliveryResult]:
        """Resolve, read, render and send one job; never raises."""
        entry, rcpts = job.entry, job.recipients
        prepared = entry.prepared
        if prepared is None:
            return results_for_error(rcpts, Reply(451, "4.3.0", "Internal error: message not prepared"))
        try:
            destination = await self.resolver.resolve(job.domain)
        except DestinationError as e:
            return results_for_error(rcpts, e.reply)
        except Exception as e:
            log.failure("queue: resolving {domain} failed", domain=job.domain)
            return results_for_error(rcpts, Reply(451, "4.4.3", f"Cannot resolve {job.domain}: {e}"))
        qid = entry.queue_id
        try:
            original = await self._bodies.acquire(qid, lambda: self._read_body(qid))
        except Exception as e:
            log.failure("queue: cannot read the body of {qid}", qid=qid)
            return results_for_error(rcpts, Reply(451, "4.3.0", f"Cannot read the queued message: {e}"))
        try:
            copies: dict[tuple[str, bytes], list[str]] = {}
            for rcpt in rcpts:
                copies.setdefault(self.renderer.render(prepared, original, rcpt), []).append(rcpt)
        except Exception as e:
            log.failure("queue: cannot render {qid}", qid=qid)
            return results_for_error(rcpts, Reply(451, "4.3.0", f"Internal error preparing the message: {e}"))
        finally:
            self._bodies.release(qid)
        results: list[DeliveryResult] = []
        # Byte-identical copies share a transaction; the client reuses connections for the rest.
        for (mail_from, data), group in copies.items():
            results.extend(await self.client.deliver(destination, OutboundMessage.from_bytes(mail_from, group, data)))
        return results

    def _read_body(self, queue_id: str) -> Deferred[bytes]:
        message = self.spool.get(queue_id)
        if message is None:
            raise UnknownMessage(queue_id)
        if message.size <= self.spool.spill_threshold:
            return self.spool.read_message(queue_id)
        return ensureDeferred(self._read_big(queue_id))

    async def _read_big(self, queue_id: str) -> bytes:
        reader = self.spool.open_body(queue_id)
        try:
            parts: list[bytes] = []
            offset = 0
            while True:
                chunk = await reader.read(offset, 1 << 20)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
                offset += len(chunk)
        finally:
            reader.close()

    # -- outcomes --------------------------------------------------------------

    def _policy(self, attempts: int) -> float:
        s = self.settings
        return retry_delay(attempts, s.retry_min, s.retry_max, jitter=self.rng.random)

    async def _outcomes(
        self,
        entry: _Entry,
        results: Sequence[DeliveryResult],
        counted: bool = True,
        not_before: float | None = None,
    ) -> None:
        """
        Record what ``results`` mean (delivered and deferred now; permanent
        failures at the end of the pass), then emit their events.
        """
        message = self.spool.get(entry.queue_id)
        if message is None:
            # Deleted meanwhile: nothing to record; the delivery still happened.
            for r in results:
                if r.status is DeliveryStatus.DELIVERED:
                    log.info(
                        "queue: {qid} to {rcpt} delivered after the message was deleted",
                        qid=entry.queue_id,
                        rcpt=r.recipient,
                    )
            return
        now = self.clock.seconds()
        s = self.settings
        outcomes: dict[str, RecipientState] = {}
        deferred: list[tuple[DeliveryResult, RecipientState]] = []
        delivered: list[tuple[DeliveryResult, RecipientState]] = []
        for r in results:
            if r.recipient not in message.recipients:
                continue
            before = message.state_of(r.recipient)
            if before.is_final:
                continue
            attempts = before.attempts + (1 if counted else 0)
            entry.last[r.recipient] = _result_detail(r, now)
            if r.status is DeliveryStatus.DELIVERED:
                state = RecipientState.delivered(str(r.reply), attempts)
                outcomes[r.recipient] = state
                delivered.append((r, state))
            elif r.status is DeliveryStatus.FAILED:
                entry.bounces[r.recipient] = _Bounce(r, attempts)
            elif expired(now, message.created, s.max_age):
                entry.bounces[r.recipient] = _Bounce(r, attempts, expired=True)
            else:
                at = next_attempt_time(now, self._policy(max(1, attempts)), message.created, s.max_age)
                if not_before is not None:
                    at = max(at, min(not_before, message.created + s.max_age))
                state = RecipientState.deferred(attempts, at, str(r.reply))
                outcomes[r.recipient] = state
                deferred.append((r, state))
        if outcomes and not await self._record(entry.queue_id, outcomes):
            return
        for r, state in delivered:
            self.counters["delivered"] += 1
            self._event(
                message,
                EventType.DELIVERED,
                r.recipient,
                {
                    "reply": str(r.reply),
                    "mx_host": r.mx_host,
                    "ip": r.ip,
                    "tls": r.tls,
                    "attempts": state.attempts,
                },
            )
            self._row(message, r.recipient, "delivered", state)
        for r, state in deferred:
            self.counters["deferred"] += 1
            c = classify(r.reply)
            self._event(
                message,
                EventType.DEFERRED,
                r.recipient,
                {
                    "reply": str(r.reply),
                    "mx_host": r.mx_host,
                    "ip": r.ip,
                    "tls": r.tls,
                    "attempts": state.attempts,
                    "next_attempt": state.next_attempt,
                    "class": c.category,
                    "rule": c.rule,
                },
            )
            self._row(message, r.recipient, "deferred", state)

    async def _record(self, queue_id: str, outcomes: Mapping[str, RecipientState]) -> bool:
        """``spool.record``; False when nothing may be reported (the spool failed)."""
        try:
            await self.spool.record(queue_id, outcomes)
        except UnknownMessage:
            return True  # deleted by an operator meanwhile: the outcome still happened
        except ValueError as e:
            log.warn("queue: {qid}: {error}", qid=queue_id, error=str(e))
            return False
        except Exception:
            log.failure("queue: cannot record outcomes of {qid}", qid=queue_id)
            return False
        return True

    async def _bounce(self, entry: _Entry, message: SpooledMessage) -> None:
        """Permanent failures of this pass: notice first (durable), then the records, then events."""
        bounces, entry.bounces = entry.bounces, {}
        now = self.clock.seconds()
        live = {r: b for r, b in bounces.items() if not message.state_of(r).is_final}
        if not live:
            return
        notice = []
        for rcpt, b in live.items():
            reply = b.result.reply
            status = status_of(reply.code, reply.status)
            if b.expired and not status.startswith("5"):
                status = status if status.startswith("4.") and status != "4.0.0" else "4.4.7"
            notice.append(DSNRecipient(rcpt, "failed", status, str(reply), b.result.mx_host, now))
        expired_any = any(b.expired for b in live.values())
        reason = None
        if expired_any:
            days = self.settings.max_age / 86400.0
            reason = f"The message was queued for {days:g} days without being delivered, so it was given up."
        await self._notice(message, "failed", notice, reason)
        outcomes = {r: RecipientState.bounced(str(b.result.reply), b.attempts) for r, b in live.items()}
        if not await self._record(message.queue_id, outcomes):
            return
        env = message.envelope
        account_id = env.get("account_id")
        for rcpt, b in live.items():
            c = classify(b.result.reply)
            # Giving up after days of temporary failures says nothing certain about the mailbox.
            category = "soft" if b.expired and c.category == "hard" else c.category
            self.counters["bounced"] += 1
            self._event(
                message,
                EventType.BOUNCED,
                rcpt,
                {
                    "class": category,
                    "rule": "expired" if b.expired else c.rule,
                    "reply": str(b.result.reply),
                    "mx_host": b.result.mx_host,
                    "ip": b.result.ip,
                    "attempts": b.attempts,
                    "expired": b.expired,
                },
            )
            self._row(message, rcpt, "bounced", outcomes[rcpt])
            if category == "hard" and account_id is not None and not env.get("dsn"):
                expires = now + self.settings.suppression_days * 86400.0
                self._spawn(
                    self._suppress_address(account_id, rcpt, str(b.result.reply), expires), f"suppression of {rcpt}"
                )

    async def _suppress_address(self, account_id: int, rcpt: str, detail: str, expires: float) -> None:
        await self.directory.suppress(account_id, rcpt, "hard_bounce", detail, expires)

    async def _suppress(self, entry: _Entry, message: SpooledMessage, found: Mapping[str, str]) -> None:
        """Suppressed recipients are not mailed: final at once, a ``suppressed`` event, no notice."""
        outcomes = {r: RecipientState.bounced(f"550 5.7.1 suppressed ({reason})", 0) for r, reason in found.items()}
        if not await self._record(message.queue_id, outcomes):
            return
        for rcpt, reason in found.items():
            self.counters["suppressed"] += 1
            self._event(message, EventType.SUPPRESSED, rcpt, {"reason": reason})
            self._row(message, rcpt, "suppressed", outcomes[rcpt])

    async def _sandbox(self, message: SpooledMessage, due: list[str]) -> None:
        outcomes = {r: RecipientState.delivered(SANDBOX_REPLY, 0) for r in due}
        if not await self._record(message.queue_id, outcomes):
            return
        for rcpt in due:
            self.counters["sandboxed"] += 1
            self._event(message, EventType.SANDBOXED, rcpt, {})
            self._row(message, rcpt, "sandboxed", outcomes[rcpt])

    async def _inbound(self, entry: _Entry, message: SpooledMessage, due: list[str]) -> None:
        qid = message.queue_id
        states = {r: message.state_of(r) for r in due}
        try:
            body = await self._bodies.acquire(qid, lambda: self._read_body(qid))
            try:
                if self.feedback is not None:
                    result = self.feedback(qid, message.envelope, body)
                    if isinstance(result, Deferred) or inspect.isawaitable(result):
                        await result
            finally:
                self._bodies.release(qid)
        except Exception as e:
            log.failure("queue: the feedback handler failed on {qid}", qid=qid)
            now = self.clock.seconds()
            reply = f"451 4.3.0 feedback handler failed: {e}"
            if expired(now, message.created, self.settings.max_age):
                outcomes = {r: RecipientState.bounced(reply, s.attempts + 1) for r, s in states.items()}
            else:
                outcomes = {
                    r: RecipientState.deferred(
                        s.attempts + 1,
                        next_attempt_time(now, self._policy(s.attempts + 1), message.created, self.settings.max_age),
                        reply,
                    )
                    for r, s in states.items()
                }
            await self._record(qid, outcomes)
            return
        self.counters["inbound"] += 1
        done = {r: RecipientState.delivered(FEEDBACK_REPLY, s.attempts + 1) for r, s in states.items()}
        await self._record(qid, done)

    # -- notices (DSNs) --------------------------------------------------------

    async def _notice_target(self, message: SpooledMessage) -> str | None:
        """
        Where a notice about ``message`` goes: the account's notification
        address when it has one (bounce notices to the IT staff), else the
        envelope sender.  None for the null sender, for notices themselves
        and for mail that was never meant for delivery.
        """
        env = message.envelope
        sender = str(env.get("mail_from") or "")
        if env.get("dsn") or not sender or env.get("route", "deliver") != "deliver":
            return None
        entry = self._entries.get(message.queue_id)
        if entry is not None and entry.prepared is not None:
            return entry.prepared.notification_address or sender
        account_id = env.get("account_id")
        if account_id is not None:
            try:
                account = await self.directory.account(account_id)
            except Exception:
                log.failure("queue: cannot look up account {id} for a notice", id=account_id)
                account = None
            if account is not None and account.notification_address:
                return account.notification_address
        return sender

    async def _notice(
        self, message: SpooledMessage, action: Action, recipients: list[DSNRecipient], reason: str | None = None
    ) -> str | None:
        """Commit a DSN about ``message`` to the spool and schedule it; returns its queue id."""
        target = await self._notice_target(message)
        if target is None:
            return None
        env = message.envelope
        account_id = env.get("account_id")
        try:
            original = await self._bodies.acquire(message.queue_id, lambda: self._read_body(message.queue_id))
            self._bodies.release(message.queue_id)
        except Exception:
            log.failure("queue: cannot read {qid} for its notice", qid=message.queue_id)
            original = b""
        s = self.settings
        daemon = f"MAILER-DAEMON@{s.bounce_domain}"
        now = self.clock.seconds()
        envelope: dict[str, Any] = {
            "v": 1,
            "route": "deliver",
            "dsn": True,
            "account_id": account_id,
            "account": env.get("account"),
            "mail_from": "",
            "from": daemon,
            "subject": None,
            "about": message.queue_id,
            "received_at": now,
            "controls": {},
            "roles": {},
        }
        try:
            writer = self.spool.open_message(envelope, [target])
            message_id = message_id_for(writer.queue_id, now, s.hostname)
            envelope["message_id"] = message_id
            data = build_dsn(
                reporting_mta=s.hostname,
                from_address=daemon,
                to_address=target,
                queue_id=message.queue_id,
                arrival=float(env.get("received_at") or message.created),
                now=now,
                message_id=message_id,
                recipients=[attrs.evolve(r, action=action) for r in recipients],
                original=original,
                reason=reason,
            )
            writer.write(data)
            qid: str = await writer.commit()
        except Exception:
            log.failure("queue: cannot queue the notice about {qid}", qid=message.queue_id)
            return None
        self.counters["notices"] += 1
        log.info("queue: {qid}: {action} notice {dsn} to {to}", qid=message.queue_id, action=action, dsn=qid, to=target)
        self.add(qid)
        return qid

    async def _maybe_delay_notice(self, entry: _Entry, message: SpooledMessage) -> None:
        after = self.settings.delay_notice_after
        if after is None or entry.notified:
            return
        now = self.clock.seconds()
        if now - message.created < after:
            return
        waiting = [
            (r, s) for r, s in zip(message.recipients, message.states, strict=True) if s.status is Status.DEFERRED
        ]
        if not waiting:
            return
        entry.notified = True
        until = message.created + self.settings.max_age
        recipients = []
        for rcpt, state in waiting:
            last = entry.last.get(rcpt, {})
            m = _REPLY.match(state.last_reply or "")
            status = status_of(int(m.group(1)), m.group(2) or "") if m else "4.0.0"
            recipients.append(
                DSNRecipient(
                    rcpt, "delayed", status, state.last_reply, last.get("mx_host"), now, will_retry_until=until
                )
            )
        await self._notice(message, "delayed", recipients)

    # -- events ----------------------------------------------------------------

    def _emit_queued(self, message: SpooledMessage) -> None:
        env = message.envelope
        if env.get("route", "deliver") != "deliver" or env.get("dsn") or env.get("account_id") is None:
            return
        queued = RecipientState()
        for rcpt in message.recipients:
            self._event(message, EventType.QUEUED, rcpt, {"size": message.size})
            # The recipient's row exists from acceptance on: a tracking pixel, a click or a one-click
            # unsubscribe right after delivery (prefetching proxies are fast) must find its recipient.
            self._row(message, rcpt, "queued", queued)

    def _event(self, message: SpooledMessage, kind: EventType, recipient: str, detail: dict[str, Any]) -> None:
        env = message.envelope
        account_id = env.get("account_id")
        if account_id is None or env.get("dsn"):
            return  # inbound mail and notices are not an account's sends
        controls = env.get("controls") or {}
        received_at = float(env.get("received_at") or message.created)
        event = Event(
            type=kind,
            ts=self.clock.seconds(),
            account_id=int(account_id),
            queue_id=message.queue_id,
            message_id=env.get("message_id") or message_id_for(message.queue_id, received_at, self.settings.hostname),
            transmission_id=message.queue_id,
            recipient=recipient,
            # Set at the end of DATA by the campaign attribution (mailrelay.policy.attribution).
            campaign_id=int(env["campaign_id"]) if env.get("campaign_id") is not None else None,
            tags=tuple(controls.get("tags") or ()),
            detail=detail,
        )
        try:
            self.events.emit(event)
        except Exception:
            log.failure("queue: the event sink refused an event")

    def _row(self, message: SpooledMessage, recipient: str, state: str, rs: RecipientState) -> None:
        if self.records is not None:
            self.records.put(
                message.queue_id, message.recipients.index(recipient), recipient, state, rs.attempts, rs.last_reply
            )

    # -- operator actions (the control socket) -----------------------------------

    def entry_state(self, queue_id: str) -> str | None:
        entry = self._entries.get(queue_id)
        return entry.state if entry is not None else None

    def destination_of(self, recipient: str) -> str:
        return self._key(recipient)

    def destination_state(self, key: str) -> dict[str, Any] | None:
        dest = self._destinations.get(key)
        return dest.to_json(self.clock.seconds()) if dest is not None else None

    def last_results(self, queue_id: str) -> dict[str, dict[str, Any]]:
        entry = self._entries.get(queue_id)
        return dict(entry.last) if entry is not None else {}

    def due_time(self, queue_id: str) -> float | None:
        entry = self._entries.get(queue_id)
        return entry.due if entry is not None and entry.state == "waiting" else None

    def retry(self, queue_id: str) -> bool:
        """Make a message due now (every pending recipient, whatever its backoff).  False if held or unknown."""
        entry = self._entries.get(queue_id)
        message = self.spool.get(queue_id)
        if entry is None or message is None or message.held:
            return False
        for key in {self._key(r) for r in message.pending_recipients}:
            dest = self._destinations.get(key)
            if dest is not None and dest.dead_until is not None:
                dest.revive()
        entry.force = True
        if entry.state == "waiting":
            entry.due = self.clock.seconds()
            self._seq += 1
            entry.seq = self._seq
            heapq.heappush(self._heap, (entry.due, entry.seq, entry.queue_id))
        self._kick()
        return True

    def revive(self, key: str) -> None:
        dest = self._destinations.get(key)
        if dest is not None:
            dest.revive()
            self._kick()

    async def hold(self, queue_id: str) -> None:
        await self.spool.hold(queue_id)
        entry = self._entries.get(queue_id)
        if entry is not None and entry.state == "waiting":
            entry.state = "held"
        self._kick()

    async def release(self, queue_id: str) -> None:
        await self.spool.release(queue_id)
        entry = self._entries.get(queue_id)
        message = self.spool.get(queue_id)
        if entry is not None and entry.state == "held" and message is not None:
            self._place(entry, message)
        self._kick()

    async def delete(self, queue_id: str, notify: bool = True) -> str | None:
        """
        Delete a message; with ``notify`` its sender gets a notice listing the
        recipients that were still pending.  Returns the notice's queue id.
        """
        message = self.spool.get(queue_id)
        if message is None:
            raise UnknownMessage(queue_id)
        notice = None
        pending = message.pending_recipients
        if notify and pending:
            now = self.clock.seconds()
            notice = await self._notice(
                message,
                "failed",
                [
                    DSNRecipient(r, "failed", "5.0.0", "Message deleted by the mail system administrator", None, now)
                    for r in pending
                ],
                "The message was deleted from the queue by the mail system administrator.",
            )
        await self.spool.delete(queue_id)
        for rcpt in pending:
            self._event(
                message,
                EventType.BOUNCED,
                rcpt,
                {
                    "class": "soft",
                    "rule": "deleted-by-admin",
                    "reply": "550 5.0.0 deleted by the administrator",
                },
            )
        entry = self._entries.get(queue_id)
        if entry is not None and entry.state != "active":
            self._forget(entry)
        return notice

    # -- stopping ---------------------------------------------------------------

    async def stop(self) -> None:
        """Stop scheduling; wait up to ``shutdown_grace`` for deliveries under way (their outcomes matter)."""
        self._stopping = True
        for call in (self._kick_call, self._wakeup):
            if call is not None and call.active():
                call.cancel()
        self._kick_call = self._wakeup = None
        if not self._tasks:
            return
        # Wait without cancelling: a delivery cut off half-way would be tried again after the restart.
        done: Deferred[None] = Deferred()

        def fire(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        DeferredList(list(self._tasks), consumeErrors=True).addBoth(fire)
        timeout = self.clock.callLater(self.settings.shutdown_grace, fire)
        await done
        if timeout.active():
            timeout.cancel()
        if self._tasks:
            log.warn("queue: {n} delivery task(s) still running at shutdown", n=len(self._tasks))


def _result_detail(result: DeliveryResult, now: float) -> dict[str, Any]:
    return {
        "status": result.status.value,
        "reply": str(result.reply),
        "mx_host": result.mx_host,
        "ip": result.ip,
        "tls": result.tls,
        "at": now,
    }
