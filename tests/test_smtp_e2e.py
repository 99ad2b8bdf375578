"""
End-to-end: the real ``twistd mailrelay`` on loopback, driven by Python's
smtplib (and swaks where installed) as applications and mail clients drive
it.  One relay per test class, set up with the ``mailrelay`` command.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.spool import Spool
from tests.support.relay import RelayProcess


def tls_context() -> ssl.SSLContext:
    # The relay runs on its generated self-signed certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(sender: str = "hello@example.com", to: str = "someone@example.net", subject: str = "Order 1",
            extra: dict[str, str] | None = None, body: str = "Thank you for your order.\n") -> bytes:
    m = EmailMessage()
    m["From"] = sender
    if to:
        m["To"] = to
    m["Subject"] = subject
    for k, v in (extra or {}).items():
        m[k] = v
    m.set_content(body)
    return m.as_bytes()


class RelayFixture:
    """One relay with an account, a verified domain and one credential of each form."""

    relay: ClassVar[RelayProcess]
    creds: ClassVar[dict[str, Any]]
    # Delivery goes to a port nobody listens on: accepted mail stays queued (deferred) for the tests to find.
    extra_config: ClassVar[str] = ("[smtp]\nauth_failures_before_delay = 100\nauth_failures_before_block = 100\n"
                                   '[delivery]\nsmarthost = "127.0.0.1:9"\n')

    def setUp(self) -> None:
        # trial has no setUpClass: the first test of a class in this process starts its relay.
        cls = type(self)
        if "relay" not in cls.__dict__:
            cls.start_relay()

    @classmethod
    def start_relay(cls) -> None:
        import atexit
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="mailrelay-e2e-"))
        cls.relay = relay = RelayProcess(directory, extra=cls.extra_config)
        creds: dict[str, Any] = {}
        relay.mailrelay("account", "create", "shop", "--daily-quota", "1000", stdin="shop-password\n")
        relay.mailrelay("account", "create", "billing", "--parent", "shop", stdin="billing-password\n")
        relay.mailrelay("account", "create", "tiny", "--daily-quota", "2", stdin="tiny-password\n")
        relay.mailrelay("account", "create", "banned", stdin="banned-password\n")
        relay.mailrelay("account", "suspend", "banned")
        for account, domain in (("shop", "example.com"), ("tiny", "tiny.example"), ("banned", "banned.example"),
                                ("shop", "other.example")):
            relay.mailrelay("domain", "add", account, domain)
            relay.mailrelay("domain", "verify", domain, "--force")
        creds["smtp_user"] = relay.mailrelay("smtp-user", "create", "example.com")
        creds["api_token"] = relay.mailrelay("api-token", "create", "example.com")
        creds["api_key"] = relay.mailrelay("api-key", "create", "shop", "--scope", "smtp:send")
        creds["stats_key"] = relay.mailrelay("api-key", "create", "shop", "--scope", "stats:read")
        cls.creds = creds
        relay.start()
        atexit.register(shutil.rmtree, directory, True)
        atexit.register(relay.kill)

    def submission(self, login: tuple[str, str] | None = ("shop", "shop-password"),
                   mode: str = "submission") -> smtplib.SMTP:
        port = self.relay.port(mode)
        client: smtplib.SMTP
        if mode == "submissions":
            client = smtplib.SMTP_SSL("127.0.0.1", port, context=tls_context(), timeout=30)
        else:
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            client.starttls(context=tls_context())
        self.addCleanup(_close, client)  # type: ignore[attr-defined]
        if login:
            client.login(*login)
        return client


def _close(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except Exception:
        client.close()


class SubmissionTests(RelayFixture, SynchronousTestCase):
    def send(self, client: smtplib.SMTP, data: bytes, sender: str = "hello@example.com",
             rcpts: tuple[str, ...] = ("someone@example.net",)) -> tuple[int, bytes]:
        code, _ = client.mail(sender)
        self.assertEqual(code, 250)
        for r in rcpts:
            self.assertEqual(client.rcpt(r)[0], 250)
        return client.data(data)

    def assertQueued(self, reply: tuple[int, bytes]) -> str:
        code, text = reply
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)
        return text.split()[-1].decode()

    def test_starttls_plain(self) -> None:
        """STARTTLS then AUTH PLAIN with the account password; the message is queued."""
        client = self.submission()
        self.assertQueued(self.send(client, message()))

    def test_starttls_login(self) -> None:
        """STARTTLS then AUTH LOGIN with the Username:/Password: prompts Outlook expects."""
        client = smtplib.SMTP("127.0.0.1", self.relay.port("submission"), timeout=30)
        self.addCleanup(_close, client)
        client.starttls(context=tls_context())
        client.ehlo()
        code, prompt = client.docmd("AUTH", "LOGIN")
        self.assertEqual((code, base64.b64decode(prompt)), (334, b"Username:"))
        code, prompt = client.docmd(base64.b64encode(b"shop").decode())
        self.assertEqual((code, base64.b64decode(prompt)), (334, b"Password:"))
        code, text = client.docmd(base64.b64encode(b"shop-password").decode())
        self.assertEqual(code, 235, text)
        self.assertQueued(self.send(client, message()))

    def test_implicit_tls(self) -> None:
        """Port 465 style: TLS from the first byte, then AUTH."""
        client = self.submission(mode="submissions")
        self.assertQueued(self.send(client, message()))

    def test_credential_forms(self) -> None:
        """Sub-account, generated SMTP user, API token as user and password, injection user with an API key."""
        forms = [
            ("shop\\billing", "billing-password"),
            (self.creds["smtp_user"]["username"], self.creds["smtp_user"]["password"]),
            (self.creds["api_token"]["username"], self.creds["api_token"]["password"]),
            ("smtp_injection", self.creds["api_key"]["key"]),
        ]
        for login in forms:
            client = self.submission(login=login)
            sender = "hello@example.com"
            if login[0] == "shop\\billing":
                continue_ = client.mail(sender)  # the sub-account has no domain of its own
                self.assertEqual(continue_[0], 250)
                client.rcpt("x@example.net")
                code, text = client.data(message())
                self.assertEqual((code, text), (550, b"5.7.1 Unconfigured Sending Domain <example.com>"))
                continue
            self.assertQueued(self.send(client, message(sender=sender)))

    def test_wrong_credentials(self) -> None:
        """Wrong password, a key without smtp:send, a revoked-looking token: 535 5.7.8."""
        for login in (("shop", "wrong-password"), ("smtp_injection", self.creds["stats_key"]["key"]),
                      ("mrt_forged", "mrt_forged"), ("nobody", "whatever")):
            client = smtplib.SMTP("127.0.0.1", self.relay.port("submission"), timeout=30)
            self.addCleanup(_close, client)
            client.starttls(context=tls_context())
            with self.assertRaises(smtplib.SMTPAuthenticationError) as ctx:
                client.login(*login)
            self.assertEqual(ctx.exception.smtp_code, 535)
            self.assertIn(b"5.7.8", ctx.exception.smtp_error)

    def test_admin_changes_apply_within_seconds(self) -> None:
        """
        A token revoked and an account suspended with the admin command (another process) stop working within
        a few seconds, though the relay keeps a login for a minute and account facts for half a minute.
        """
        relay = self.relay
        relay.mailrelay("account", "create", "later", stdin="later-password\n")
        relay.mailrelay("domain", "add", "later", "later.example")
        relay.mailrelay("domain", "verify", "later.example", "--force")
        token = relay.mailrelay("api-token", "create", "later.example")
        login = (token["username"], token["password"])
        sender = "hello@later.example"
        self.assertQueued(self.send(self.submission(login=login), message(sender=sender), sender=sender))
        relay.mailrelay("account", "suspend", "later")
        client = self.submission(login=("later", "later-password"))
        self.assertEqual(self._wait_for(lambda: self.send(client, message(sender=sender), sender=sender)[0], 550), 550)
        relay.mailrelay("api-token", "delete", "later.example", str(token["id"]))

        def auth() -> int:
            try:
                self.submission(login=login)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code
            return 235

        self.assertEqual(self._wait_for(auth, 535), 535)

    def _wait_for(self, attempt: Any, wanted: int, within: float = 5.0) -> int:
        """Repeat ``attempt()`` until it returns ``wanted`` or ``within`` seconds have passed; its last result."""
        import time

        deadline = time.monotonic() + within
        while True:
            got = attempt()
            if got == wanted or time.monotonic() > deadline:
                return int(got)
            time.sleep(0.2)

    def test_auth_before_tls(self) -> None:
        """No AUTH before TLS: not advertised, and refused with 538 5.7.11."""
        client = smtplib.SMTP("127.0.0.1", self.relay.port("submission"), timeout=30)
        self.addCleanup(_close, client)
        client.ehlo()
        self.assertFalse(client.has_extn("auth"))
        self.assertTrue(client.has_extn("starttls"))
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0shop\0shop-password").decode())
        self.assertEqual((code, text[:6]), (538, b"5.7.11"))

    def test_auth_required(self) -> None:
        """Submission without AUTH: 530 5.7.0 at MAIL."""
        client = self.submission(login=None)
        client.ehlo()
        code, text = client.mail("hello@example.com")
        self.assertEqual((code, text), (530, b"5.7.0 Authentication required"))

    def test_extensions(self) -> None:
        """EHLO after STARTTLS advertises SIZE, PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8, AUTH."""
        client = self.submission(login=None)
        client.ehlo()
        for ext in ("size", "pipelining", "8bitmime", "enhancedstatuscodes", "smtputf8", "auth"):
            self.assertTrue(client.has_extn(ext), ext)
        self.assertEqual(client.esmtp_features["size"], "31457280")
        self.assertIn("LOGIN", client.esmtp_features["auth"])

    def test_policy_replies(self) -> None:
        """Unconfigured domain, missing From/To, a line that is not a field, bad Reply-To, bad X-MT-ATTR, a suspended
        account: precise 550s."""
        client = self.submission()
        cases = [
            (message(sender="me@admin.example.org"), (550, b"5.7.1 Unconfigured Sending Domain <admin.example.org>")),
            (b"To: a@example.net\r\nSubject: x\r\n\r\nbody\r\n", (550, b"5.6.0 Message must have a From header")),
            (message(to=""), (550, b"5.6.0 Message must have a To header")),
            (b"From: shop@example.com\r\nTo: a@example.net\r\nno colon\r\n\r\nbody\r\n", (550, b"5.6.0 Malformed")),
            (message(extra={"Reply-To": "not an address"}), (550, b"5.1.7 Invalid Reply-To address")),
            (message(extra={"X-MT-ATTR": "{not json"}), (550, b"5.6.0 JSON parsing error in X-MT-ATTR")),
        ]
        for data, (code, prefix) in cases:
            client.mail("hello@example.com")
            client.rcpt("someone@example.net")
            got = client.data(data)
            self.assertEqual(got[0], code, got)
            self.assertTrue(got[1].startswith(prefix), got)
        banned = self.submission(login=("banned", "banned-password"))
        got = self.send(banned, message(sender="x@banned.example"))
        self.assertEqual(got, (550, b"5.7.1 Account is not allowed to send"))

    def test_sender_domain_of_credential(self) -> None:
        """A generated SMTP user sends only from its own domain, even one its account verified."""
        client = self.submission(login=(self.creds["smtp_user"]["username"], self.creds["smtp_user"]["password"]))
        got = self.send(client, message(sender="me@other.example"))
        self.assertEqual(got, (550, b"5.7.1 Unconfigured Sending Domain <other.example>"))
        self.assertQueued(self.send(client, message(sender="me@example.com")))

    def test_sandbox(self) -> None:
        """The sandbox domain is accepted from any approved account without a verified domain."""
        client = self.submission(login=("shop\\billing", "billing-password"))
        self.assertQueued(self.send(client, message(sender="test@sandbox.mailrelay.test")))

    def test_quota(self) -> None:
        """Over the daily quota: 451 4.7.1 with the time it resets."""
        client = self.submission(login=("tiny", "tiny-password"))
        self.assertQueued(self.send(client, message(sender="a@tiny.example")))
        self.assertQueued(self.send(client, message(sender="a@tiny.example")))
        code, text = self.send(client, message(sender="a@tiny.example"))
        self.assertEqual(code, 451)
        self.assertTrue(text.startswith(b"4.7.1 Daily sending quota exceeded, resets at "), text)

    def test_size_limits(self) -> None:
        """A 20 MB attachment passes; SIZE over the limit is 552 5.3.4; the connection stays usable."""
        client = self.submission()
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = "hello@example.com", "someone@example.net", "big"
        m.set_content("see attachment")
        m.add_attachment(b"\x00\x01" * (10 * 1024 * 1024), maintype="application", subtype="octet-stream",
                         filename="big.bin")
        data = m.as_bytes()
        self.assertGreater(len(data), 20 * 1024 * 1024)
        self.assertQueued(self.send(client, data))
        code, text = client.mail("hello@example.com", ["SIZE=999999999"])
        self.assertEqual((code, text[:5]), (552, b"5.3.4"))
        self.assertQueued(self.send(client, message()))

    def test_port25_relay_rules(self) -> None:
        """Port 25 without AUTH: other domains get 554 5.7.1 Relay access denied; never an open relay."""
        client = smtplib.SMTP("127.0.0.1", self.relay.port("smtp"), timeout=30)
        self.addCleanup(_close, client)
        client.ehlo()
        self.assertEqual(client.mail("x@remote.example")[0], 250)
        self.assertEqual(client.rcpt("victim@example.net"), (554, b"5.7.1 Relay access denied"))
        self.assertEqual(client.rcpt("nobody@bounces.relay.test"), (550, b"5.1.1 No such user here"))

    def test_metrics(self) -> None:
        """/metrics counts accepted messages per listener and failed logins, and shows open sessions."""
        import urllib.request

        self.assertQueued(self.send(self.submission(), message()))
        client = smtplib.SMTP("127.0.0.1", self.relay.port("submission"), timeout=30)
        self.addCleanup(_close, client)
        client.starttls(context=tls_context())
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            client.login("shop", "not-the-password")
        url = f"http://127.0.0.1:{self.relay.port('http')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        accepted = [line for line in text.splitlines()
                    if line.startswith('mailrelay_messages_accepted_total{listener="submission"}')]
        self.assertTrue(accepted and float(accepted[0].split()[-1]) >= 1, text[:2000])
        self.assertIn('mailrelay_auth_failures_total{mechanism="PLAIN"}', text)
        self.assertIn('mailrelay_smtp_sessions{listener="submission"}', text)

    def test_swaks(self) -> None:
        """swaks (the tool in the README walk-through) sends with STARTTLS and AUTH LOGIN."""
        swaks = shutil.which("swaks")
        if swaks is None:
            self.fail("swaks is not installed (apt-get install swaks; .ci/run installs it)")
        result = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{self.relay.port('submission')}", "--tls", "--auth", "LOGIN",
             "--auth-user", "smtp_injection", "--auth-password", self.creds["api_key"]["key"],
             "--from", "hello@example.com", "--to", "someone@example.net", "--header", "Subject: swaks"],
            capture_output=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout.decode() + result.stderr.decode())
        self.assertIn(b"250 2.0.0 Ok: queued as", result.stdout)


class ThrottleTests(RelayFixture, SynchronousTestCase):
    extra_config = ('[smtp]\nauth_failures_before_delay = 100\nauth_failures_before_block = 3\n'
                    '[delivery]\nsmarthost = "127.0.0.1:9"\n')

    def test_repeated_failures_refused(self) -> None:
        """After repeated failed logins from one address, even good credentials get 421 4.7.0 for a while."""

        def attempt(password: bytes) -> tuple[int, bytes]:
            client = smtplib.SMTP("127.0.0.1", self.relay.port("submission"), timeout=30)
            self.addCleanup(_close, client)
            client.starttls(context=tls_context())
            client.ehlo()
            return client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0shop\0" + password).decode())

        self.assertEqual(attempt(b"wrong-1")[0], 535)
        self.assertEqual(attempt(b"wrong-2")[0], 535)
        attempt(b"wrong-3")  # the third failure starts the block
        code, text = attempt(b"shop-password")
        self.assertEqual(code, 421)
        self.assertTrue(text.startswith(b"4.7.0"), text)


class CrashTests(RelayFixture, TestCase):
    async def test_kill_after_250(self) -> None:
        """A message answered 250 survives kill -9: after a restart it is in the spool, byte for byte."""
        client = self.submission()
        data = message(subject="survive", body="precious\n")
        client.mail("hello@example.com")
        client.rcpt("someone@example.net")
        code, text = client.data(data)
        self.assertEqual(code, 250)
        queue_id = text.split()[-1].decode()
        self.relay.kill()
        self.relay.start()  # recovers the spool, then serves again
        self.assertIn("spool: 1 message(s) recovered", self.relay.output())
        self.relay.stop()

        from twisted.internet import reactor
        from twisted.python.threadpool import ThreadPool

        threads = ThreadPool(1, 1)
        threads.start()
        self.addCleanup(threads.stop)
        spool = Spool(str(self.relay.data / "spool"), reactor, threads, reactor)
        recovered = await spool.recover()
        self.assertIn(queue_id, [m.queue_id for m in recovered])
        body = await spool.read_message(queue_id)
        self.assertIn(b"Subject: survive", body)
        self.assertIn(b"precious", body)
        self.assertIn(f"id {queue_id}".encode(), body)  # the Received header of this hop
        await spool.close()
        self.relay.start()
