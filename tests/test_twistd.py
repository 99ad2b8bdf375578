"""
End-to-end: the twistd plugin starts, answers /healthz, stops on SIGTERM,
and refuses to start with one sentence when it cannot run.
"""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.storage.migrations import latest_version
from tests.support.db import postgres_admin_url
from tests.support.relay import TWISTD, RelayProcess


class TwistdTests(SynchronousTestCase):
    def relay(self, **kwargs: object) -> RelayProcess:
        relay = RelayProcess(Path(self.mktemp()), **kwargs)  # type: ignore[arg-type]
        self.addCleanup(relay.kill)
        return relay

    def test_plugin_listed(self) -> None:
        """`twistd --help` lists the mailrelay plugin and `twistd mailrelay --help` its options."""
        out = subprocess.run([TWISTD, "--help"], capture_output=True, timeout=60).stdout.decode()
        self.assertIn("mailrelay", out)
        out = subprocess.run([TWISTD, "mailrelay", "--help"], capture_output=True, timeout=60).stdout.decode()
        self.assertIn("--config", out)

    def test_starts_serves_and_stops(self) -> None:
        """On the embedded default (SQLite) the relay starts, /healthz says ok, SIGTERM stops it cleanly."""
        relay = self.relay()
        relay.start()
        url = f"http://127.0.0.1:{relay.port('http')}/healthz"
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertEqual(json.loads(response.read()), {"status": "ok", "database": "ok"})
        self.assertTrue((relay.data / "mailrelay.sqlite3").exists())
        # twistd re-raises SIGTERM once it has shut down cleanly (systemd counts that as success).
        self.assertIn(relay.stop(), (0, -15))
        self.assertIn("mailrelay stopped", relay.output())

    def test_postgres(self) -> None:
        """The relay runs on PostgreSQL, migrating an empty database at start."""
        from tests.support.db import fresh_database_url

        relay = self.relay(database_url=fresh_database_url(self, "postgresql"))  # type: ignore[arg-type]
        relay.start()
        self.assertIn("applied schema migration 001_initial", relay.output())
        self.assertIn(relay.stop(), (0, -15))
        self.assertIn("mailrelay stopped", relay.output())

    def test_bad_config(self) -> None:
        """A broken config ends start-up with one sentence and status 1, no traceback."""
        relay = self.relay(listeners={"submission": ["tcp:notaport"]})
        process = relay.start(expect_failure=True)
        self.assertEqual(process.returncode, 1)
        self.assertIn("mailrelay: error: mailrelay.toml: listeners.submission[0]: not a valid endpoint", relay.output())
        self.assertNotIn("Traceback", relay.output())

    def test_unreachable_database(self) -> None:
        """An unreachable PostgreSQL ends start-up with one sentence and status 1."""
        relay = self.relay(database_url="postgresql://postgres@127.0.0.1:1/x?connect_timeout=2")
        process = relay.start(expect_failure=True)
        self.assertEqual(process.returncode, 1)
        self.assertIn("mailrelay: error: cannot connect to PostgreSQL", relay.output())
        self.assertNotIn("Traceback", relay.output())

    def test_newer_database(self) -> None:
        """A database written by a newer mailrelay is refused with status 1."""
        postgres_admin_url()  # the same refusal on both engines; SQLite is enough here
        relay = self.relay()
        relay.start()
        relay.stop()
        import sqlite3

        conn = sqlite3.connect(relay.data / "mailrelay.sqlite3")
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 0)", (latest_version() + 1,))
        conn.commit()
        conn.close()
        process = relay.start(expect_failure=True)
        self.assertEqual(process.returncode, 1)
        self.assertIn("newer than this mailrelay understands", relay.output())

    def test_port_in_use(self) -> None:
        """A listener that cannot bind is one sentence and status 1."""
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        relay = self.relay(listeners={"http": [f"tcp:{port}:interface=127.0.0.1"]})
        process = relay.start(expect_failure=True)
        self.assertEqual(process.returncode, 1)
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1 (http)", relay.output())


class CollectorTests(SynchronousTestCase):
    def test_tune_collector(self) -> None:
        """The twistd process freezes what start-up built and collects young objects rarely."""
        import gc

        from mailrelay.tap import tune_collector

        before = gc.get_threshold()
        self.addCleanup(gc.unfreeze)
        self.addCleanup(gc.set_threshold, *before)
        tune_collector()
        self.assertEqual(gc.get_threshold(), (10_000, 20, 20))
        self.assertGreater(gc.get_freeze_count(), 0)


class CertificateWatchTests(SynchronousTestCase):
    """The relay picks up a renewed certificate on a timer (and on SIGHUP, below) without a restart."""

    def relay_with_certificate(self, interval: float) -> tuple[Any, Any, Clock, str]:
        from mailrelay.config import load_config
        from mailrelay.service import RelayService, _watch_certificate
        from mailrelay.smtp.tls import ReloadingContextFactory
        from tests.test_smtp_tls import write_pems

        directory = Path(self.mktemp()).resolve()
        cert, key = write_pems(str(directory / "tls"))
        config_path = directory / "mailrelay.toml"
        config_path.write_text(
            f'[server]\ndata_dir = "{directory / "data"}"\n'
            f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\nreload_interval = {interval}\n'
        )
        clock = Clock()
        relay = RelayService(load_config(config_path), clock, None, None)  # type: ignore[arg-type]
        factory = ReloadingContextFactory(cert, key)
        _watch_certificate(relay, factory)
        for step in relay.startup_steps:
            self.successResultOf(ensureDeferred(step()))  # type: ignore[arg-type]
        return relay, factory, clock, str(directory / "tls")

    def test_timer(self) -> None:
        """A renewal is served after the next check; a bad one is logged once and the old certificate stays."""
        from tests.test_smtp_tls import LEAF, OTHER_LEAF, peer_serial, replace_file, replace_pems

        relay, factory, clock, tls_dir = self.relay_with_certificate(60)
        first = peer_serial(factory)
        replace_pems(tls_dir, OTHER_LEAF)
        clock.advance(59)
        self.assertEqual(peer_serial(factory), first)
        with capturedLogs() as events:
            clock.advance(1)
            second = peer_serial(factory)
            self.assertNotEqual(second, first)
            replace_file(str(Path(tls_dir) / "key.pem"), LEAF.private_key_pem.bytes())
            clock.advance(60)
            clock.advance(60)
        text = [formatEvent(e) for e in events]
        self.assertEqual(sum("loaded the renewed certificate" in t for t in text), 1, text)
        self.assertEqual(sum("cannot be used, the current certificate stays" in t for t in text), 1, text)
        self.assertEqual(peer_serial(factory), second)
        for step in relay.shutdown_steps:
            self.successResultOf(ensureDeferred(step()))  # type: ignore[arg-type]
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unexpected_error_keeps_watching(self) -> None:
        """An unexpected error while checking is logged; the timer goes on and the certificate stays."""
        from mailrelay.service import _watch_certificate

        relay, factory, clock, _ = self.relay_with_certificate(60)
        calls = []

        class Broken:
            cert_path = factory.cert_path

            def reload_if_changed(self) -> bool:
                calls.append(clock.seconds())
                raise RuntimeError("disk on fire")

        relay.startup_steps.clear()
        _watch_certificate(relay, Broken())
        for step in relay.startup_steps:
            self.successResultOf(ensureDeferred(step()))  # type: ignore[arg-type]
        clock.advance(60)
        clock.advance(60)
        self.assertEqual(len([t for t in calls if t >= 60]), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_zero_interval(self) -> None:
        """reload_interval = 0: no timer, only an explicit reload (SIGHUP) looks at the files."""
        from tests.test_smtp_tls import OTHER_LEAF, peer_serial, replace_pems

        relay, factory, clock, tls_dir = self.relay_with_certificate(0)
        first = peer_serial(factory)
        replace_pems(tls_dir, OTHER_LEAF)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(peer_serial(factory), first)
        relay.reload()
        self.assertNotEqual(peer_serial(factory), first)

    def test_negative_interval(self) -> None:
        """A negative interval is a configuration error with a sentence."""
        from mailrelay.config import ConfigError, load_config

        path = Path(self.mktemp())
        path.write_text("[tls]\nreload_interval = -5\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("tls.reload_interval", str(error))


class HangupTests(SynchronousTestCase):
    def test_sighup_reloads_certificate(self) -> None:
        """End to end: after the files are replaced, `kill -HUP` makes new STARTTLS sessions get the new certificate."""
        from tests.test_smtp_tls import LEAF, OTHER_LEAF, replace_pems, write_pems

        directory = Path(self.mktemp())
        cert, key = write_pems(str((directory / "tls").resolve()))
        relay = RelayProcess(
            directory / "relay",
            extra=f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\nreload_interval = 0\n',
        )
        self.addCleanup(relay.kill)
        relay.start()

        def served_serial() -> int:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=10) as client:
                client.starttls(context=context)
                der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            return x509.load_der_x509_certificate(der).serial_number

        self.assertEqual(served_serial(), _serial(LEAF))
        replace_pems(str(Path(cert).parent), OTHER_LEAF)
        self.assertEqual(served_serial(), _serial(LEAF))  # no timer: nothing changes by itself
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while served_serial() != _serial(OTHER_LEAF):
            self.assertLess(time.monotonic(), deadline, relay.output())
            time.sleep(0.1)
        self.assertIn("loaded the renewed certificate", relay.output())
        self.assertIn(relay.stop(), (0, -15))


def _serial(leaf: Any) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
