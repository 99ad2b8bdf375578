"""
End-to-end: the twistd plugin starts, answers /healthz, stops on SIGTERM,
and refuses to start with one sentence when it cannot run.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

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
