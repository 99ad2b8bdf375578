"""
Webhooks: events POSTed to each account's endpoints, signed, in batches,
retried with exponential backoff for up to a day.

The dispatcher subscribes to the event sink.  Each endpoint has one FIFO
queue and at most one POST in flight; a batch that fails is retried as the
same batch (same events, same ``X-Mailrelay-Delivery`` id, a fresh
signature) before anything behind it is sent.  That is what makes delivery
*at least once* and *in order per message*: nothing overtakes a batch that
has not been acknowledged with a 2xx.  Receivers deduplicate on each
event's ``id`` (stable across retries) or on the delivery id.

The signature (``X-Mailrelay-Signature: t=<unix time>,v1=<hex>``) is an
HMAC-SHA256 with the endpoint's secret over ``"<t>.<body>"``, the scheme
Stripe made familiar: signing the time with the body lets receivers refuse
old requests (replays) by looking at ``t`` alone.

When an endpoint has failed for ``retry_for`` seconds (24 h) without one
success, it is marked *failing* in storage, its backlog is dropped, and it
receives nothing until the account re-enables it through the API: a dead
endpoint must not hold a day of events in every node's memory forever.

Durability.  With a source that can read the events table
(``DurableWebhookSource``: ``mailrelay.storage.webhooks.Webhooks`` is one),
the dispatcher keeps nothing but a batch in flight in memory.  The sink
stores every event before its subscribers see it, so an event reaching
``receive`` only says "this account has new events": each endpoint reads
what follows its cursor (``delivered_through``, the id of the last event it
acknowledged) from the table, sends it, and moves the cursor on a 2xx.  A
restart resumes from the cursors (``start()``), so what was not
acknowledged is sent again: at least once, in order of event id, which is
the order in which each message's events were stored.  A lease per endpoint
(renewed before each attempt) lets one node of several sharing the
database deliver to it; when a node dies, another takes over once its
lease runs out.

Without such a source (the unit tests' fakes) the queue lives in memory:
events accepted by the sink on this node are delivered by this node, and a
restart loses what was waiting.  Every attempt is recorded in
``webhook_attempts``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import random
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from mailrelay.events.model import Event
from mailrelay.events.queries import stored_from_row
from mailrelay.metrics import Metrics
from mailrelay.storage.webhooks import Webhook

log = Logger()

SIGNATURE_HEADER = "X-Mailrelay-Signature"
DELIVERY_HEADER = "X-Mailrelay-Delivery"
WEBHOOK_HEADER = "X-Mailrelay-Webhook"
USER_AGENT = "mailrelay-webhooks/1"
#: What receivers should accept as the age of ``t`` (documented; the relay signs at each attempt).
RECOMMENDED_TOLERANCE = 300


class HTTPClient(Protocol):
    """The part of treq the dispatcher uses (``treq`` itself, ``treq.testing.StubTreq``, or a fake)."""

    def post(self, url: str, data: bytes, headers: Mapping[str, Sequence[str]], **kwargs: Any) -> Deferred[Any]: ...

    def content(self, response: Any) -> Deferred[bytes]: ...


class AgentClient:
    """
    ``HTTPClient`` over a plain ``twisted.web.client.Agent`` (what the
    wiring passes: no treq needed at run time).  An Agent never follows
    redirects, which is what webhooks want: a redirect is a failure, not
    an invitation to POST the events somewhere else.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def post(self, url: str, data: bytes, headers: Mapping[str, Sequence[str]], **kwargs: Any) -> Deferred[Any]:
        raw = Headers({k.encode("ascii"): [v.encode("utf-8") for v in vs] for k, vs in headers.items()})
        return self._agent.request(b"POST", url.encode("utf-8"), raw, FileBodyProducer(io.BytesIO(data)))

    def content(self, response: Any) -> Deferred[bytes]:
        return readBody(response)


class WebhookSource(Protocol):
    """What the dispatcher needs from storage (``mailrelay.storage.webhooks.Webhooks``)."""

    async def list(self, account_id: int) -> list[Webhook]: ...

    async def set_failing(self, webhook_id: int, failing: bool) -> None: ...

    async def record_attempt(
        self, webhook_id: int, ts: float, status: int | None, error: str | None, events: int
    ) -> None: ...


class DurableWebhookSource(WebhookSource, Protocol):
    """A source that also reads the events table and keeps each endpoint's cursor and lease."""

    async def active(self) -> list[Webhook]: ...

    async def events_after(
        self, account_id: int, after_id: int, event_types: frozenset[str], limit: int
    ) -> list[Any]: ...

    async def claim(self, webhook_id: int, owner: str, until: float) -> int | None: ...

    async def release(self, webhook_id: int, owner: str) -> None: ...

    async def advance(self, webhook_id: int, event_id: int) -> None: ...


def is_durable(source: WebhookSource) -> bool:
    """Whether ``source`` can back durable delivery (see the module's docstring)."""
    return all(callable(getattr(source, name, None)) for name in ("active", "events_after", "claim", "advance"))


def stored_event(row: Sequence[Any]) -> tuple[int, Event]:
    """An ``events_after`` row (``EVENT_ROW_COLUMNS``) as its id and its event."""
    stored = stored_from_row(tuple(row))
    return stored.id, stored.event


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Mailrelay-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance: float = RECOMMENDED_TOLERANCE
) -> bool:
    """
    What a receiver does (and what the documentation shows): parse ``t``
    and every ``v1``, refuse a ``t`` further than ``tolerance`` seconds
    from ``now``, compare in constant time.
    """
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


def event_id(event: Event) -> str:
    """
    A stable id for an event: a digest of its canonical JSON, so a retry
    carries the same id and receivers can deduplicate without the relay
    storing anything per event.
    """
    canonical = json.dumps(event.to_json(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def retry_delay(
    attempt: int, *, base: float = 30.0, cap: float = 3600.0, jitter: Callable[[], float] = random.random
) -> float:
    """
    Seconds to wait after failed attempt number ``attempt`` (1-based):
    ``base * 2**(attempt-1)`` capped at ``cap``, then scaled into
    ``[0.5, 1.0]`` of that by ``jitter`` (in ``[0, 1)``), so endpoints that
    failed together do not all come back at the same second.
    """
    delay = min(cap, base * (2.0 ** min(max(attempt - 1, 0), 30)))
    return delay * (0.5 + 0.5 * jitter())


@attrs.define(eq=False)
class _Endpoint:
    """The delivery state of one webhook on this node."""

    webhook: Webhook
    queue: deque[dict[str, Any]] = attrs.Factory(deque)
    batch: list[dict[str, Any]] | None = None
    delivery_id: str = ""
    attempts: int = 0
    first_failure: float | None = None
    timer: IDelayedCall | None = None
    sending: bool = False
    # Durable mode: the id of the last event acknowledged, of the last in ``batch``; whether more may follow.
    cursor: int = 0
    batch_last: int = 0
    more: bool = False


class WebhookDispatcher:
    """
    Subscribe ``receive`` to the event sink; call ``invalidate(account_id)``
    after an account's webhooks change (the API does), and ``stop()`` at
    shutdown.
    """

    def __init__(
        self,
        webhooks: WebhookSource,
        http: HTTPClient,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        *,
        batch_interval: float = 1.0,
        max_batch: int = 100,
        timeout: float = 10.0,
        retry_for: float = 86400.0,
        retry_base: float = 30.0,
        retry_cap: float = 3600.0,
        max_backlog: int = 10000,
        cache_seconds: float = 30.0,
        jitter: Callable[[], float] = random.random,
        lease_seconds: float = 120.0,
        durable: bool | None = None,
    ) -> None:
        self._webhooks = webhooks
        self._http = http
        self._clock = clock
        self._metrics = metrics
        self.batch_interval = batch_interval
        self.max_batch = max_batch
        self.timeout = timeout
        self.retry_for = retry_for
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.max_backlog = max_backlog
        self.cache_seconds = cache_seconds
        self._jitter = jitter
        self.lease_seconds = lease_seconds
        #: Durable delivery from the events table (the default when ``webhooks`` supports it).
        self.durable = is_durable(webhooks) if durable is None else durable
        self.node = uuid.uuid4().hex
        self._started = False
        self._running: set[Deferred[None]] = set()
        self._cache: dict[int, tuple[float, list[Webhook]]] = {}
        self._loading: dict[int, list[Event]] = {}
        self._endpoints: dict[int, _Endpoint] = {}
        self._load_timers: dict[int, IDelayedCall] = {}
        self._stopped = False

    # -- intake --------------------------------------------------------------

    def receive(self, events: Event | Sequence[Event]) -> None:
        """Take one event or a batch from the sink; never blocks, never raises."""
        batch = [events] if isinstance(events, Event) else list(events)
        for event in batch:
            try:
                self._receive(event)
            except Exception:
                log.failure("webhook dispatch of an event failed")

    __call__ = receive

    def _receive(self, event: Event) -> None:
        if self._stopped:
            return
        account = event.account_id
        if account in self._loading:
            self._loading[account].append(event)
            return
        cached = self._cache.get(account)
        if cached is None or cached[0] <= self._clock.seconds():
            self._loading[account] = [event]
            self._load(account)
            return
        self._route(event, cached[1])

    def invalidate(self, account_id: int) -> None:
        """Forget the cached webhooks of ``account_id``: the next event reloads them."""
        self._cache.pop(account_id, None)

    def _load(self, account_id: int) -> None:
        ensureDeferred(self._load_account(account_id))

    async def _load_account(self, account_id: int) -> None:
        self._load_timers.pop(account_id, None)
        try:
            hooks = await self._webhooks.list(account_id)
        except Exception:
            log.failure("cannot read the webhooks of account {account}; retrying", account=account_id)
            if not self._stopped:
                self._load_timers[account_id] = self._clock.callLater(5.0, self._load, account_id)
            return
        self._cache[account_id] = (self._clock.seconds() + self.cache_seconds, hooks)
        self._refresh_endpoints(account_id, hooks)
        pending = self._loading.pop(account_id, [])
        for event in pending:
            self._route(event, hooks)

    def _refresh_endpoints(self, account_id: int, hooks: list[Webhook]) -> None:
        """Take changed URLs, secrets and re-enabled endpoints into account; forget deleted ones."""
        current = {h.id: h for h in hooks}
        for webhook_id, endpoint in list(self._endpoints.items()):
            if endpoint.webhook.account_id != account_id:
                continue
            fresh = current.get(webhook_id)
            if fresh is None:
                self._drop_endpoint(webhook_id, "deleted")
            else:
                endpoint.webhook = fresh

    def _route(self, event: Event, hooks: list[Webhook]) -> None:
        if self.durable:
            self._wake(event, hooks)
            return
        data: dict[str, Any] | None = None
        for hook in hooks:
            if hook.failing or not hook.wants(event.type.value):
                continue
            endpoint = self._endpoints.get(hook.id)
            if endpoint is None:
                endpoint = self._endpoints[hook.id] = _Endpoint(hook)
            if endpoint.webhook.failing:
                continue
            if data is None:
                data = {"id": event_id(event), **event.to_json()}
            endpoint.queue.append(data)
            self._backlog(+1)
            if len(endpoint.queue) > self.max_backlog:
                endpoint.queue.popleft()
                self._backlog(-1)
                self._dropped("backlog", 1)
            self._schedule(endpoint)

    # -- durable delivery ------------------------------------------------------

    async def start(self) -> None:
        """
        Resume every endpoint from its stored cursor (durable mode): what
        a previous run did not get acknowledged is sent now.  Called once
        storage is up; the first event received starts it otherwise.
        """
        if self._started or not self.durable:
            return
        self._started = True
        source: DurableWebhookSource = self._webhooks  # type: ignore[assignment]
        try:
            hooks = await source.active()
        except Exception:
            self._started = False
            log.failure("cannot read the webhooks to resume; retrying")
            if not self._stopped:
                self._load_timers[-1] = self._clock.callLater(5.0, lambda: ensureDeferred(self.start()))
            return
        for hook in hooks:
            self._endpoint(hook)
            self._schedule(self._endpoints[hook.id])

    def _wake(self, event: Event, hooks: list[Webhook]) -> None:
        """A stored event for these hooks: each endpoint that wants it reads the table soon."""
        if not self._started:
            ensureDeferred(self.start())
        for hook in hooks:
            if hook.failing or not hook.wants(event.type.value):
                continue
            self._schedule(self._endpoint(hook))

    def _endpoint(self, hook: Webhook) -> _Endpoint:
        endpoint = self._endpoints.get(hook.id)
        if endpoint is None:
            endpoint = self._endpoints[hook.id] = _Endpoint(hook, cursor=hook.cursor)
        return endpoint

    async def _fetch(self, endpoint: _Endpoint) -> bool:
        """
        Renew the lease and, without a batch, read the next one after the
        cursor; False when there is nothing to send (or another node
        delivers to this endpoint now).
        """
        source: DurableWebhookSource = self._webhooks  # type: ignore[assignment]
        hook = endpoint.webhook
        try:
            stored = await source.claim(hook.id, self.node, self._clock.seconds() + self.lease_seconds)
        except Exception:
            log.failure("cannot take the lease of webhook {id}; retrying", id=hook.id)
            self._later(endpoint, 5.0)
            return False
        if stored is None:  # another node's lease: look again once it may have run out
            self._drop_batch(endpoint)
            self._later(endpoint, self.lease_seconds)
            return False
        if stored > endpoint.cursor:  # another node moved it on meanwhile
            endpoint.cursor = stored
            if endpoint.batch is not None and endpoint.batch_last <= stored:
                self._drop_batch(endpoint)
        if endpoint.batch is not None:
            return True
        try:
            rows = await source.events_after(hook.account_id, endpoint.cursor, hook.event_types, self.max_batch)
        except Exception:
            log.failure("cannot read the events for webhook {id}; retrying", id=hook.id)
            self._later(endpoint, 5.0)
            return False
        if not rows:
            return False
        events = [stored_event(row) for row in rows]
        endpoint.batch = [{"id": event_id(e), **e.to_json()} for _, e in events]
        endpoint.batch_last = events[-1][0]
        endpoint.more = len(rows) >= self.max_batch
        endpoint.delivery_id = uuid.uuid4().hex
        endpoint.attempts = 0
        endpoint.first_failure = None
        self._backlog(+len(events))
        return True

    def _drop_batch(self, endpoint: _Endpoint) -> None:
        self._backlog(-len(endpoint.batch or []))
        endpoint.batch = None

    def _later(self, endpoint: _Endpoint, delay: float) -> None:
        if not self._stopped and (endpoint.timer is None or not endpoint.timer.active()):
            endpoint.timer = self._clock.callLater(delay, self._start, endpoint)

    async def _durable_attempt(self, endpoint: _Endpoint) -> None:
        try:
            ready = await self._fetch(endpoint)
        except Exception:
            log.failure("webhook {id}: reading the next batch failed", id=endpoint.webhook.id)
            ready = False
        if not ready or self._stopped or self._endpoints.get(endpoint.webhook.id) is not endpoint:
            endpoint.sending = False
            if endpoint.more and not self._stopped:
                endpoint.more = False
                self._schedule(endpoint)
            return
        await self._attempt(endpoint)

    async def _acknowledged(self, endpoint: _Endpoint) -> None:
        """Move the stored cursor past the acknowledged batch; a failure here means a duplicate later, no loss."""
        source: DurableWebhookSource = self._webhooks  # type: ignore[assignment]
        try:
            await source.advance(endpoint.webhook.id, endpoint.batch_last)
        except Exception:
            log.failure("cannot record webhook {id}'s position", id=endpoint.webhook.id)
        endpoint.cursor = max(endpoint.cursor, endpoint.batch_last)

    # -- sending -------------------------------------------------------------

    def _schedule(self, endpoint: _Endpoint) -> None:
        if endpoint.sending or endpoint.batch is not None or self._stopped:
            endpoint.more = True  # look again when the batch in flight is done
            return  # the batch in flight (or waiting for its retry) comes first
        if self.durable:
            if endpoint.timer is None or not endpoint.timer.active():
                endpoint.timer = self._clock.callLater(
                    0 if endpoint.more else self.batch_interval, self._start, endpoint
                )
            return
        if len(endpoint.queue) >= self.max_batch:
            if endpoint.timer is not None and endpoint.timer.active():
                endpoint.timer.cancel()
            endpoint.timer = None
            self._start(endpoint)
        elif endpoint.queue and endpoint.timer is None:
            endpoint.timer = self._clock.callLater(self.batch_interval, self._start, endpoint)

    def _start(self, endpoint: _Endpoint) -> None:
        endpoint.timer = None
        if self._stopped or endpoint.sending:
            return
        if self.durable:
            endpoint.sending = True
            self._track(ensureDeferred(self._durable_attempt(endpoint)))
            return
        if endpoint.batch is None:
            if not endpoint.queue:
                return
            count = min(self.max_batch, len(endpoint.queue))
            endpoint.batch = [endpoint.queue.popleft() for _ in range(count)]
            endpoint.delivery_id = uuid.uuid4().hex
            endpoint.attempts = 0
            endpoint.first_failure = None
        endpoint.sending = True
        self._track(ensureDeferred(self._attempt(endpoint)))

    def _track(self, d: Deferred[None]) -> None:
        """Remember work in flight, so that ``stop()`` can wait for it before storage closes."""
        if d.called:
            return
        self._running.add(d)

        def done(result: object) -> object:
            self._running.discard(d)
            return result

        d.addBoth(done)

    async def _attempt(self, endpoint: _Endpoint) -> None:
        batch = endpoint.batch
        assert batch is not None
        hook = endpoint.webhook
        body = json.dumps(
            {"webhook_id": hook.id, "delivery_id": endpoint.delivery_id, "events": batch}, separators=(",", ":")
        ).encode("utf-8")
        now = self._clock.seconds()
        headers = {
            "Content-Type": ["application/json"],
            "User-Agent": [USER_AGENT],
            SIGNATURE_HEADER: [sign(hook.secret, int(now), body)],
            DELIVERY_HEADER: [endpoint.delivery_id],
            WEBHOOK_HEADER: [str(hook.id)],
        }
        endpoint.attempts += 1
        status: int | None = None
        error: str | None = None
        result = "ok"
        try:
            status, text = await self._post(hook.url, body, headers)
        except (CancelledError, TimeoutError):
            error, result = f"no answer within {self.timeout:g} s", "timeout"
        except Exception as e:
            error, result = f"{type(e).__name__}: {e}"[:500], "error"
        else:
            if not 200 <= status < 300:
                error, result = f"HTTP {status}: {text}"[:500], "http_error"
        if self._metrics is not None:
            self._metrics.webhook_posts.labels(result=result).inc()
        await self._record(hook.id, now, status, error, len(batch))
        if error is None and self.durable:
            await self._acknowledged(endpoint)
        endpoint.sending = False
        if self._stopped or self._endpoints.get(hook.id) is not endpoint:
            return
        if error is None:
            self._delivered(endpoint)
        else:
            self._failed(endpoint, now)

    async def _post(self, url: str, body: bytes, headers: dict[str, list[str]]) -> tuple[int, str]:
        async def exchange() -> tuple[int, str]:
            response = await self._http.post(url, data=body, headers=headers, allow_redirects=False)
            content = await self._http.content(response)
            return int(response.code), content[:200].decode("utf-8", "replace")

        d = ensureDeferred(exchange())
        d.addTimeout(self.timeout, self._clock)
        return await d

    async def _record(self, webhook_id: int, ts: float, status: int | None, error: str | None, events: int) -> None:
        try:
            await self._webhooks.record_attempt(webhook_id, ts, status, error, events)
        except Exception:
            log.failure("cannot record a webhook attempt")

    def _delivered(self, endpoint: _Endpoint) -> None:
        batch = endpoint.batch or []
        self._backlog(-len(batch))
        if self._metrics is not None:
            self._metrics.webhook_events_delivered.inc(len(batch))
        endpoint.batch = None
        endpoint.attempts = 0
        endpoint.first_failure = None
        self._schedule(endpoint)

    def _failed(self, endpoint: _Endpoint, now: float) -> None:
        if endpoint.first_failure is None:
            endpoint.first_failure = now
        if self._clock.seconds() - endpoint.first_failure >= self.retry_for:
            ensureDeferred(self._give_up(endpoint))
            return
        delay = retry_delay(endpoint.attempts, base=self.retry_base, cap=self.retry_cap, jitter=self._jitter)
        endpoint.timer = self._clock.callLater(delay, self._start, endpoint)

    async def _give_up(self, endpoint: _Endpoint) -> None:
        hook = endpoint.webhook
        log.warn(
            "webhook {id} ({url}) failed for {hours:g} h: marked failing",
            id=hook.id,
            url=hook.url,
            hours=self.retry_for / 3600,
        )
        endpoint.webhook = attrs.evolve(hook, failing=True)
        self._drop_endpoint(hook.id, "failing")
        self.invalidate(hook.account_id)
        try:
            await self._webhooks.set_failing(hook.id, True)
        except Exception:
            log.failure("cannot mark webhook {id} failing", id=hook.id)

    def _drop_endpoint(self, webhook_id: int, reason: str) -> None:
        endpoint = self._endpoints.pop(webhook_id, None)
        if endpoint is None:
            return
        if endpoint.timer is not None and endpoint.timer.active():
            endpoint.timer.cancel()
        endpoint.timer = None
        lost = len(endpoint.queue) + len(endpoint.batch or [])
        endpoint.queue.clear()
        endpoint.batch = None
        self._backlog(-lost)
        if lost:
            self._dropped(reason, lost)

    def _backlog(self, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.webhook_backlog.inc(delta)

    def _dropped(self, reason: str, count: int) -> None:
        if self._metrics is not None:
            self._metrics.webhook_events_dropped.labels(reason=reason).inc(count)

    # -- state, for the API and the tests ------------------------------------

    def pending(self, webhook_id: int) -> int:
        """Events waiting for (or in) delivery to ``webhook_id`` on this node."""
        endpoint = self._endpoints.get(webhook_id)
        if endpoint is None:
            return 0
        return len(endpoint.queue) + len(endpoint.batch or [])

    def stop(self) -> Deferred[None]:
        """
        Cancel every timer; batches in flight finish but nothing new
        starts.  The returned Deferred fires once they did and, in durable
        mode, the leases were given back (another node can take over at
        once): wait for it before closing storage.
        """
        self._stopped = True
        for endpoint in self._endpoints.values():
            if endpoint.timer is not None and endpoint.timer.active():
                endpoint.timer.cancel()
            endpoint.timer = None
        for timer in self._load_timers.values():
            if timer.active():
                timer.cancel()
        self._load_timers.clear()
        return ensureDeferred(self._release_all())

    async def _release_all(self) -> None:
        for d in list(self._running):
            try:
                await d
            except Exception:
                log.failure("webhook delivery failed while stopping")
        if not self.durable:
            return
        source: DurableWebhookSource = self._webhooks  # type: ignore[assignment]
        for webhook_id in list(self._endpoints):
            try:
                await source.release(webhook_id, self.node)
            except Exception:
                log.failure("cannot give back the lease of webhook {id}", id=webhook_id)
