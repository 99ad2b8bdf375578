"""
Tests for mailrelay.smtp.protocol: the ESMTP server protocol.

Every twisted.mail server bug listed in ARCHITECTURE.md has a regression test
here (search for "Regression").
"""

from __future__ import annotations

import base64
import itertools
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test.iosim import FakeAddress
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailrelay.interfaces import IMessageReceiver, ISMTPDelegate
from mailrelay.smtp import protocol, replies
from mailrelay.smtp.protocol import ServerSettings
from mailrelay.types import MailParams, Reply, SMTPReplyError
from tests.support.smtp_fakes import (
    ALICE,
    QUEUED,
    FakeDelegate,
    FakeReceiver,
    Harness,
    login_session,
)

HOST = "mx.example.com"
PLAIN_ALICE = base64.b64encode(b"\0alice\0secret")


def settings_(**kwargs: object) -> ServerSettings:
    return ServerSettings(hostname=HOST, **kwargs)  # type: ignore[arg-type]


def plaintext_harness(**kwargs: object) -> Harness:
    """A harness where AUTH works without TLS, so tests can log in on a StringTransport."""
    kwargs.setdefault("allow_plaintext_auth", True)
    return Harness(settings=settings_(**kwargs))


def in_data(harness: Harness, mail: bytes = b"<a@example.com>") -> FakeReceiver:
    """Open a transaction up to the 354 and return the receiver."""
    harness.lines()
    harness.send(b"EHLO client.example.org\r\nMAIL FROM:" + mail + b"\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    codes = harness.codes()
    assert codes == [250, 250, 250, 354], codes
    return harness.delegate.receivers[-1]


class FakesTests(SynchronousTestCase):
    """The fakes used below provide the interfaces they stand in for."""

    def test_interfaces(self) -> None:
        """FakeDelegate and FakeReceiver verify against ISMTPDelegate and IMessageReceiver."""
        self.assertTrue(verifyObject(ISMTPDelegate, FakeDelegate()))
        self.assertTrue(verifyObject(IMessageReceiver, FakeReceiver()))


class SettingsTests(SynchronousTestCase):
    """ServerSettings defaults follow the listener."""

    def test_listener_defaults(self) -> None:
        """Submission listeners require AUTH; submissions is implicit TLS; smtp neither."""
        smtp = ServerSettings(hostname=HOST)
        submission = ServerSettings(hostname=HOST, listener="submission")
        submissions = ServerSettings(hostname=HOST, listener="submissions")
        self.assertEqual((smtp.require_auth, smtp.implicit_tls), (False, False))
        self.assertEqual((submission.require_auth, submission.implicit_tls), (True, False))
        self.assertEqual((submissions.require_auth, submissions.implicit_tls), (True, True))
        self.assertEqual(smtp.max_message_size, 26214400)
        self.assertEqual(smtp.max_recipients, 1000)

    def test_invalid(self) -> None:
        """An unknown listener, a non-positive limit or a host name that could forge replies is refused."""
        self.assertRaises(ValueError, ServerSettings, hostname=HOST, listener="lmtp")
        self.assertRaises(ValueError, ServerSettings, hostname=HOST, max_recipients=0)
        self.assertRaises(ValueError, ServerSettings, hostname="mx.example.com\r\n250 forged")
        self.assertRaises(ValueError, ServerSettings, hostname="")


class GreetingTests(SynchronousTestCase):
    """The connection opening: delegate, session, greeting."""

    def test_greeting(self) -> None:
        """The greeting names the host and no version."""
        h = Harness()
        self.assertEqual(h.lines(), ["220 mx.example.com ESMTP mailrelay ready"])

    def test_session(self) -> None:
        """connection_made gets a SessionInfo with the peer address and listener, before the greeting."""
        h = Harness(settings=settings_(listener="submission"))
        name, session = h.delegate.calls[0]
        self.assertEqual(name, "connection_made")
        self.assertEqual(
            (session.client_ip, session.client_port, session.listener, session.server_hostname, session.tls),
            ("192.0.2.7", 40000, "submission", HOST, False),
        )

    def test_address_without_host(self) -> None:
        """An address with no .host (iosim's FakeAddress) becomes "unknown"."""
        h = Harness(peer=FakeAddress())
        self.assertEqual(h.delegate.calls[0][1].client_ip, "unknown")
        self.assertEqual(h.codes(), [220])

    def test_deferred_connection_made(self) -> None:
        """The greeting waits for connection_made's Deferred; early input waits too."""
        delegate = FakeDelegate()
        d: Deferred[None] = Deferred()
        delegate.connect_result = d
        h = Harness(delegate=delegate)
        h.send(b"NOOP\r\n")
        self.assertEqual(h.lines(), [])
        d.callback(None)
        self.assertEqual(h.codes(), [220, 250])

    def test_refused(self) -> None:
        """SMTPReplyError from connection_made is sent and the connection closed."""
        delegate = FakeDelegate()
        delegate.connect_result = SMTPReplyError(Reply(421, "4.7.0", "Go away"), close=True)
        h = Harness(delegate=delegate)
        self.assertEqual(h.lines(), ["421 4.7.0 Go away"])
        self.assertTrue(h.transport.disconnecting)
        h.close()
        self.assertEqual(delegate.names(), ["connection_made", "connection_lost"])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_connection_made_fails(self) -> None:
        """Any other failure in connection_made is logged and answered 421."""
        delegate = FakeDelegate()
        delegate.connect_result = RuntimeError("database down")
        h = Harness(delegate=delegate)
        self.assertEqual(h.codes(), [421])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class EhloTests(SynchronousTestCase):
    """EHLO/HELO and the advertised extensions."""

    def test_extensions(self) -> None:
        """
        Regression (twisted.mail advertised none): SIZE, 8BITMIME, PIPELINING,
        ENHANCEDSTATUSCODES and SMTPUTF8 are advertised; no STARTTLS without a
        context, no AUTH without TLS.
        """
        h = Harness()
        h.lines()
        lines = h.ehlo()
        self.assertEqual(
            lines,
            [
                "250-mx.example.com",
                "250-SIZE 26214400",
                "250-8BITMIME",
                "250-PIPELINING",
                "250-ENHANCEDSTATUSCODES",
                "250 SMTPUTF8",
            ],
        )

    def test_starttls_advertised(self) -> None:
        """With a TLS context and no TLS yet, STARTTLS is offered and AUTH is not."""
        h = Harness(tls_context=object())
        h.lines()
        keywords = [line[4:] for line in h.ehlo()]
        self.assertIn("STARTTLS", keywords)
        self.assertNotIn("AUTH PLAIN LOGIN", keywords)

    def test_size_setting(self) -> None:
        """SIZE advertises the configured limit."""
        h = Harness(settings=settings_(max_message_size=1000))
        h.lines()
        self.assertIn("250-SIZE 1000", h.ehlo())

    def test_plaintext_auth_allowed(self) -> None:
        """allow_plaintext_auth offers AUTH PLAIN LOGIN without TLS."""
        h = plaintext_harness()
        h.lines()
        self.assertEqual(h.ehlo()[-1], "250 AUTH PLAIN LOGIN")

    def test_helo(self) -> None:
        """HELO answers with the host name only, and a transaction may follow."""
        h = Harness()
        h.lines()
        h.send(b"HELO client.example.org\r\n")
        self.assertEqual(h.lines(), ["250 mx.example.com"])
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.codes(), [250])
        self.assertEqual(h.delegate.calls[-1][1].helo, "client.example.org")
        self.assertFalse(h.delegate.calls[-1][1].esmtp)

    def test_no_argument(self) -> None:
        """EHLO and HELO without a name get 501."""
        h = Harness()
        h.lines()
        h.send(b"EHLO\r\nHELO \r\n")
        self.assertEqual(h.lines(), [str(replies.HELO_SYNTAX)] * 2)

    def test_case_insensitive(self) -> None:
        """Commands are case-insensitive."""
        h = Harness()
        h.lines()
        h.send(b"ehlo x.example\r\nnOoP\r\nmail from:<a@example.com>\r\n")
        self.assertEqual(h.codes(), [250, 250, 250])

    def test_ehlo_resets_transaction(self) -> None:
        """A second EHLO ends the transaction in progress."""
        h = Harness()
        h.lines()
        h.send(b"EHLO a.example\r\nMAIL FROM:<a@example.com>\r\nEHLO b.example\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(h.codes(), [250, 250, 250, 503])


class StartTLSTests(SynchronousTestCase):
    """STARTTLS on a transport that records startTLS (real TLS is in test_smtp_tls)."""

    def setUp(self) -> None:
        self.context = object()
        self.h = Harness(tls_context=self.context)
        self.h.lines()
        self.h.ehlo()

    def test_starttls(self) -> None:
        """STARTTLS answers 220 2.0.0 and then starts TLS with the factory's context."""
        self.h.send(b"STARTTLS\r\n")
        self.assertEqual(self.h.lines(), ["220 2.0.0 Ready to start TLS"])
        self.assertIs(self.h.transport.tls_context, self.context)

    def test_injection_discarded(self) -> None:
        """
        Regression (STARTTLS command injection, RFC 3207 4.2): a command
        pipelined in plaintext after STARTTLS is thrown away, not run.
        """
        self.h.send(b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(self.h.lines(), ["220 2.0.0 Ready to start TLS"])
        self.assertEqual(self.h.transport.tls_started_at, len(self.h.transport.value()))
        self.assertNotIn("validate_from", self.h.delegate.names())

    def test_reset_after_starttls(self) -> None:
        """
        Regression (no reset after STARTTLS): EHLO must be sent again, and the
        next EHLO offers AUTH but no STARTTLS.
        """
        self.h.send(b"MAIL FROM:<a@example.com>\r\nSTARTTLS\r\n")
        self.h.lines()
        self.h.send(b"RCPT TO:<b@example.net>\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(self.h.lines(), [str(replies.NEED_MAIL), str(replies.SEND_HELO_FIRST)])
        keywords = [line[4:] for line in self.h.ehlo()]
        self.assertIn("AUTH PLAIN LOGIN", keywords)
        self.assertNotIn("STARTTLS", keywords)
        self.h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(self.h.codes(), [250])
        session = self.h.delegate.calls[-1][1]
        self.assertTrue(session.tls)
        self.assertEqual(session.helo, "client.example.org")

    def test_principal_forgotten(self) -> None:
        """A login made before STARTTLS (plaintext allowed) does not survive it."""
        h = Harness(settings=settings_(allow_plaintext_auth=True, require_auth=True), tls_context=object())
        login_session(h)
        h.send(b"STARTTLS\r\n")
        h.lines()
        h.ehlo()
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.lines(), [str(replies.AUTH_REQUIRED)])

    def test_twice(self) -> None:
        """STARTTLS once TLS is active is a bad sequence."""
        self.h.send(b"STARTTLS\r\n")
        self.h.lines()
        self.h.ehlo()
        self.h.send(b"STARTTLS\r\n")
        self.assertEqual(self.h.lines(), [str(replies.TLS_ALREADY_ACTIVE)])

    def test_argument(self) -> None:
        """STARTTLS takes no argument."""
        self.h.send(b"STARTTLS now\r\n")
        self.assertEqual(self.h.lines(), [str(replies.NO_ARGUMENTS)])
        self.assertIsNone(self.h.transport.tls_started_at)

    def test_not_available(self) -> None:
        """Without a TLS context STARTTLS is 502."""
        h = Harness()
        h.lines()
        h.ehlo()
        h.send(b"STARTTLS\r\n")
        self.assertEqual(h.lines(), [str(replies.TLS_NOT_AVAILABLE)])

    def test_implicit_tls(self) -> None:
        """On an implicit-TLS listener the session is TLS, STARTTLS is not offered, AUTH is."""
        h = Harness(settings=settings_(listener="submissions"), tls_context=object())
        self.assertTrue(h.delegate.calls[0][1].tls)
        h.lines()
        keywords = [line[4:] for line in h.ehlo()]
        self.assertNotIn("STARTTLS", keywords)
        self.assertIn("AUTH PLAIN LOGIN", keywords)
        h.send(b"STARTTLS\r\n")
        self.assertEqual(h.codes(), [503])


class AuthTests(SynchronousTestCase):
    """AUTH PLAIN and LOGIN."""

    def setUp(self) -> None:
        self.h = plaintext_harness()
        self.h.lines()
        self.h.ehlo()

    def auth_call(self) -> tuple[object, ...]:
        calls = [c for c in self.h.delegate.calls if c[0] == "authenticate"]
        self.assertEqual(len(calls), 1)
        return calls[0][2:]

    def test_not_before_tls(self) -> None:
        """Regression (AUTH offered and accepted before TLS): 538 5.7.11, delegate not asked."""
        h = Harness(tls_context=object())
        h.lines()
        self.assertNotIn("250 AUTH PLAIN LOGIN", h.ehlo())
        h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(h.lines(), ["538 5.7.11 Encryption required for requested authentication mechanism"])
        self.assertNotIn("authenticate", h.delegate.names())

    def test_plain_initial_response(self) -> None:
        """AUTH PLAIN with an initial response: 235 and the principal is on the session."""
        self.h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(self.h.lines(), ["235 2.7.0 Authentication successful"])
        self.assertEqual(self.auth_call(), ("PLAIN", "alice", "secret"))
        self.h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.h.lines()
        self.assertEqual(self.h.delegate.calls[-1][1].principal.account_name, "alice")

    def test_plain_continuation(self) -> None:
        """AUTH PLAIN without a response gets an empty 334 challenge."""
        self.h.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.h.transport.value()[-6:], b"334 \r\n")
        self.h.lines()
        self.h.send(PLAIN_ALICE + b"\r\n")
        self.assertEqual(self.h.codes(), [235])

    def test_plain_authzid(self) -> None:
        """An authzid equal to the username is fine; a different one is refused with 535."""
        self.h.send(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret") + b"\r\n")
        self.assertEqual(self.h.lines(), [str(replies.AUTHZID_REFUSED)])
        self.assertNotIn("authenticate", self.h.delegate.names())
        self.h.send(b"AUTH PLAIN " + base64.b64encode(b"alice\0alice\0secret") + b"\r\n")
        self.assertEqual(self.h.codes(), [235])

    def test_plain_malformed(self) -> None:
        """A PLAIN response without two NULs is 501 5.5.2."""
        self.h.send(b"AUTH PLAIN " + base64.b64encode(b"alice secret") + b"\r\n")
        self.assertEqual(self.h.lines(), [str(replies.AUTH_MALFORMED)])

    def test_login(self) -> None:
        """AUTH LOGIN prompts Username: and Password: in base64, as Outlook expects."""
        self.h.send(b"AUTH LOGIN\r\n")
        self.assertEqual(self.h.lines(), ["334 VXNlcm5hbWU6"])
        self.h.send(base64.b64encode(b"alice") + b"\r\n")
        self.assertEqual(self.h.lines(), ["334 UGFzc3dvcmQ6"])
        self.h.send(base64.b64encode(b"secret") + b"\r\n")
        self.assertEqual(self.h.codes(), [235])
        self.assertEqual(self.auth_call(), ("LOGIN", "alice", "secret"))

    def test_login_initial_response(self) -> None:
        """AUTH LOGIN with the username given goes straight to the password prompt."""
        self.h.send(b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n")
        self.assertEqual(self.h.lines(), ["334 UGFzc3dvcmQ6"])
        self.h.send(base64.b64encode(b"secret") + b"\r\n")
        self.assertEqual(self.h.codes(), [235])

    def test_cancel(self) -> None:
        """'*' at any prompt cancels with 501 5.0.0."""
        self.h.send(b"AUTH LOGIN\r\n*\r\nAUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n*\r\n")
        self.assertEqual(
            self.h.lines(),
            [
                "334 VXNlcm5hbWU6",
                "501 5.0.0 Authentication cancelled",
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "501 5.0.0 Authentication cancelled",
            ],
        )
        self.assertNotIn("authenticate", self.h.delegate.names())

    def test_bad_base64(self) -> None:
        """Data that is not base64 gets 501 5.5.2."""
        self.h.send(b"AUTH PLAIN not*base64\r\nAUTH LOGIN\r\n%%%\r\n")
        self.assertEqual(
            self.h.lines(), [str(replies.AUTH_BAD_BASE64), "334 VXNlcm5hbWU6", str(replies.AUTH_BAD_BASE64)]
        )

    def test_invalid_credentials(self) -> None:
        """UnauthorizedLogin from the delegate is 535 5.7.8 and AUTH may be tried again."""
        self.h.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
        self.assertEqual(self.h.lines(), ["535 5.7.8 Authentication credentials invalid"])
        self.h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(self.h.codes(), [235])

    def test_failures_counted(self) -> None:
        """Failed logins count as errors: the max_errors-th ends the connection with 421."""
        h = plaintext_harness(max_errors=3)
        h.lines()
        h.ehlo()
        bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n"
        h.send(bad * 3)
        self.assertEqual(h.codes(), [535, 535, 421])
        self.assertTrue(h.transport.disconnecting)

    def test_reply_error(self) -> None:
        """SMTPReplyError from authenticate is sent as is, closing when asked."""
        self.h.delegate.auth_result = SMTPReplyError(Reply(421, "4.7.0", "Too many failures"), close=True)
        self.h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nNOOP\r\n")
        self.assertEqual(self.h.lines(), ["421 4.7.0 Too many failures"])
        self.assertTrue(self.h.transport.disconnecting)

    def test_deferred_authenticate(self) -> None:
        """Commands pipelined after AUTH wait for a Deferred answer."""
        d: Deferred[object] = Deferred()
        self.h.delegate.auth_result = d
        self.h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(self.h.lines(), [])
        d.callback(ALICE)
        self.assertEqual(self.h.codes(), [235, 250])

    def test_sequence(self) -> None:
        """AUTH twice, during a transaction, before EHLO or after HELO is 503 5.5.1."""
        h = plaintext_harness()
        h.lines()
        h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nHELO x.example\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(h.lines(), [str(replies.SEND_EHLO_FIRST), "250 mx.example.com", str(replies.SEND_EHLO_FIRST)])
        self.h.send(b"MAIL FROM:<a@example.com>\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\nRSET\r\n")
        self.assertEqual(self.h.lines()[1], str(replies.AUTH_IN_TRANSACTION))
        self.h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(self.h.lines(), [str(replies.AUTH_SUCCESSFUL), str(replies.ALREADY_AUTHENTICATED)])

    def test_unknown_mechanism(self) -> None:
        """An unknown mechanism is 504 5.5.4."""
        self.h.send(b"AUTH CRAM-MD5\r\nAUTH\r\n")
        self.assertEqual(self.h.lines(), [str(replies.AUTH_MECHANISM_UNKNOWN), str(replies.AUTH_SYNTAX)])

    def test_long_auth_line(self) -> None:
        """AUTH lines may be up to 12288 octets; longer ones are 500 5.5.2."""
        response = base64.b64encode(b"\0alice\0" + b"p" * 8900)
        self.assertGreater(len(response), 11800)
        self.h.send(b"AUTH PLAIN " + response + b"\r\n")
        self.assertEqual(self.h.codes(), [535])  # decoded, checked, refused: not "too long"
        self.h.send(b"AUTH PLAIN " + b"A" * 12300 + b"\r\n")
        self.assertEqual(self.h.lines(), [str(replies.LINE_TOO_LONG)])

    def test_secrets_not_logged(self) -> None:
        """A failing authenticate is logged without the password or the base64 blob."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.h.delegate.auth_result = RuntimeError("credential store down")
        blob = base64.b64encode(b"\0alice\0hunter2-password")
        self.h.send(b"AUTH PLAIN " + blob + b"\r\n")
        self.h.send(b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n")
        self.h.send(base64.b64encode(b"hunter2-password") + b"\r\n")
        self.assertEqual(self.h.codes(), [451, 334, 334, 451])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(events)
        for event in events:
            text = (formatEvent(event) or "") + repr(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += failure.getTraceback()  # type: ignore[attr-defined]
            self.assertNotIn("hunter2", text)
            self.assertNotIn(blob.decode(), text)


class MailTests(SynchronousTestCase):
    """MAIL FROM and its parameters."""

    def setUp(self) -> None:
        self.h = Harness()
        self.h.lines()
        self.h.ehlo()

    def mail(self, arg: bytes) -> list[str]:
        self.h.send(b"MAIL " + arg + b"\r\n")
        lines = self.h.lines()
        if lines and lines[0].startswith("250"):
            self.h.send(b"RSET\r\n")
            self.h.lines()
        return lines

    def last_from(self) -> tuple[object, ...]:
        return [c for c in self.h.delegate.calls if c[0] == "validate_from"][-1][2:]

    def test_accepted(self) -> None:
        """A plain sender is validated by the delegate and accepted with 250 2.1.0."""
        self.assertEqual(self.mail(b"FROM:<Alice@Example.com>"), ["250 2.1.0 Sender accepted"])
        self.assertEqual(self.last_from(), ("Alice@Example.com", MailParams()))

    def test_null_sender(self) -> None:
        """The null reverse path <> is allowed."""
        self.assertEqual(self.mail(b"FROM:<>"), [str(replies.SENDER_OK)])
        self.assertEqual(self.last_from()[0], "")

    def test_lenient_forms(self) -> None:
        """A space after the colon, a bare address and a source route are accepted."""
        self.assertEqual(self.mail(b"FROM: <a@example.com>"), [str(replies.SENDER_OK)])
        self.assertEqual(self.mail(b"FROM:a@example.com"), [str(replies.SENDER_OK)])
        self.assertEqual(self.mail(b"FROM:<@relay.example:a@example.com>"), [str(replies.SENDER_OK)])
        self.assertEqual(self.last_from()[0], "a@example.com")
        self.assertEqual(self.mail(b'FROM:<"john doe>x"@example.com>'), [str(replies.SENDER_OK)])
        self.assertEqual(self.last_from()[0], '"john doe>x"@example.com')

    def test_parameters(self) -> None:
        """
        Regression (parameters ignored): SIZE, BODY and SMTPUTF8 reach the
        delegate in MailParams; AUTH= (RFC 4954) is accepted and ignored.
        """
        self.mail(b"FROM:<a@example.com> SIZE=1234 BODY=8bitmime SMTPUTF8 AUTH=<>")
        self.assertEqual(self.last_from()[1], MailParams(size=1234, body="8BITMIME", smtputf8=True))
        self.mail(b"FROM:<a@example.com> body=7BIT")
        self.assertEqual(self.last_from()[1], MailParams(body="7BIT"))

    def test_size_too_big(self) -> None:
        """A declared SIZE over the limit is 552 5.3.4 before the delegate is asked."""
        self.assertEqual(self.mail(b"FROM:<a@example.com> SIZE=26214401"), [str(replies.MESSAGE_TOO_BIG)])
        self.assertNotIn("validate_from", self.h.delegate.names())

    def test_unknown_parameter(self) -> None:
        """Unknown parameters and BODY=BINARYMIME are 555 5.5.4."""
        self.assertEqual(self.mail(b"FROM:<a@example.com> RET=HDRS"), [str(replies.UNKNOWN_PARAMETER)])
        self.assertEqual(self.mail(b"FROM:<a@example.com> BODY=BINARYMIME"), [str(replies.UNKNOWN_PARAMETER)])

    def test_bad_parameters(self) -> None:
        """A malformed SIZE, SMTPUTF8 with a value or a repeated keyword is 501."""
        for arg in (b"SIZE=12k", b"SIZE=", b"SMTPUTF8=yes", b"SIZE=1 SIZE=2"):
            self.assertEqual(self.mail(b"FROM:<a@example.com> " + arg), [str(replies.PARAMETER_SYNTAX)], arg)

    def test_bad_syntax(self) -> None:
        """Malformed paths are 501 5.1.7; a missing FROM: is 501 5.5.4."""
        for arg in (
            b"FROM:<a@example.com",
            b"FROM:<a@@example.com>",
            b"FROM:<a@>",
            b"FROM:<@example.com>",
            b"FROM:<a b@example.com>",
            b"FROM:<a@example.com>junk",
            b"FROM:<a@exa_mple.com>",
            b"FROM:<a..b@example.com>",
        ):
            self.assertEqual(self.mail(arg), [str(replies.BAD_SENDER_SYNTAX)], arg)
        self.assertEqual(self.mail(b"TO:<a@example.com>"), [str(replies.MAIL_SYNTAX)])
        self.assertEqual(self.mail(b"FROM:<a@[192.0.2.1]>"), [str(replies.SENDER_OK)])

    def test_non_ascii(self) -> None:
        """A non-ASCII address needs SMTPUTF8 (553 5.6.7 without it)."""
        address = "rené@exämple.com".encode()
        self.assertEqual(self.mail(b"FROM:<" + address + b">"), [str(replies.NON_ASCII_ADDRESS)])
        self.assertEqual(self.mail(b"FROM:<" + address + b"> SMTPUTF8"), [str(replies.SENDER_OK)])
        self.assertEqual(self.last_from()[0], "rené@exämple.com")
        self.assertEqual(self.mail(b"FROM:<a@example.com>\xff"), [str(replies.INVALID_UTF8)])

    def test_nested(self) -> None:
        """A second MAIL in a transaction is 503."""
        self.h.send(b"MAIL FROM:<a@example.com>\r\nMAIL FROM:<b@example.com>\r\n")
        self.assertEqual(self.h.lines(), [str(replies.SENDER_OK), str(replies.NESTED_MAIL)])

    def test_before_helo(self) -> None:
        """MAIL before EHLO/HELO is 503."""
        h = Harness()
        h.lines()
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.lines(), [str(replies.SEND_HELO_FIRST)])

    def test_auth_required(self) -> None:
        """With require_auth, MAIL without a login is 530 5.7.0; after AUTH it works."""
        h = plaintext_harness(require_auth=True)
        h.lines()
        h.ehlo()
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.lines(), ["530 5.7.0 Authentication required"])
        h.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.codes(), [235, 250])

    def test_refused(self) -> None:
        """The delegate's refusal is sent and no transaction starts."""
        self.h.delegate.from_result = SMTPReplyError(Reply(550, "5.7.1", "Sender domain not allowed"))
        self.h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(self.h.lines(), ["550 5.7.1 Sender domain not allowed", str(replies.NEED_MAIL)])

    def test_delegate_crash(self) -> None:
        """Any other exception from the delegate is 451 4.3.0 and logged."""
        self.h.delegate.from_result = KeyError("oops")
        self.assertEqual(self.mail(b"FROM:<a@example.com>"), [str(replies.INTERNAL_ERROR)])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_line_limits(self) -> None:
        """MAIL lines may have 1024 octets, 2048 with SMTPUTF8."""
        prefix = b"MAIL FROM:<a@example.com> AUTH="
        fits = prefix + b"x" * (1022 - len(prefix))
        self.assertEqual(self.mail(fits[5:]), [str(replies.SENDER_OK)])
        self.assertEqual(self.mail(fits[5:] + b"x"), [str(replies.LINE_TOO_LONG)])
        utf8 = prefix + b"x" * 1500 + b" SMTPUTF8"
        self.assertEqual(self.mail(utf8[5:]), [str(replies.SENDER_OK)])


class RcptTests(SynchronousTestCase):
    """RCPT TO and the envelope."""

    def setUp(self) -> None:
        self.h = Harness(settings=settings_(max_recipients=3))
        self.h.lines()
        self.h.ehlo()
        self.h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.h.lines()

    def to_calls(self) -> list[tuple[object, ...]]:
        return [c[2:] for c in self.h.delegate.calls if c[0] == "validate_to"]

    def test_accumulate(self) -> None:
        """Accepted recipients accumulate in the envelope the delegate sees."""
        self.h.send(b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n")
        self.assertEqual(self.h.lines(), [str(replies.RECIPIENT_OK)] * 2)
        (env1, addr1), (env2, addr2) = self.to_calls()
        self.assertEqual((env1.rcpt_to, addr1), ((), "b@example.net"))
        self.assertEqual((env2.mail_from, env2.rcpt_to, addr2), ("a@example.com", ("b@example.net",), "c@example.net"))

    def test_refused_not_added(self) -> None:
        """A refused recipient is answered with the delegate's reply and left out."""
        self.h.delegate.to_result = lambda s, e, a: (
            SMTPReplyError(Reply(550, "5.1.1", "No such user")) if a.startswith("x") else None
        )
        self.h.send(b"RCPT TO:<x@example.net>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n")
        self.assertEqual(self.h.codes(), [550, 250, 354])
        self.assertEqual(self.h.delegate.calls[-1][2].rcpt_to, ("y@example.net",))

    def test_too_many(self) -> None:
        """Recipients beyond max_recipients get 452 4.5.3."""
        self.h.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(4)))
        self.assertEqual(self.h.lines()[-1], "452 4.5.3 Too many recipients")
        self.assertEqual(len(self.to_calls()), 3)

    def test_duplicate(self) -> None:
        """A repeated recipient is accepted once and delivered once."""
        self.h.send(b"RCPT TO:<b@example.net>\r\nRCPT TO:<B@EXAMPLE.NET>\r\nDATA\r\n")
        self.assertEqual(self.h.codes(), [250, 250, 354])
        self.assertEqual(len(self.to_calls()), 1)
        self.assertEqual(self.h.delegate.calls[-1][2].rcpt_to, ("b@example.net",))

    def test_postmaster(self) -> None:
        """<Postmaster> without a domain is a valid recipient."""
        self.h.send(b"RCPT TO:<Postmaster>\r\n")
        self.assertEqual(self.h.codes(), [250])
        self.assertEqual(self.to_calls()[0][1], "postmaster")

    def test_syntax(self) -> None:
        """Bad recipient syntax is 501 5.1.3; parameters are 555; <> is refused."""
        self.h.send(
            b"RCPT TO:<b@>\r\nRCPT TO:<>\r\nRCPT TO:<b@example.net> NOTIFY=NEVER\r\nRCPT FROM:<b@x.example>\r\n"
        )
        self.assertEqual(
            self.h.lines(),
            [str(replies.BAD_RECIPIENT_SYNTAX)] * 2 + [str(replies.UNKNOWN_PARAMETER), str(replies.RCPT_SYNTAX)],
        )

    def test_non_ascii(self) -> None:
        """A non-ASCII recipient needs an SMTPUTF8 transaction."""
        self.h.send("RCPT TO:<jürgen@example.net>\r\n".encode())
        self.assertEqual(self.h.lines(), [str(replies.NON_ASCII_ADDRESS)])
        self.h.send(b"RSET\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n" + "RCPT TO:<jürgen@example.net>\r\n".encode())
        self.assertEqual(self.h.codes(), [250, 250, 250])

    def test_before_mail(self) -> None:
        """RCPT without MAIL is 503."""
        self.h.send(b"RSET\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(self.h.lines(), [str(replies.RESET_OK), str(replies.NEED_MAIL)])


class DataTests(SynchronousTestCase):
    """DATA: streaming, dot-unstuffing, the end marker and the final reply."""

    def test_message(self) -> None:
        """The body streams to the receiver unstuffed, without the final dot line; finish's reply is sent."""
        h = Harness()
        receiver = in_data(h)
        h.send(b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n")
        self.assertEqual(h.lines(), ["250 2.0.0 Ok: queued as TEST1"])
        self.assertEqual(receiver.data, b"Subject: hi\r\n\r\n.leading dot\r\n")
        self.assertTrue(receiver.finished)
        self.assertEqual(receiver.aborted, 0)

    def test_streams(self) -> None:
        """Message bytes reach the receiver as they arrive, before the end marker."""
        h = Harness()
        receiver = in_data(h)
        h.send(b"Subject: hi\r\n\r\nfirst part\r\n")
        self.assertEqual(receiver.data, b"Subject: hi\r\n\r\nfirst part\r\n")
        h.send(b"second part\r\n")
        self.assertEqual(receiver.writes, 2)
        self.assertFalse(receiver.finished)
        h.send(b".\r\n")
        self.assertTrue(receiver.finished)

    def test_empty_message(self) -> None:
        """A message with no lines at all is delivered as empty."""
        h = Harness()
        receiver = in_data(h)
        h.send(b".\r\n")
        self.assertEqual(h.codes(), [250])
        self.assertEqual(receiver.data, b"")

    def test_transaction_reset(self) -> None:
        """After the DATA reply the transaction is over; EHLO and login are kept."""
        h = plaintext_harness(require_auth=True)
        login_session(h)
        h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n.\r\nRCPT TO:<c@example.net>\r\n")
        self.assertEqual(h.codes(), [250, 250, 354, 250, 503])
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.codes(), [250])

    def test_no_recipients(self) -> None:
        """DATA without accepted recipients is 554 5.5.1; without MAIL 503."""
        h = Harness()
        h.lines()
        h.ehlo()
        h.send(b"DATA\r\nMAIL FROM:<a@example.com>\r\nDATA\r\nDATA x\r\n")
        self.assertEqual(
            h.lines(),
            [
                str(replies.NEED_MAIL),
                str(replies.SENDER_OK),
                str(replies.NO_VALID_RECIPIENTS),
                str(replies.NO_ARGUMENTS),
            ],
        )

    def test_open_refused(self) -> None:
        """open_message's SMTPReplyError (queue full) is sent; what follows are commands again."""
        h = Harness()
        h.delegate.open_result = SMTPReplyError(Reply(451, "4.3.1", "Queue full, try again later"))
        h.lines()
        h.send(b"EHLO x.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(h.codes(), [250, 250, 250, 451, 250, 221])

    def test_finish_reply_error(self) -> None:
        """finish() failing with SMTPReplyError sends that reply."""
        h = Harness()
        receiver = in_data(h)
        receiver.finish_result = SMTPReplyError(Reply(452, "4.3.1", "Spool full"))
        h.send(b"x\r\n.\r\n")
        self.assertEqual(h.lines(), ["452 4.3.1 Spool full"])

    def test_finish_crash(self) -> None:
        """finish() failing otherwise is 451 4.3.0, logged; the connection goes on."""
        h = Harness()
        receiver = in_data(h)
        receiver.finish_result = OSError("disk full")
        h.send(b"x\r\n.\r\nNOOP\r\n")
        self.assertEqual(h.lines(), [str(replies.INTERNAL_ERROR), str(replies.OK)])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_deferred_finish(self) -> None:
        """The reply waits for finish's Deferred; pipelined commands wait behind it."""
        h = Harness()
        receiver = in_data(h)
        d: Deferred[Reply] = Deferred()
        receiver.finish_result = d
        h.send(b"x\r\n.\r\nNOOP\r\n")
        self.assertEqual(h.lines(), [])
        d.callback(QUEUED)
        self.assertEqual(h.codes(), [250, 250])

    def test_every_split_point(self) -> None:
        """
        Regression (lone dot / leading dot at a chunk boundary): the message
        comes out the same however the stream is cut in two, and the end
        marker is found exactly once.
        """
        stream = b"a\r\n..\r\n...x\r\n.b\r\n\r\n.\r\nNOOP\r\n"
        expected = b"a\r\n.\r\n..x\r\nb\r\n\r\n"
        for cut in range(len(stream) + 1):
            h = Harness()
            receiver = in_data(h)
            h.send(stream[:cut])
            h.send(stream[cut:])
            self.assertEqual(receiver.data, expected, cut)
            self.assertEqual(h.codes(), [250, 250], cut)
            self.assertEqual(h.delegate.names().count("open_message"), 1)

    def test_one_byte_chunks(self) -> None:
        """One octet per dataReceived gives the same message."""
        stream = b"Subject: x\r\n\r\n..\r\nline\r\n.\r\nNOOP\r\n"
        h = Harness()
        receiver = in_data(h)
        for i in range(len(stream)):
            h.send(stream[i : i + 1])
        self.assertEqual(receiver.data, b"Subject: x\r\n\r\n.\r\nline\r\n")
        self.assertEqual(h.codes(), [250, 250])

    def test_smuggling(self) -> None:
        """
        SMTP smuggling: a dot line next to a bare CR or LF never ends the
        message nor starts a second one; the whole is refused with 554 5.6.0.
        """
        for sequence in (b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\r"):
            for chunk in (None, 1):
                stream = (
                    b"Subject: real\r\n\r\nbody"
                    + sequence
                    + b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                    + b"Subject: smuggled\r\n\r\n.\r\nNOOP\r\n"
                )
                h = Harness()
                receiver = in_data(h)
                if chunk is None:
                    h.send(stream)
                else:
                    for i in range(len(stream)):
                        h.send(stream[i : i + 1])
                self.assertEqual(h.lines(), [str(replies.SMUGGLING), str(replies.OK)], sequence)
                self.assertEqual(receiver.aborted, 1)
                self.assertFalse(receiver.finished)
                self.assertEqual(h.delegate.names().count("validate_from"), 1)
                self.assertEqual(h.delegate.names().count("open_message"), 1)

    def test_bare_newlines_without_dot(self) -> None:
        """Bare CR and LF elsewhere are passed on unchanged, and never end the message."""
        h = Harness()
        receiver = in_data(h)
        h.send(b"a\nb\rc\n\rd\r\n.x\n.y\r.z\r\n.\r\n")
        self.assertEqual(h.codes(), [250])
        self.assertEqual(receiver.data, b"a\nb\rc\n\rd\r\nx\n.y\r.z\r\n")

    def test_too_big(self) -> None:
        """Over max_message_size: abort at once, read to the end, 552 5.3.4; the connection stays usable."""
        h = Harness(settings=settings_(max_message_size=1000))
        receiver = in_data(h)
        h.send(b"x" * 500 + b"\r\n")
        h.send(b"y" * 600 + b"\r\nQUIT\r\n")
        self.assertEqual(receiver.aborted, 1)
        self.assertEqual(h.lines(), [])
        h.send(b".\r\n")
        self.assertEqual(h.lines(), [str(replies.MESSAGE_TOO_BIG)])
        self.assertFalse(h.transport.disconnecting)
        self.assertLessEqual(receiver.size, 1000)
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(h.codes(), [250])

    def test_long_line_stays_in_data(self) -> None:
        """
        Regression (an over-long line inside DATA flipped back to command
        mode): the rest of the message is still message, refused at its end
        with 554 5.6.0.
        """
        h = Harness()
        receiver = in_data(h)
        h.send(b"x" * 5000 + b"\r\nRSET\r\nQUIT\r\n")
        self.assertEqual(h.lines(), [])
        self.assertEqual(receiver.aborted, 1)
        h.send(b".\r\nNOOP\r\n")
        self.assertEqual(h.lines(), [str(replies.DATA_LINE_TOO_LONG), str(replies.OK)])
        self.assertFalse(h.transport.disconnecting)

    def test_line_limit_exact(self) -> None:
        """998 octets of text pass (999 with a transparency dot); 999 octets of text do not."""
        for line, ok in (
            (b"x" * 998, True),
            (b"." + b"x" * 998, True),
            (b"x" * 999, False),
            (b".." + b"x" * 998, False),
        ):
            h = Harness()
            receiver = in_data(h)
            h.send(b"a\r\n" + line + b"\r\nb\r\n.\r\n")
            self.assertEqual(h.codes(), [250 if ok else 554], len(line))
            self.assertEqual(receiver.aborted, 0 if ok else 1)

    def test_long_line_across_chunks(self) -> None:
        """A long line is found even when it arrives in many small chunks."""
        h = Harness()
        receiver = in_data(h)
        for _ in range(20):
            h.send(b"x" * 50)
        h.send(b"\r\n.\r\n")
        self.assertEqual(h.codes(), [554])
        self.assertEqual(receiver.aborted, 1)

    def test_long_line_inside_a_big_chunk(self) -> None:
        """
        A line of 999 octets among short lines, in one chunk of about 20 KB,
        is found wherever it starts (the check looks at one octet in 500
        first, so every offset against that spacing is tried).
        """
        short = b"y" * 76 + b"\r\n"
        for offset in range(0, 520, 13):
            for length, ok in ((998, True), (999, False)):
                h = Harness()
                receiver = in_data(h)
                body = b"z" * offset + b"\r\n" + short * 120 + b"x" * length + b"\r\n" + short * 120
                h.send(body + b".\r\n")
                self.assertEqual(h.codes(), [250 if ok else 554], (offset, length))
                self.assertEqual(receiver.aborted, 0 if ok else 1)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=1300), min_size=1, max_size=8))
    def test_property_long_line_check(self, lengths: list[int]) -> None:
        """``_has_long_line`` agrees with splitting into every line, for lines around the limit."""
        data = b"\n".join(b"x" * n for n in lengths)
        data = b"\n" + data + b"\n"
        expected = max(lengths) > protocol._MAX_RAW_LINE
        self.assertEqual(protocol._has_long_line(data, 1, len(data) - 1), expected)

    def test_twenty_megabytes(self) -> None:
        """A 20 MB message in 64 KB chunks passes whole, in many writes, and fast."""
        h = Harness()
        h.delegate.keep_data = False
        receiver = in_data(h)
        line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
        body = line * (20 * 1000 * 1000 // len(line))
        for i in range(0, len(body), 65536):
            h.send(body[i : i + 65536])
        h.send(b".\r\n")
        self.assertEqual(h.codes(), [250])
        self.assertEqual(receiver.size, len(body))
        self.assertGreater(receiver.writes, 100)

    def test_receiver_write_fails(self) -> None:
        """A receiver that raises in write is aborted and the message refused with 451."""
        h = Harness()
        receiver = in_data(h)

        def broken(data: bytes) -> None:
            raise OSError("disk full")

        receiver.write = broken  # type: ignore[method-assign]
        h.send(b"x\r\n.\r\n")
        self.assertEqual(h.lines(), [str(replies.INTERNAL_ERROR)])
        self.assertEqual(receiver.aborted, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


_PIECES = st.sampled_from([b"a", b"b.", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n.."])


def _reference(stream: bytes) -> tuple[bytes | None, bool, bytes] | None:
    """
    A deliberately simple model of DATA: (message, smuggled, rest), or None
    while the end marker has not arrived.
    """
    s = b"\r\n" + stream
    end = s.find(b"\r\n.\r\n")
    if end < 0:
        return None
    content = s[: end + 2]
    smuggled = any(
        content[i : i + 1] == b"." and content[i - 1 : i] in (b"\r", b"\n") and content[i + 1 : i + 2] in (b"\r", b"\n")
        for i in range(1, len(content) - 1)
    )
    lines = content[2:].split(b"\r\n")[:-1]
    message = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return message, smuggled, s[end + 5 :]


class DataModelTests(SynchronousTestCase):
    """The DATA reader against a simple model, on random streams and random cuts."""

    @settings(max_examples=400, deadline=None)
    @given(
        pieces=st.lists(_PIECES, max_size=30),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    )
    def test_model(self, pieces: list[bytes], cuts: list[int]) -> None:
        """Any stream, cut anywhere, gives the model's message, verdict and leftover."""
        stream = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"
        expected = _reference(stream)
        assert expected is not None
        message, smuggled, rest = expected
        h = Harness()
        receiver = in_data(h)
        points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
        for start, stop in itertools.pairwise(points):
            h.send(stream[start:stop])
        codes = h.codes()
        if smuggled:
            self.assertEqual(codes[0], 554)
            self.assertEqual(receiver.aborted, 1)
        else:
            self.assertEqual(codes[0], 250)
            self.assertEqual(receiver.data, message)
        # What followed the end marker ran as commands, as on a fresh connection.
        oracle = Harness()
        in_data(oracle)
        oracle.send(b".\r\n")
        oracle.lines()
        oracle.send(rest)
        self.assertEqual(codes[1:], oracle.codes())


class PipeliningTests(SynchronousTestCase):
    """Replies in order, input held while a decision is pending."""

    def test_deferred_validate_to(self) -> None:
        """
        Regression (pipelined MAIL/RCPT/DATA with Deferred validators got 503
        and the body ran as commands): replies come in order once the
        Deferred fires, and the body goes to the receiver.
        """
        h = Harness()
        h.lines()
        h.ehlo()
        pending: Deferred[None] = Deferred()
        h.delegate.to_result = lambda s, e, a: pending if a == "b@example.net" else None
        h.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
            b"Subject: hi\r\n\r\nRSET\r\nQUIT\r\n.\r\n"
        )
        self.assertEqual(h.codes(), [250])
        pending.callback(None)
        self.assertEqual(h.codes(), [250, 250, 354, 250])
        self.assertEqual(h.delegate.receivers[0].data, b"Subject: hi\r\n\r\nRSET\r\nQUIT\r\n")
        self.assertEqual(h.delegate.calls[-1][2].rcpt_to, ("b@example.net", "c@example.net"))
        self.assertFalse(h.transport.disconnecting)

    def test_deferred_open_message(self) -> None:
        """A body pipelined behind a DATA whose receiver comes later goes to that receiver."""
        h = Harness()
        h.lines()
        h.ehlo()
        opened: Deferred[FakeReceiver] = Deferred()
        h.delegate.open_result = opened
        h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nbody\r\n.\r\nNOOP\r\n")
        self.assertEqual(h.codes(), [250, 250])
        receiver = FakeReceiver()
        opened.callback(receiver)
        self.assertEqual(h.codes(), [354, 250, 250])
        self.assertEqual(receiver.data, b"body\r\n")

    def test_deferred_refusal(self) -> None:
        """A Deferred that fails later with SMTPReplyError is answered in its place in the order."""
        h = Harness()
        h.lines()
        h.ehlo()
        pending: Deferred[None] = Deferred()
        h.delegate.to_result = lambda s, e, a: pending if a == "b@example.net" else None
        h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n")
        pending.errback(SMTPReplyError(Reply(450, "4.2.1", "Mailbox busy, try later")))
        self.assertEqual(
            h.lines(), [str(replies.SENDER_OK), "450 4.2.1 Mailbox busy, try later", str(replies.RECIPIENT_OK)]
        )

    def test_refused_data_then_commands(self) -> None:
        """If DATA is refused, the client's following lines are commands (RFC 2920)."""
        h = Harness()
        h.lines()
        h.ehlo()
        h.delegate.to_result = SMTPReplyError(Reply(550, "5.1.1", "No such user"))
        h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nNOOP\r\n")
        self.assertEqual(h.codes(), [250, 550, 554, 250])

    def test_one_write_per_burst(self) -> None:
        """Replies ready together go out in one transport write."""
        h = Harness()
        h.lines()
        h.ehlo()
        writes: list[bytes] = []
        original = h.transport.write

        def counting(data: bytes) -> None:
            writes.append(data)
            original(data)

        h.transport.write = counting  # type: ignore[method-assign]
        h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual(h.codes(), [250, 250, 250, 354])

    def test_flood_pauses_reading(self) -> None:
        """A client flooding commands while a decision waits is paused, not buffered without limit."""
        h = Harness()
        h.lines()
        h.ehlo()
        pending: Deferred[None] = Deferred()
        h.delegate.from_result = pending
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        chunk = b"NOOP\r\n" * 10000
        for _ in range(10):
            h.send(chunk)
            if h.transport.producerState == "paused":
                break
        self.assertEqual(h.transport.producerState, "paused")
        self.assertLess(len(h.protocol._buffer), 256 * 1024 + len(chunk))
        pending.callback(None)
        self.assertEqual(h.transport.producerState, "producing")
        codes = h.codes()
        self.assertEqual(codes[0], 250)
        self.assertEqual(set(codes[1:]), {250})
        self.assertEqual(len(h.protocol._buffer), 0)


class LineLengthTests(SynchronousTestCase):
    """Command line limits."""

    def test_512(self) -> None:
        """A command line of 512 octets with CRLF passes; 513 is 500 5.5.2."""
        h = Harness()
        h.lines()
        h.send(b"NOOP " + b"x" * 505 + b"\r\n")
        h.send(b"NOOP " + b"x" * 506 + b"\r\n")
        self.assertEqual(h.lines(), [str(replies.OK), "500 5.5.2 Line too long"])

    def test_huge_line(self) -> None:
        """
        Regression (a 16 MiB line without CRLF cost 352 replies and +50 MB):
        one reply, a buffer that stays small, and the connection goes on.
        """
        h = Harness()
        h.lines()
        chunk = b"x" * 65536
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            peak = 0
            for _ in range(256):
                h.send(chunk)
                self.assertLessEqual(len(h.protocol._buffer), len(chunk))
                peak = max(peak, tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        self.assertLess(peak - before, 512 * 1024)
        self.assertEqual(h.lines(), ["500 5.5.2 Line too long"])
        h.send(b"tail of the line\r\nNOOP\r\n")
        self.assertEqual(h.lines(), [str(replies.OK)])

    def test_long_line_in_buffer(self) -> None:
        """An over-long line followed by commands in the same chunk: the commands still run."""
        h = Harness()
        h.lines()
        h.send(b"x" * 20000 + b"\r\nNOOP\r\n")
        self.assertEqual(h.codes(), [500, 250])

    def test_bare_lf(self) -> None:
        """Command lines ending in a bare LF are accepted."""
        h = Harness()
        h.lines()
        h.send(b"EHLO x.example\nNOOP\n")
        self.assertEqual(h.codes(), [250, 250])


class CommandTests(SynchronousTestCase):
    """The small commands and error handling."""

    def setUp(self) -> None:
        self.h = Harness()
        self.h.lines()

    def test_simple_commands(self) -> None:
        """Regression (NOOP and VRFY not implemented): RSET, NOOP, VRFY, EXPN, HELP answer as documented."""
        self.h.send(b"RSET\r\nNOOP\r\nNOOP hello\r\nVRFY someone\r\nVRFY\r\nEXPN list\r\nHELP\r\n")
        self.assertEqual(
            self.h.lines(),
            [
                "250 2.0.0 Transaction reset",
                "250 2.0.0 OK",
                "250 2.0.0 OK",
                "252 2.5.0 Cannot verify the address, but will accept a message for it and attempt delivery",
                str(replies.VRFY_SYNTAX),
                str(replies.EXPN_NOT_AVAILABLE),
                str(replies.HELP),
            ],
        )

    def test_quit(self) -> None:
        """QUIT answers 221 2.0.0 and closes; nothing after it runs."""
        self.h.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(self.h.lines(), ["221 2.0.0 Goodbye, closing connection"])
        self.assertTrue(self.h.transport.disconnecting)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_unknown_and_unsupported(self) -> None:
        """Unknown commands are 500 5.5.1; known but unsupported ones (BDAT) 502 5.5.1."""
        self.h.send(b"FROB\r\nBDAT 100 LAST\r\n\r\n")
        self.assertEqual(
            self.h.lines(), [str(replies.UNKNOWN_COMMAND), str(replies.NOT_IMPLEMENTED), str(replies.UNKNOWN_COMMAND)]
        )

    def test_too_many_errors(self) -> None:
        """The max_errors-th error is answered 421 4.7.0 and the connection closed."""
        h = Harness(settings=settings_(max_errors=3))
        h.lines()
        h.send(b"FROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
        self.assertEqual(
            h.lines(), [str(replies.UNKNOWN_COMMAND)] * 2 + ["421 4.7.0 Too many errors, closing connection"]
        )
        self.assertTrue(h.transport.disconnecting)

    def test_http(self) -> None:
        """An HTTP request is not SMTP: 421 and close at once."""
        self.h.send(b"POST / HTTP/1.1\r\nHost: mx.example.com\r\n")
        self.assertEqual(self.h.lines(), [str(replies.NOT_SMTP)])
        self.assertTrue(self.h.transport.disconnecting)

    def test_rset_argument(self) -> None:
        """RSET takes no argument."""
        self.h.send(b"RSET x\r\n")
        self.assertEqual(self.h.lines(), [str(replies.NO_ARGUMENTS)])


class TimeoutTests(SynchronousTestCase):
    """Timeouts on the injected clock, and no timer left behind."""

    def test_idle(self) -> None:
        """Idle in command state: 421 4.4.2 and close; no delayed call left."""
        h = Harness()
        h.lines()
        h.clock.advance(299)
        h.send(b"NOOP\r\n")
        h.clock.advance(299)
        self.assertEqual(h.codes(), [250])
        h.clock.advance(1)
        self.assertEqual(h.lines(), ["421 4.4.2 Timeout exceeded, closing connection"])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.close()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.delegate.names()[-1], "connection_lost")

    def test_data_block(self) -> None:
        """No DATA bytes for data_block_timeout: 421, and the receiver is aborted when the connection ends."""
        h = Harness(settings=settings_(data_block_timeout=60))
        receiver = in_data(h)
        h.clock.advance(59)
        h.send(b"some text\r\n")
        h.clock.advance(59)
        self.assertEqual(h.lines(), [])
        h.clock.advance(1)
        self.assertEqual(h.codes(), [421])
        h.close()
        self.assertEqual(receiver.aborted, 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_data_end(self) -> None:
        """finish() slower than data_end_timeout: 451 4.4.2, receiver aborted, the connection goes on."""
        h = Harness()
        receiver = in_data(h)
        d: Deferred[Reply] = Deferred()
        receiver.finish_result = d
        h.send(b"x\r\n.\r\nNOOP\r\n")
        h.clock.advance(599)
        self.assertEqual(h.lines(), [])
        h.clock.advance(1)
        self.assertEqual(h.lines(), [str(replies.QUEUE_TIMEOUT), str(replies.OK)])
        self.assertEqual(receiver.aborted, 1)
        d.callback(QUEUED)
        self.assertEqual(h.lines(), [])
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)  # the idle timer again
        h.close()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_slow_finish_within_time(self) -> None:
        """A finish() slower than command_timeout but within data_end_timeout is fine."""
        h = Harness()
        receiver = in_data(h)
        d: Deferred[Reply] = Deferred()
        receiver.finish_result = d
        h.send(b"x\r\n.\r\n")
        h.clock.advance(400)
        d.callback(QUEUED)
        self.assertEqual(h.codes(), [250])
        self.assertFalse(h.transport.disconnecting)

    def test_lost_during_data(self) -> None:
        """The connection dropping mid-message aborts the receiver and tells the delegate."""
        h = Harness()
        receiver = in_data(h)
        h.send(b"partial")
        h.close()
        self.assertEqual(receiver.aborted, 1)
        self.assertEqual(h.delegate.names()[-1], "connection_lost")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_lost_while_waiting(self) -> None:
        """A decision answering after the connection ended is ignored."""
        h = Harness()
        h.lines()
        h.ehlo()
        d: Deferred[None] = Deferred()
        h.delegate.from_result = d
        h.send(b"MAIL FROM:<a@example.com>\r\n")
        h.close()
        d.callback(None)
        self.assertEqual(h.lines(), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])


class FactoryTests(SynchronousTestCase):
    """Connection limits."""

    def test_per_address_limit(self) -> None:
        """Over max_connections_per_ip: 421 4.7.0, closed, no delegate; a slot frees on close."""
        first = Harness(settings=settings_(max_connections_per_ip=2))
        factory, clock = first.factory, first.clock
        second = factory.buildProtocol(None)
        t2 = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40001))
        second.makeConnection(t2)
        third = factory.buildProtocol(None)
        t3 = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40002))
        third.makeConnection(t3)
        self.assertEqual(t3.value(), replies.TOO_MANY_CONNECTIONS_FROM_ADDRESS.to_bytes())
        self.assertTrue(t3.disconnecting)
        self.assertEqual(first.delegate.names().count("connection_made"), 2)
        other = factory.buildProtocol(None)
        t4 = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 1))
        other.makeConnection(t4)
        self.assertTrue(t4.value().startswith(b"220 "))
        first.close()
        third.connectionLost(None)
        self.assertEqual(factory.connections_from("192.0.2.7"), 1)
        fifth = factory.buildProtocol(None)
        t5 = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40003))
        fifth.makeConnection(t5)
        self.assertTrue(t5.value().startswith(b"220 "))
        self.assertEqual(factory.active_connections, 3)
        for proto in (second, other, fifth):
            proto.connectionLost(None)
        self.assertEqual(factory.active_connections, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_total_limit(self) -> None:
        """Over max_connections: 421 4.7.0 for everyone."""
        first = Harness(settings=settings_(max_connections=1))
        second = first.factory.buildProtocol(None)
        t2 = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 1))
        second.makeConnection(t2)
        self.assertEqual(t2.value(), replies.TOO_MANY_CONNECTIONS.to_bytes())
        self.assertTrue(t2.disconnecting)
