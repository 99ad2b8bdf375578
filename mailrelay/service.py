"""
Wiring: the only module that knows every part.  ``makeService(config,
reactor)`` builds each stage, hands it what it needs through its
constructor, and returns one service that twistd runs.

Start-up is in two halves.  What can fail before the reactor runs (the data
directory, the database being reachable and not newer, the certificate) is
checked in ``makeService`` and raises ``StartupError``.  The rest (opening
the pool, migrations) runs once the reactor is up; the listeners start only
after it succeeded, so no client ever talks to a half-started relay.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from mailrelay.config import Config
from mailrelay.eagertcp import eager_port
from mailrelay.storage.changes import ChangeWatcher
from mailrelay.storage.database import DatabasePool, DatabaseUnavailable, make_pool
from mailrelay.storage.migrations import SchemaTooNew, check_version, migrate
from mailrelay.storage.preflight import preflight
from mailrelay.storage.store import Store

log = Logger()


class StartupError(Exception):
    """The relay cannot start; ``str()`` is the sentence for the operator."""


@attrs.define
class Listener:
    """One endpoint of one mode (``smtp``, ``submission``, ``submissions``, ``http``)."""

    mode: str
    description: str
    factory: IProtocolFactory
    port: IListeningPort | None = None

    def address(self) -> dict[str, Any]:
        host = self.port.getHost() if self.port is not None else None
        return {"mode": self.mode, "endpoint": self.description,
                "host": getattr(host, "host", None), "port": getattr(host, "port", None)}


class RelayService(MultiService):
    """
    The running relay.  ``startService`` opens storage, runs the start-up
    steps, then starts the listeners; a failure stops the process with one
    logged sentence and exit status 1.
    """

    def __init__(self, config: Config, reactor: Any, pool: DatabasePool, store: Store) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pool = pool
        self.store = store
        #: Tells the stages' caches of accounts, credentials and domains when another process changed them.
        self.changes = ChangeWatcher(pool, reactor, config.database.change_poll_interval)
        self.listeners: list[Listener] = []
        self.startup_steps: list[Callable[[], Awaitable[None]]] = []
        self.shutdown_steps: list[Callable[[], Awaitable[None]]] = []
        self.reload_steps: list[Callable[[], None]] = []
        self.ready: Deferred[None] = Deferred()

    def add_listener(self, mode: str, description: str, factory: IProtocolFactory) -> None:
        self.listeners.append(Listener(mode, description, factory))

    def reload(self) -> None:
        """Re-read what can change while the relay runs (the TLS certificate); twistd calls it on SIGHUP."""
        for step in self.reload_steps:
            step()

    def startService(self) -> None:
        super().startService()
        d = ensureDeferred(self._start())
        d.addCallbacks(self.ready.callback, self._failed)

    async def _start(self) -> None:
        try:
            await self.pool.start()
            await check_version(self.pool)
            applied = await migrate(self.pool)
        except (DatabaseUnavailable, SchemaTooNew) as e:
            raise StartupError(str(e))
        for m in applied:
            log.info("applied schema migration {version:03d}_{name}", version=m.version, name=m.name)
        await self.changes.start()
        for step in self.startup_steps:
            await step()
        for listener in self.listeners:
            endpoint = serverFromString(self.reactor, listener.description)
            try:
                listener.port = await endpoint.listen(listener.factory)
            except CannotListenError as e:
                await self._stop_listening()
                raise StartupError(f"cannot listen on {listener.description} ({listener.mode}): "
                                   f"{e.socketError or e}")
            eager_port(listener.port)  # replies go out at once, not on the reactor's next turn
            log.info("{mode} listening on {address}", mode=listener.mode, address=listener.address())
        # Where each listener really is (``tcp:0`` picks a free port): for operators and the tests.
        # Written aside and renamed, so a reader never sees it half-written.
        state = self.config.server.data_dir / "listeners.json"
        partial = state.with_name(state.name + ".new")
        partial.write_text(json.dumps([listener.address() for listener in self.listeners], indent=2) + "\n")
        partial.replace(state)
        log.info("mailrelay {hostname} ready", hostname=self.config.server.hostname)

    async def _stop_listening(self) -> None:
        ports = [listener.port for listener in self.listeners if listener.port is not None]
        for listener in self.listeners:
            listener.port = None
        await gatherResults([maybeDeferred(port.stopListening) for port in ports])

    def _failed(self, failure: Any) -> None:
        if failure.check(StartupError):
            sentence = str(failure.value)
        else:
            log.failure("unexpected start-up failure", failure)
            sentence = f"start-up failed: {failure.getErrorMessage()}"
        log.critical("mailrelay: error: {sentence}", sentence=sentence)
        sys.stderr.write(f"mailrelay: error: {sentence}\n")
        self.ready.errback(failure)
        # twistd exits 0 once the reactor stops; a failed start must not look like success.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Listeners first (no new sessions), then the stages, then storage.
        await self._stop_listening()
        await MultiService.stopService(self)
        for step in reversed(self.shutdown_steps):
            try:
                await step()
            except Exception:
                log.failure("error during shutdown")
        await self.changes.stop()
        await self.pool.close()
        log.info("mailrelay stopped")


def makeService(config: Config, reactor: Any) -> RelayService:
    """Build the relay for ``config``; raises ``StartupError`` with a sentence."""
    try:
        config.server.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create the data directory {config.server.data_dir}: {e.strerror}")
    try:
        preflight(config.database.url)
    except (DatabaseUnavailable, SchemaTooNew) as e:
        raise StartupError(str(e))

    pool = make_pool(config.database.url, reactor, size=config.database.pool_size)
    store = Store(pool, reactor)
    relay = RelayService(config, reactor, pool, store)
    _add_events(relay)

    if config.listeners.smtp or config.listeners.submission or config.listeners.submissions:
        _add_smtp(relay)
        _add_queue(relay)
        _add_feedback(relay)
    if config.listeners.http:
        _add_web(relay)
    return relay


def _tracking_secret(relay: RelayService) -> bytes:
    secret = getattr(relay, "tracking_secret", None)
    if secret is None:  # no SMTP side in this process: the same file the queue would use
        from mailrelay.queue.secret import FILE_NAME, load_or_create_secret

        config = relay.config
        try:
            secret = (config.tracking.secret.encode("utf-8") if config.tracking.secret
                      else load_or_create_secret(config.server.data_dir / FILE_NAME))
        except (OSError, ValueError) as e:
            raise StartupError(f"cannot read the tracking secret: {e}")
        relay.tracking_secret = secret  # type: ignore[attr-defined]
    return bytes(secret)


def _add_feedback(relay: RelayService) -> None:
    """Bounces and complaints coming back to VERP addresses become events and suppressions."""
    from mailrelay.feedback.handler import FeedbackHandler
    from mailrelay.queue.wiring import KeepFeedback
    from mailrelay.web.lookup import StoreRecipientLookup

    keep = KeepFeedback(relay.reactor, relay.config.server.data_dir / "feedback")
    relay.feedback_handler = FeedbackHandler(  # type: ignore[attr-defined]
        StoreRecipientLookup(relay.store.pool), relay.store.suppressions, relay.event_sink,  # type: ignore[attr-defined]
        _tracking_secret(relay), relay.reactor, keep=keep,
    )


def _add_web(relay: RelayService) -> None:
    """The HTTP service: tracking, unsubscribe, /healthz, /metrics, the JSON API and webhooks."""
    import functools

    from twisted.internet.threads import deferToThreadPool
    from twisted.web.client import Agent, HTTPConnectionPool

    from mailrelay.events.queries import EventQueries
    from mailrelay.events.stats import Stats
    from mailrelay.events.webhooks import AgentClient, WebhookDispatcher
    from mailrelay.metrics import Metrics
    from mailrelay.processing import dkim
    from mailrelay.processing.tokens import TokenSigner
    from mailrelay.storage.model import SendingDomain
    from mailrelay.storage.webhooks import Webhooks
    from mailrelay.web.lookup import StoreRecipientLookup
    from mailrelay.web.site import make_site

    config, reactor, store = relay.config, relay.reactor, relay.store
    metrics = Metrics()
    relay.metrics = metrics  # type: ignore[attr-defined]
    _feed_metrics(relay, metrics)
    webhooks = Webhooks(store.pool, reactor)
    http = AgentClient(Agent(reactor, pool=HTTPConnectionPool(reactor)))
    dispatcher = WebhookDispatcher(webhooks, http, reactor, metrics, retry_base=config.webhooks.retry_base)
    sink = relay.event_sink  # type: ignore[attr-defined]
    sink.subscribe(dispatcher.receive)
    relay.startup_steps.append(dispatcher.start)  # endpoints resume from their durable cursors

    def records(d: SendingDomain) -> tuple[dkim.DNSRecord, ...]:
        return dkim.sending_domain_records(d.domain, d.dkim_selector, d.dkim_private_key, d.dkim_ed25519_key,
                                           config.domains.bounce_domain)

    site = make_site(
        store=store, webhooks=webhooks, signer=TokenSigner(_tracking_secret(relay)), sink=sink,
        stats=Stats(store.pool), events=EventQueries(store.pool), clock=reactor, metrics=metrics,
        domain_records=records, dispatcher=dispatcher,
        dkim_keygen=functools.partial(deferToThreadPool, reactor, reactor.getThreadPool(), dkim.generate_rsa_key),
        recipients=StoreRecipientLookup(store.pool), injection_user=config.smtp.injection_user,
        allow_private_webhooks=config.webhooks.allow_private,
    )
    relay.changes.subscribe(site.resource.authenticator.forget_all)
    for description in config.listeners.http:
        relay.add_listener("http", description, site)

    async def stop() -> None:
        await dispatcher.stop()  # releases the endpoints' leases before the pool closes
        await site.resource.tracker.drain()

    relay.shutdown_steps.append(stop)


def _add_events(relay: RelayService) -> None:
    """The event sink every stage reports to: batched writes, roll-ups, an outage buffer on disk."""
    from mailrelay.events.sink import EventSink

    events = EventSink(relay.store.pool, relay.reactor, relay.reactor, str(relay.config.server.data_dir / "events"))
    relay.event_sink = events  # type: ignore[attr-defined]

    async def start() -> None:
        await events.start()

    async def stop() -> None:
        await events.stop()

    # First to start, last to stop: events emitted by the other stages' shutdown are still stored.
    relay.startup_steps.insert(0, start)
    relay.shutdown_steps.insert(0, stop)


def _add_queue(relay: RelayService) -> None:
    """
    The queue manager and delivery (owned by mailrelay/queue): fed by the spool and the SMTP accept path.

    The event sink and the feedback handler are looked up on the relay when first used
    (``relay.event_sink``, ``relay.feedback_handler``), so they may be wired after this.
    """
    from mailrelay.queue.wiring import KeepFeedback, LateEventSink, QueueService, late_feedback, make_backpressure
    from mailrelay.smtp.session import QUEUE_FULL

    config, reactor = relay.config, relay.reactor
    spool = relay.spool  # type: ignore[attr-defined]
    submission = relay.submission  # type: ignore[attr-defined]
    keep = KeepFeedback(reactor, config.server.data_dir / "feedback")
    try:
        queue = QueueService(
            reactor=reactor, config=config, spool=spool, store=relay.store,
            events=LateEventSink(lambda: getattr(relay, "event_sink", None)),
            feedback=late_feedback(lambda: getattr(relay, "feedback_handler", None), keep),
        )
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot set up the queue: {e}")
    relay.queue = queue  # type: ignore[attr-defined]
    relay.changes.subscribe(queue.directory.forget_all)
    relay.tracking_secret = queue.secret  # type: ignore[attr-defined]
    submission.on_queued = queue.manager.add
    # spool.stats() walks every message; the queue counts them in O(1).
    submission.backpressure = make_backpressure(spool, reactor, config.delivery.queue_high_water,
                                                lambda: queue.manager.message_count, QUEUE_FULL)
    relay.startup_steps.append(queue.start)
    relay.shutdown_steps.append(queue.stop)


def _feed_metrics(relay: RelayService, metrics: Any) -> None:
    """
    Connect the Prometheus metrics to the stages from the outside, so no stage depends on them:
    delivery results from the event stream, sessions from the listeners' counts, failed logins
    and acceptances through the session's hooks.
    """
    from twisted.cred.error import UnauthorizedLogin

    from mailrelay.events.model import Event, EventType

    spool = getattr(relay, "spool", None)
    if spool is not None:
        # Walks the spool's index: only when /metrics is scraped.
        metrics.set_queue_sizes(lambda: dict(spool.stats().recipients))
    for mode, factory in getattr(relay, "smtp_factories", []):
        metrics.smtp_sessions.labels(listener=mode).set_function(lambda f=factory: float(f.active_connections))

    def on_event(event: Event) -> None:
        if event.type is EventType.DELIVERED:
            metrics.recipients_delivered.inc()
        elif event.type is EventType.DEFERRED:
            metrics.recipients_deferred.inc()
        elif event.type is EventType.BOUNCED:
            metrics.recipients_bounced.labels(**{"class": str(event.detail.get("class") or "hard")}).inc()

    relay.event_sink.subscribe(on_event)  # type: ignore[attr-defined]

    queue = getattr(relay, "queue", None)
    if queue is not None:
        def activity(destination: str, change: int) -> None:
            (metrics.connection_opened if change > 0 else metrics.connection_closed)(destination)

        queue.manager.activity = activity

    submission = getattr(relay, "submission", None)
    if submission is None:
        return
    queued, authenticator = submission.on_queued, submission.authenticator

    def on_queued(queue_id: str) -> None:
        message = spool.get(queue_id) if spool is not None else None
        listener = str(message.envelope.get("listener") or "smtp") if message is not None else "smtp"
        metrics.messages_accepted.labels(listener=listener).inc()
        queued(queue_id)

    class CountingAuthenticator:
        def authenticate(self, client_ip: str, mechanism: str, username: str, password: str) -> Deferred[Any]:
            d = authenticator.authenticate(client_ip, mechanism, username, password)

            def failed(f: Any) -> Any:
                if f.check(UnauthorizedLogin):
                    metrics.auth_failures.labels(mechanism=mechanism).inc()
                return f

            return d.addErrback(failed)

    submission.on_queued = on_queued
    submission.authenticator = CountingAuthenticator()


def _tls_context(config: Config) -> Any:
    from mailrelay.smtp.tls import ReloadingContextFactory, TLSConfigError, ensure_self_signed

    try:
        if config.tls.self_signed:
            if ensure_self_signed(config.tls.certificate, config.tls.private_key, config.server.hostname):
                log.info("generated a self-signed certificate for {host} in {path}", host=config.server.hostname,
                         path=str(config.tls.certificate))
        return ReloadingContextFactory(config.tls.certificate, config.tls.private_key)
    except TLSConfigError as e:
        raise StartupError(str(e))


def _watch_certificate(relay: RelayService, tls: Any) -> None:
    """
    Pick up a renewed certificate without a restart: the files are checked
    every ``tls.reload_interval`` seconds and on SIGHUP; new connections get
    the new certificate, open ones keep theirs.
    """
    from twisted.internet.task import LoopingCall

    from mailrelay.smtp.tls import TLSConfigError

    def check() -> None:
        try:
            if tls.reload_if_changed():
                log.info("TLS: loaded the renewed certificate {path}", path=os.fspath(tls.cert_path))
        except TLSConfigError as e:
            log.error("TLS: the changed certificate files cannot be used, the current certificate stays: {error}",
                      error=str(e))
        except Exception:
            # Keep the watcher (a LoopingCall stops on an exception) and the current certificate.
            log.failure("TLS: checking the certificate files failed; the current certificate stays")

    relay.reload_steps.append(check)
    interval = relay.config.tls.reload_interval
    if not interval:
        return
    watcher = LoopingCall(check)
    watcher.clock = relay.reactor

    async def start() -> None:
        watcher.start(interval, now=False)

    async def stop() -> None:
        if watcher.running:
            watcher.stop()

    relay.startup_steps.append(start)
    relay.shutdown_steps.append(stop)


def _add_smtp(relay: RelayService) -> None:
    """The SMTP listeners and everything the accept path needs: spool, policy, AUTH."""
    from twisted.python.threadpool import ThreadPool

    from mailrelay.events.writer import BatchWriter
    from mailrelay.policy.attribution import Attribution
    from mailrelay.policy.directory import SenderDirectory
    from mailrelay.policy.quota import QuotaTracker
    from mailrelay.smtp.auth import Authenticator
    from mailrelay.smtp.protocol import ServerSettings, SMTPServerFactory
    from mailrelay.smtp.session import MESSAGE_COLUMNS, Submission
    from mailrelay.smtp.tls import implicit_tls_factory
    from mailrelay.spool import Spool, SpoolError

    config, reactor, store = relay.config, relay.reactor, relay.store
    tls = _tls_context(config)
    _watch_certificate(relay, tls)
    threads = ThreadPool(minthreads=2, maxthreads=4, name="mailrelay-io")
    try:
        spool = Spool(str(config.server.data_dir / "spool"), reactor, threads, reactor)
    except SpoolError as e:
        raise StartupError(str(e))
    authenticator = Authenticator(store.credentials, config.smtp, reactor, reactor, threads)
    relay.changes.subscribe(authenticator.cache.clear)
    quota = QuotaTracker(store.counters, reactor)
    attribution = Attribution(store, reactor)
    messages = BatchWriter(store.pool, reactor, "messages", MESSAGE_COLUMNS,
                           conflict="ON CONFLICT (queue_id) DO NOTHING")

    directory = SenderDirectory(store, reactor)
    relay.changes.subscribe(directory.forget_all)
    submission = Submission(config=config, clock=reactor, authenticator=authenticator,
                            directory=directory, quota=quota, spool=spool,
                            attribution=attribution,
                            messages=messages, node=config.server.hostname)
    relay.submission = submission  # type: ignore[attr-defined]
    relay.spool = spool  # type: ignore[attr-defined]
    relay.smtp_factories = []  # type: ignore[attr-defined]

    async def start() -> None:
        threads.start()
        recovered = await spool.recover()
        log.info("spool: {n} message(s) recovered", n=len(recovered))

    async def stop() -> None:
        await quota.stop()
        await attribution.stop()
        await messages.stop()
        await spool.close()
        threads.stop()

    relay.startup_steps.append(start)
    relay.shutdown_steps.append(stop)

    s = config.smtp
    for mode in ("smtp", "submission", "submissions"):
        settings = ServerSettings(
            hostname=config.server.hostname, listener=mode, max_message_size=s.max_message_size,
            max_recipients=s.max_recipients, require_auth=mode != "smtp",
            allow_plaintext_auth=config.tls.allow_plaintext_auth, implicit_tls=mode == "submissions",
            command_timeout=s.command_timeout, data_block_timeout=s.data_block_timeout,
            data_end_timeout=s.data_end_timeout, max_errors=s.max_errors, max_connections=s.max_connections,
            max_connections_per_ip=s.max_connections_per_ip,
        )
        for description in getattr(config.listeners, mode):
            smtp_factory = SMTPServerFactory(settings, submission.delegate, reactor,
                                             tls_context_factory=None if mode == "submissions" else tls)
            relay.smtp_factories.append((mode, smtp_factory))  # type: ignore[attr-defined]
            factory: Any = implicit_tls_factory(smtp_factory, tls) if mode == "submissions" else smtp_factory
            relay.add_listener(mode, description, factory)

