"""The TOML configuration: defaults, validation and the sentences of its errors."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.config import ConfigError, load_config, parse_config


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.mkdir()
        f = path / "mailrelay.toml"
        f.write_text(text)
        return f

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as ctx:
            load_config(self.write(text))
        return str(ctx.exception)

    def test_defaults(self) -> None:
        """With no file, the relay runs on SQLite under ./mailrelay-data on the standard ports."""
        config = parse_config({}, source="(defaults)", base=Path("/srv"))
        self.assertEqual(config.server.data_dir, Path("/srv/mailrelay-data"))
        self.assertEqual(config.database.url, "sqlite:////srv/mailrelay-data/mailrelay.sqlite3")
        self.assertEqual(config.listeners.smtp, ("tcp:25",))
        self.assertEqual(config.listeners.submission, ("tcp:587", "tcp:2525"))
        self.assertEqual(config.listeners.submissions, ("tcp:465",))
        self.assertEqual(config.tls.certificate, Path("/srv/mailrelay-data/tls/cert.pem"))
        self.assertTrue(config.tls.self_signed)
        self.assertFalse(config.tls.allow_plaintext_auth)
        self.assertEqual(config.smtp.max_message_size, 31457280)
        self.assertEqual(config.smtp.injection_user, "smtp_injection")

    def test_full_file(self) -> None:
        """Every section is read; relative paths are taken from the file's directory."""
        f = self.write(
            '[server]\nhostname = "Relay.Example.com"\ndata_dir = "state"\n'
            '[listeners]\nsubmission = ["tcp:2587:interface=127.0.0.1"]\nsmtp = []\n'
            '[database]\nurl = "postgresql://postgres@127.0.0.1:5432/mailrelay"\n'
            '[dns]\nnameservers = ["127.0.0.1:5353", "::1"]\n'
            '[delivery]\nsmarthost = "smtp.example.net:587"\nretry_min = 1\nretry_max = 10\n'
            '[tracking]\nbase_url = "https://t.example.com/"\nsecret = "0123456789abcdef0123"\n'
            '[domains]\nbounce_domain = "Bounces.Example.com"\n'
        )
        config = load_config(f)
        self.assertEqual(config.server.hostname, "relay.example.com")
        self.assertEqual(config.server.data_dir, f.parent.resolve() / "state")
        self.assertEqual(config.listeners.submission, ("tcp:2587:interface=127.0.0.1",))
        self.assertEqual(config.listeners.smtp, ())
        self.assertEqual(config.dns.nameservers, (("127.0.0.1", 5353), ("::1", 53)))
        self.assertEqual(config.delivery.smarthost, "smtp.example.net:587")
        self.assertEqual((config.delivery.retry_min, config.delivery.retry_max), (1.0, 10.0))
        self.assertEqual(config.tracking.base_url, "https://t.example.com")
        self.assertEqual(config.domains.bounce_domain, "bounces.example.com")

    def test_bad_endpoint(self) -> None:
        """A listener that is not an endpoint string names the file, the key with its index, and why."""
        message = self.error('[listeners]\nsubmission = ["tcp:587", "tcp:notaport"]\n')
        self.assertTrue(message.startswith("mailrelay.toml: listeners.submission[1]: not a valid endpoint: "), message)

    def test_unknown_scheme(self) -> None:
        """An unknown database URL scheme is refused with the schemes that work."""
        message = self.error('[database]\nurl = "mysql://root@localhost/x"\n')
        self.assertIn("database.url: unknown database URL scheme 'mysql'", message)

    def test_wrong_type(self) -> None:
        """A value of the wrong type names the expected type."""
        self.assertIn(
            "smtp.max_recipients: expected an integer, got str", self.error('[smtp]\nmax_recipients = "ten"\n')
        )
        self.assertIn(
            "tls.allow_plaintext_auth: expected true or false", self.error('[tls]\nallow_plaintext_auth = "yes"\n')
        )

    def test_unknown_keys(self) -> None:
        """Misspelt sections and keys are errors, not silently ignored."""
        self.assertIn("mailrelay.toml: sever: unknown section", self.error('[sever]\nhostname = "x"\n'))
        self.assertIn("server.hostnme: unknown setting", self.error('[server]\nhostnme = "x"\n'))

    def test_timeouts_at_least_60(self) -> None:
        """SMTP timeouts under 60 s are refused (RFC 5321 minimums)."""
        self.assertIn("smtp.command_timeout: must be at least 60 seconds", self.error("[smtp]\ncommand_timeout = 10\n"))

    def test_not_toml(self) -> None:
        """A syntax error says the file is not valid TOML, with the position."""
        self.assertIn("mailrelay.toml: not valid TOML", self.error("[server\n"))

    def test_missing_file(self) -> None:
        """A missing file is one sentence naming it."""
        with self.assertRaises(ConfigError) as ctx:
            load_config("/nonexistent/mailrelay.toml")
        self.assertIn("cannot read the file", str(ctx.exception))

    def test_half_tls(self) -> None:
        """A certificate without a key (or the reverse) is refused."""
        self.assertIn("tls.private_key: set both", self.error('[tls]\ncertificate = "c.pem"\n'))

    def test_retry_order(self) -> None:
        """retry_max below retry_min is refused."""
        self.assertIn(
            "delivery.retry_max: must not be smaller", self.error("[delivery]\nretry_min = 100\nretry_max = 10\n")
        )

    def test_webhooks(self) -> None:
        """[webhooks] defaults to refusing private URLs; values are read and checked."""
        self.assertFalse(parse_config({}, "m.toml", Path("/")).webhooks.allow_private)
        config = load_config(self.write("[webhooks]\nallow_private = true\nretry_base = 2\n"))
        self.assertEqual((config.webhooks.allow_private, config.webhooks.retry_base), (True, 2.0))
        self.assertIn("webhooks.retry_base: must be greater than 0", self.error("[webhooks]\nretry_base = 0\n"))

    def test_change_poll_interval(self) -> None:
        """[database] change_poll_interval: 1 s by default, 0 allowed (caches only expire), never negative."""
        self.assertEqual(parse_config({}, "m.toml", Path("/")).database.change_poll_interval, 1.0)
        config = load_config(self.write("[database]\nchange_poll_interval = 0\n"))
        self.assertEqual(config.database.change_poll_interval, 0.0)
        self.assertIn("database.change_poll_interval: must be 0", self.error("[database]\nchange_poll_interval = -1\n"))
