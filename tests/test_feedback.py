"""
Tests for mailrelay.feedback: the sample reports in tests/data/feedback,
end to end, from raw bytes to the event and suppression they lead to.

The samples were written for these tests in the public formats (RFC 3464,
RFC 5965, QSBMF and the providers' text notices); their VERP addresses
and tracking tokens are signed with ``SECRET``.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.events.model import EventType
from mailrelay.feedback import FeedbackReport, parse_feedback
from mailrelay.processing.tokens import TokenSigner

DATA = Path(__file__).parent / "data" / "feedback"
SECRET = b"feedback-fixture-secret-32-bytes"
FBL = "fbl@bounces.relay.example.net"
SIGNER = TokenSigner(SECRET)


def load(name: str, crlf: bool = False) -> bytes:
    """A sample message; ``crlf`` gives it the line endings it has on the wire."""
    data = (DATA / name).read_bytes()
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if crlf else data


def envelope_rcpt(data: bytes) -> str:
    """The VERP address a sample was sent to (its To header), or the feedback-loop address."""
    for line in data.splitlines():
        if line.startswith(b"To: bounces+"):
            return line[4:].decode("ascii").strip()
    return FBL


def parse(name: str, crlf: bool = False, signer: TokenSigner | None = None) -> FeedbackReport:
    data = load(name, crlf)
    return parse_feedback(data, envelope_rcpt(data), SECRET, signer=signer)


class DSNSampleTests(SynchronousTestCase):
    """RFC 3464 reports as Postfix, Exim, Gmail and Microsoft 365 send them."""

    def test_postfix(self) -> None:
        """A Postfix DSN names the recipient, status, folded diagnostic and remote MTA; 5.1.1 is hard."""
        report = parse("postfix-dsn.eml")
        self.assertEqual((report.kind, report.detector), ("dsn", "rfc3464"))
        self.assertEqual((report.queue_id, report.recipient_index), ("5f3a9c1e7b2d4a60", 0))
        self.assertEqual(report.attribution and report.attribution.source, "rcpt")
        self.assertEqual(report.reporting_mta, "mail.example.org")
        [block] = report.recipients
        self.assertEqual(block.recipient, "alice@example.org")
        self.assertEqual(block.original_recipient, "alice@example.org")
        self.assertEqual((block.action, block.status), ("failed", "5.1.1"))
        self.assertEqual(block.diagnostic_type, "smtp")
        self.assertEqual(
            block.diagnostic,
            "550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown in virtual mailbox table",
        )
        self.assertEqual(block.remote_mta, "mx2.example.org")
        self.assertEqual((block.reply.code, block.reply.status), (550, "5.1.1"))
        self.assertEqual(block.category, "hard")
        self.assertEqual(report.original and report.original.message_id, "5f3a9c1e7b2d4a60.0@relay.example.net")

    def test_postfix_outcome(self) -> None:
        """A hard bounce becomes a bounced event of class hard and a hard_bounce suppression."""
        outcome = parse("postfix-dsn.eml").outcome("alice@example.org")
        self.assertEqual(outcome.event, EventType.BOUNCED)
        self.assertEqual(outcome.category, "hard")
        self.assertEqual(outcome.suppression, "hard_bounce")
        self.assertEqual(outcome.detail["class"], "hard")
        self.assertEqual(outcome.detail["status"], "5.1.1")
        self.assertEqual(outcome.detail["remote_mta"], "mx2.example.org")

    def test_postfix_delayed(self) -> None:
        """A delay notice is soft, suppresses nothing and makes no event, though its status is kept."""
        report = parse("postfix-delayed.eml")
        self.assertEqual(report.kind, "dsn")
        [block] = report.recipients
        self.assertEqual((block.action, block.status, block.category), ("delayed", "4.4.1", "soft"))
        self.assertEqual(block.diagnostic_type, "x-postfix")
        self.assertEqual(block.will_retry_until, "Sun,  9 Mar 2025 09:01:40 +0100 (CET)")
        self.assertFalse(block.suppress)
        outcome = report.outcome()
        self.assertIsNone(outcome.event)
        self.assertIsNone(outcome.suppression)
        self.assertEqual(outcome.category, "soft")

    def test_exim_two_recipients(self) -> None:
        """
        Exim's blocks each become a recipient; its diagnostic's 5.2.1 and
        5.7.1 decide the class although Status says 5.0.0, and a
        blocklist refusal is block, not hard.
        """
        report = parse("exim-dsn.eml")
        self.assertEqual((report.queue_id, report.recipient_index), ("5f3a9c1e7b2d4a61", 3))
        bob, carol = report.recipients
        self.assertEqual((bob.recipient, bob.status, bob.reply.status), ("bob@example.net", "5.0.0", "5.2.1"))
        self.assertEqual((bob.category, bob.classification.rule), ("hard", "mailbox-disabled"))
        self.assertEqual(carol.recipient, "carol@example.net")
        self.assertEqual(carol.category, "block")
        self.assertFalse(carol.suppress)

    def test_exim_outcome_per_address(self) -> None:
        """The outcome follows the block of the address asked about: carol is a block, bob a hard bounce."""
        report = parse("exim-dsn.eml")
        carol = report.outcome("carol@example.net")
        self.assertEqual((carol.event, carol.category, carol.suppression), (EventType.BOUNCED, "block", None))
        bob = report.outcome("BOB@example.net")
        self.assertEqual((bob.category, bob.suppression), ("hard", "hard_bounce"))
        # An address the report does not name: the worst block decides.
        self.assertEqual(report.outcome("someone@example.net").category, "hard")

    def test_gmail(self) -> None:
        """Gmail's multi-line reply, folded with 550-5.1.1 on every line, becomes one reply text."""
        report = parse("gmail-dsn.eml")
        [block] = report.recipients
        self.assertEqual(block.recipient, "no.such.user@gmail.example")
        self.assertEqual(block.remote_mta, "gmail-smtp-in.l.google.com")
        self.assertEqual((block.reply.code, block.reply.status), (550, "5.1.1"))
        self.assertTrue(str(block.reply.text).startswith("The email account that you tried to reach does not exist."))
        self.assertNotIn("550-5.1.1", str(block.reply.text))
        self.assertIn("double-checking", str(block.reply.text))
        self.assertEqual(block.category, "hard")
        self.assertEqual((report.queue_id, report.recipient_index), ("7b12c3d4e5f60718", 2))

    def test_microsoft365(self) -> None:
        """A Microsoft 365 NDR is read from its delivery-status part: 5.1.10 RecipientNotFound is hard."""
        report = parse("microsoft365-ndr.eml")
        self.assertEqual(report.kind, "dsn")
        [block] = report.recipients
        self.assertEqual((block.recipient, block.status), ("dana@contoso.example", "5.1.10"))
        self.assertEqual(block.category, "hard")
        self.assertEqual(report.attribution and report.attribution.domain, "rp.shop.example.com")
        self.assertEqual(report.original and report.original.message_id, "6a01b2c3d4e5f608.0@relay.example.net")
        self.assertEqual(report.outcome().suppression, "hard_bounce")

    def test_crlf(self) -> None:
        """Every sample parses to the same report with CRLF line endings as with LF."""
        for path in sorted(DATA.glob("*.eml")):
            self.assertEqual(parse(path.name, crlf=True), parse(path.name), path.name)


class ComplaintSampleTests(SynchronousTestCase):
    """ARF feedback-loop reports, sent to the one feedback address rather than a VERP address."""

    def test_yahoo(self) -> None:
        """Yahoo's report is attributed through Original-Mail-From and makes a complaint and a suppression."""
        report = parse("yahoo-arf.eml")
        self.assertEqual((report.kind, report.detector), ("arf", "rfc5965"))
        complaint = report.complaint
        assert complaint is not None
        self.assertEqual(complaint.feedback_type, "abuse")
        self.assertEqual(complaint.user_agent, "Yahoo!-Mail-Feedback/2.0")
        self.assertEqual(complaint.original_rcpt_to, ("erin@yahoo.example",))
        self.assertEqual(complaint.source_ip, "192.0.2.10")
        self.assertEqual(complaint.reported_domain, ("shop.example.com",))
        self.assertEqual((report.queue_id, report.recipient_index), ("6a01b2c3d4e5f607", 1))
        self.assertEqual(report.attribution and report.attribution.source, "original-mail-from")
        self.assertEqual(report.original and report.original.message_id, "6a01b2c3d4e5f607.1@relay.example.net")
        self.assertEqual(report.original and report.original.subject, "Your order #10587 is on its way")
        outcome = report.outcome()
        self.assertEqual((outcome.event, outcome.suppression), (EventType.COMPLAINED, "complaint"))
        self.assertEqual(outcome.address, "erin@yahoo.example")
        self.assertEqual(outcome.detail["feedback_type"], "abuse")

    def test_aol_redacted(self) -> None:
        """AOL redacts the recipient and sends no Original-Mail-From: the returned Return-Path attributes it."""
        report = parse("aol-arf.eml")
        self.assertEqual(report.kind, "arf")
        self.assertEqual(report.attribution and report.attribution.source, "return-path")
        self.assertEqual((report.queue_id, report.recipient_index), ("8c23d4e5f6071829", 5))
        self.assertEqual(report.complaint and report.complaint.original_rcpt_to, ())
        self.assertEqual(report.complaint and report.complaint.user_agent, "AOL SComp")
        self.assertEqual(report.outcome().suppression, "complaint")

    def test_outlook_headers_only(self) -> None:
        """
        A JMRP report with only the returned headers and no return path is
        attributed through the signed List-Unsubscribe token (which also
        names the account) when a signer is given, and not otherwise.
        """
        report = parse("outlook-arf.eml", signer=SIGNER)
        attribution = report.attribution
        assert attribution is not None
        self.assertEqual(attribution.source, "list-unsubscribe")
        self.assertEqual(
            (attribution.queue_id, attribution.recipient_index, attribution.account_id), ("9d34e5f60718293b", 4, 42)
        )
        self.assertEqual(report.original and report.original.subject, "Your weekly deals \u2728")
        self.assertEqual(report.original and report.original.from_address, "news@shop.example.com")
        self.assertIsNone(parse("outlook-arf.eml").attribution)
        self.assertEqual(parse("outlook-arf.eml").outcome().address, "frank@outlook.example")


class TextBounceSampleTests(SynchronousTestCase):
    """Bounces without a delivery-status part, read through the pattern table."""

    def test_qmail(self) -> None:
        """qmail's paragraphs give each address its reply, or its (#5.1.1) hint when the remote said nothing."""
        report = parse("qmail.eml")
        self.assertEqual((report.kind, report.detector), ("nonstandard", "qmail"))
        ivan, judy = report.recipients
        self.assertEqual(ivan.recipient, "ivan@example.org")
        self.assertEqual(str(ivan.reply), "550 5.1.1 <ivan@example.org>... User unknown")
        self.assertEqual((judy.recipient, judy.status, judy.category), ("judy@example.org", "5.1.1", "hard"))
        self.assertNotIn("orders@shop.example.com", [r.recipient for r in report.recipients])

    def test_exim_text(self) -> None:
        """Old Exim text: the folded SMTP error is found; "Unrouteable address" alone is a hard failure."""
        report = parse("exim-text.eml")
        bob, dave = report.recipients
        self.assertEqual(bob.reply.code, 550)
        self.assertEqual(bob.status, "5.1.1")
        self.assertIn("User unknown in local recipient table", str(bob.reply.text))
        self.assertEqual(
            (dave.recipient, dave.diagnostic, dave.category), ("dave@example.net", "Unrouteable address", "hard")
        )

    def test_postfix_without_report(self) -> None:
        """Old Postfix: an "expanded from" recipient and a mailbox-full reply (soft) and a blocklisting (block)."""
        report = parse("postfix-old.eml")
        leo, mallory = report.recipients
        self.assertEqual((leo.recipient, leo.reply.code, leo.category), ("leo@example.org", 552, "soft"))
        self.assertNotIn("in reply to", str(leo.reply.text))
        self.assertEqual((mallory.recipient, mallory.category), ("mallory@example.org", "block"))
        self.assertIsNone(report.outcome().suppression)

    def test_yahoo_text(self) -> None:
        """Yahoo's old notice: "doesn't have a ... account" with 554 and no enhanced code is hard."""
        [block] = parse("yahoo-text.eml").recipients
        self.assertEqual((block.recipient, block.reply.code, block.category), ("kim@yahoo.example", 554, "hard"))

    def test_gmail_text(self) -> None:
        """Gmail's text-only notice: the address from the sentence, the reply after "was:", 5.2.2 is soft."""
        report = parse("gmail-text.eml")
        self.assertEqual(report.detector, "gmail")
        [block] = report.recipients
        self.assertEqual(block.recipient, "grace@workspace.example")
        self.assertEqual((block.reply.code, block.reply.status, block.category), (552, "5.2.2", "soft"))
        self.assertIn("OverQuotaPerm", str(block.reply.text))

    def test_exchange_text(self) -> None:
        """Exchange's old NDR: the address line and the reply inside "<host #5.1.1 smtp;550 ...>"."""
        [block] = parse("exchange-text.eml").recipients
        self.assertEqual(block.recipient, "henry@fabrikam.example")
        self.assertEqual(str(block.reply), "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found")
        self.assertEqual(block.category, "hard")

    def test_domino_extraction(self) -> None:
        """Domino: the address after "was not delivered to:" and the reason after "because:"."""
        report = parse("domino.eml")
        self.assertEqual(report.detector, "domino")
        [block] = report.recipients
        self.assertEqual(block.recipient, "nina@corp.example")
        self.assertEqual(block.diagnostic, "User nina (nina@corp.example) not listed in Domino Directory")
        self.assertEqual(block.reply.code, 550)

    def test_domino_class(self) -> None:
        """'not listed in Domino Directory' is a dead mailbox and must be hard."""
        [block] = parse("domino.eml").recipients
        self.assertEqual(block.category, "hard")


class NotABounceSampleTests(SynchronousTestCase):
    """Auto-replies and garbage are recognised as what they are and make no event."""

    def test_vacation(self) -> None:
        """A vacation reply (Auto-Submitted, X-Autoreply) is an autoreply: no recipient, no event."""
        report = parse("vacation.eml")
        self.assertEqual(report.kind, "autoreply")
        self.assertEqual(report.recipients, ())
        self.assertIn("Auto-Submitted", report.reason)
        self.assertIsNone(report.outcome().event)
        self.assertEqual(report.queue_id, "9d34e5f60718293a")

    def test_outlook_automatic_reply(self) -> None:
        """Outlook's "Automatic reply:" carries no RFC 3834 header; its subject marks it."""
        self.assertEqual(parse("outlook-autoreply.eml").kind, "autoreply")

    def test_garbage(self) -> None:
        """Binary garbage with a broken report header is unknown, with a reason and the defects met."""
        report = parse("garbage.eml")
        self.assertEqual(report.kind, "unknown")
        self.assertTrue(report.reason)
        self.assertIn("multipart without a boundary parameter", report.defects)
        self.assertIsNone(report.outcome().event)

    def test_report_without_recipients(self) -> None:
        """A delivery-status part with no recipient block is unknown and says so, but keeps the VERP attribution."""
        report = parse("broken-report.eml")
        self.assertEqual(report.kind, "unknown")
        self.assertIn("without any recipient block", report.reason)
        self.assertIn("multipart without a closing boundary", report.defects)
        self.assertEqual(report.queue_id, "5f3a9c1e7b2d4a60")
