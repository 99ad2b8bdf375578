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
        self.listeners: list[Listener] = []
        self.startup_steps: list[Callable[[], Awaitable[None]]] = []
        self.shutdown_steps: list[Callable[[], Awaitable[None]]] = []
        self.ready: Deferred[None] = Deferred()

    def add_listener(self, mode: str, description: str, factory: IProtocolFactory) -> None:
        self.listeners.append(Listener(mode, description, factory))

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
            log.info("{mode} listening on {address}", mode=listener.mode, address=listener.address())
        # Where each listener really is (``tcp:0`` picks a free port): for operators and the tests.
        state = self.config.server.data_dir / "listeners.json"
        state.write_text(json.dumps([listener.address() for listener in self.listeners], indent=2) + "\n")
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

    from mailrelay.web.site import make_site

    for description in config.listeners.http:
        relay.add_listener("http", description, make_site(relay))
    return relay

