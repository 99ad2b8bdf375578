"""
Assembling the queue from the relay's parts: resolver, delivery client,
renderer, manager, the ``recipients`` writer and the control socket.

``service._add_queue`` calls ``build_queue`` with what the rest of the
wiring made (reactor, config, spool, store) and adds the returned
``QueueService``'s ``start``/``stop`` to the relay's start-up and shutdown
steps.  Parts that other stages provide and that may be wired after the
queue (the event sink, the feedback handler) are passed as zero-argument
callables and looked up when first needed, so the order of the wiring
functions does not matter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.config import Config
from mailrelay.delivery.client import ClientConfig, DeliveryClient
from mailrelay.delivery.model import Credentials, TLSPolicy
from mailrelay.delivery.mx import MXResolver, SmarthostResolver, smarthost_destination
from mailrelay.events.model import Event
from mailrelay.interfaces import IEventSink
from mailrelay.queue.control import QueueControl, listen, socket_path
from mailrelay.queue.manager import FeedbackHandler, QueueManager, QueueSettings
from mailrelay.queue.records import RecipientRecords
from mailrelay.queue.render import Renderer, RenderSettings, StoreDirectory
from mailrelay.queue.secret import tracking_secret
from mailrelay.types import Reply

log = Logger()

#: sockaddr_un.sun_path holds 108 bytes on Linux, including the final NUL.
MAX_SOCKET_PATH = 107
_SMARTHOST_TLS = {"opportunistic": "may", "required": "encrypt", "none": "none"}


@implementer(IEventSink)
class LateEventSink:
    """
    An ``IEventSink`` that forwards to whatever ``find()`` returns at the
    time of each event; while it returns None the events are only logged.
    """

    def __init__(self, find: Callable[[], IEventSink | None]) -> None:
        self._find = find
        self._warned = False

    def emit(self, event: Event) -> None:
        sink = self._find()
        if sink is not None:
            sink.emit(event)
            return
        if not self._warned:
            self._warned = True
            log.warn("queue: no event sink is wired; delivery events go to the log only")
        log.info("event {type} {qid} {rcpt}", type=event.type.value, qid=event.queue_id, rcpt=event.recipient)


class KeepFeedback:
    """
    The default handler for the ``inbound`` route (bounces and complaints
    sent to VERP addresses) until the feedback stage is wired: keep each
    message as ``<directory>/<queue id>.eml`` and log it, so nothing that
    came back is lost.
    """

    def __init__(self, reactor: Any, directory: Path) -> None:
        self._reactor = reactor
        self.directory = directory

    def __call__(self, queue_id: str, envelope: Mapping[str, Any], data: bytes) -> Deferred[None]:
        path = self.directory / f"{queue_id}.eml"

        def write() -> None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

        d: Deferred[None] = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write)

        def logged(_: None) -> None:
            log.info("inbound {qid} kept in {path} (no feedback handler wired)", qid=queue_id, path=str(path))

        return d.addCallback(logged)


def late_feedback(find: Callable[[], FeedbackHandler | None], fallback: FeedbackHandler) -> FeedbackHandler:
    def handler(queue_id: str, envelope: Mapping[str, Any], data: bytes) -> Any:
        return (find() or fallback)(queue_id, envelope, data)

    return handler


def make_resolver(reactor: Any, config: Config) -> MXResolver | SmarthostResolver:
    d = config.delivery
    if d.smarthost:
        credentials = Credentials(d.smarthost_username, d.smarthost_password or "") if d.smarthost_username else None
        tls = TLSPolicy(_SMARTHOST_TLS.get(d.smarthost_tls, "may"))  # type: ignore[arg-type]
        return SmarthostResolver(smarthost_destination(d.smarthost, tls=tls, credentials=credentials))
    return MXResolver(
        reactor, nameservers=list(config.dns.nameservers) or None, timeout=config.dns.timeout, port=d.remote_port
    )


def make_client(reactor: Any, config: Config) -> DeliveryClient:
    source = config.delivery.source_address
    v6 = source if source and ":" in source else None
    v4 = source if source and not v6 else None
    # Keep as many idle connections per host as deliveries may run at once to one destination:
    # with fewer, most deliveries of a busy destination pay a new connection, greeting and EHLO.
    return DeliveryClient(reactor, ClientConfig(helo_hostname=config.server.hostname, source_ipv4=v4,
                                                source_ipv6=v6,
                                                max_idle_per_host=config.delivery.concurrency_per_destination))


def settings_of(config: Config) -> QueueSettings:
    d = config.delivery
    return QueueSettings(
        hostname=config.server.hostname,
        bounce_domain=config.domains.bounce_domain,
        retry_min=d.retry_min,
        retry_max=d.retry_max,
        max_age=d.max_age,
        concurrency_per_destination=d.concurrency_per_destination,
        active_window=d.active_window,
        delay_notice_after=d.delay_notice_after,
        smarthost=d.smarthost,
    )


def make_backpressure(
    spool: Any, clock: Any, high_water: int, count: Callable[[], int], full: Reply
) -> Callable[[], Reply | None]:
    """
    The SMTP layer's "must new mail wait?": the queue's O(1) message count
    instead of ``spool.stats()`` (which walks every message), and the free
    disk space checked at most once a second.
    """
    disk = {"checked": float("-inf"), "free": 1.0}

    def backpressure() -> Reply | None:
        now = clock.seconds()
        if now - disk["checked"] > 1.0:
            disk["checked"], disk["free"] = now, spool.disk_free_fraction()
        if disk["free"] < 0.05 or count() >= high_water:
            return full
        return None

    return backpressure


class QueueService:
    """The queue's parts and their start and stop, for the wiring."""

    def __init__(
        self, *, reactor: Any, config: Config, spool: Any, store: Any, events: IEventSink, feedback: FeedbackHandler
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.spool = spool
        self.secret = tracking_secret(config)
        self.resolver = make_resolver(reactor, config)
        self.client = make_client(reactor, config)
        self.directory = StoreDirectory(store, reactor)
        self.renderer = Renderer(
            self.directory,
            self.secret,
            RenderSettings(config.server.hostname, config.domains.bounce_domain, config.tracking.base_url),
        )
        self.records = RecipientRecords(store.pool, reactor, interval=0.25)
        self.manager = QueueManager(
            clock=reactor,
            spool=spool,
            resolver=self.resolver,
            client=self.client,
            renderer=self.renderer,
            directory=self.directory,
            events=events,
            settings=settings_of(config),
            feedback=feedback,
            records=self.records,
        )
        self.control = QueueControl(self.manager, reactor)
        self.socket = socket_path(config.server.data_dir)
        self.port: IListeningPort | None = None

    async def start(self) -> None:
        """After the spool's recovery: schedule what it recovered, then open the control socket."""
        d = self.manager.start(self.spool.messages())
        d.addErrback(lambda f: log.failure("queue: loading the spool failed", f))
        if len(str(self.socket).encode()) > MAX_SOCKET_PATH:
            log.error(
                "queue: {path} is too long for a UNIX socket; `mailrelay queue` will not work", path=str(self.socket)
            )
            return
        try:
            self.port = await listen(self.reactor, self.socket, self.control)
        except Exception as e:
            log.error("queue: cannot open the control socket {path}: {e}", path=str(self.socket), e=str(e))
            return
        log.info("queue: control socket at {path}", path=str(self.socket))

    async def stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await maybeDeferred(port.stopListening)
        await self.manager.stop()
        await self.client.close()
        await self.records.stop()
