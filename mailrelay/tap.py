"""
``twistd mailrelay``: command-line options and the service maker.

Everything that can be checked before the reactor starts is checked here,
so a bad configuration ends the process with one sentence and exit status 1.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from mailrelay.config import Config, ConfigError, load_config

CONFIG_ENV = "MAILRELAY_CONFIG"


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the mailrelay SMTP relay. Without --config (or $MAILRELAY_CONFIG) it runs on the embedded "
                "defaults: SQLite and spool under ./mailrelay-data, a self-signed certificate, the standard ports.")
    optParameters = [["config", "c", None, "configuration file (TOML)"]]

    config: Config

    def postOptions(self) -> None:
        path = self["config"] or os.environ.get(CONFIG_ENV) or None
        try:
            self.config = load_config(path)
        except ConfigError as e:
            fail(str(e))


def fail(sentence: str) -> None:
    """End start-up with one sentence on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"mailrelay: error: {sentence}")


def tune_collector() -> None:
    """
    Each message makes thousands of short-lived objects (Deferreds,
    coroutines, replies), so the default young-generation threshold (700)
    ran the cyclic collector about 15 times a second per process: measured
    at 2-3% of the CPU (bench/README.md).  A larger threshold runs it
    rarely; what start-up built lives as long as the process, so it is
    frozen out of every later collection.
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mailrelay.service import StartupError
    from mailrelay.service import makeService as make

    try:
        service = make(options.config, reactor)
    except StartupError as e:
        fail(str(e))
        raise  # not reached
    service.ready.addCallback(lambda _: tune_collector())
    watch_hangup(reactor, service.reload)
    return service


def watch_hangup(reactor: Any, reload: Any) -> None:
    """``kill -HUP`` re-reads the certificate (after a renewal), in the reactor thread."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))


def main(argv: list[str] | None = None) -> Any:  # pragma: no cover - convenience for `python -m`
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "mailrelay", *(argv or [])]
    return run()
