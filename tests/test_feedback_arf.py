"""Tests for mailrelay.feedback.arf and complaint attribution."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.events.model import EventType
from mailrelay.feedback import Outcome, parse_feedback
from mailrelay.feedback.arf import parse_feedback_fields
from mailrelay.processing.tokens import TokenSigner, verp_address

SECRET = b"a" * 32
OLD_SECRET = b"o" * 32
FBL = "fbl@bounces.relay.example.net"
VERP = verp_address("0123456789abcdef", 7, "bounces.relay.example.net", SECRET)
SIGNER = TokenSigner(SECRET)


def arf(
    fields: str,
    original: str = "",
    original_type: str = "message/rfc822",
    report_type: str = "feedback-report",
    feedback_ctype: str = "message/feedback-report",
) -> bytes:
    """A minimal ARF report around a feedback-report body and a returned message."""
    return (
        "From: fbl@isp.example\n"
        f"To: {FBL}\n"
        "Subject: Abuse report\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="arf"\n'
        "\n--arf\nContent-Type: text/plain\n\nThis is an abuse report.\n"
        f"\n--arf\nContent-Type: {feedback_ctype}\n\n{fields}\n"
        f"\n--arf\nContent-Type: {original_type}\n\n{original}\n--arf--\n"
    ).encode()


ORIGINAL = (
    "From: Shop <news@shop.example.com>\n"
    "To: user@isp.example\n"
    "Subject: Deals\n"
    "Message-ID: <q1.0@relay.example.net>\n"
    "\n"
    "Hello.\n"
)


class FeedbackFieldTests(SynchronousTestCase):
    """The message/feedback-report body."""

    def test_all_fields(self) -> None:
        """Every RFC 5965 field is read; repeated fields are all kept."""
        complaint, defects = parse_feedback_fields(
            "Feedback-Type: Fraud\nUser-Agent: SomeGenerator/1.0\nVersion: 1\n"
            f"Original-Mail-From: <{VERP}>\nOriginal-Rcpt-To: <a@isp.example>\nOriginal-Rcpt-To: b@isp.example\n"
            "Original-Envelope-Id: env-1\nArrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\n"
            "Reporting-MTA: dns; mail.isp.example\nSource-IP: 192.0.2.1\nIncidents: 3\n"
            "Reported-Domain: shop.example.com\nReported-URI: http://shop.example.com/x\n"
            "Reported-URI: mailto:x@shop.example.com\n"
        )
        self.assertEqual(defects, ())
        self.assertEqual(complaint.feedback_type, "fraud")
        self.assertEqual(complaint.original_mail_from, VERP)
        self.assertEqual(complaint.original_rcpt_to, ("a@isp.example", "b@isp.example"))
        self.assertEqual(complaint.original_envelope_id, "env-1")
        self.assertEqual(complaint.reporting_mta, "mail.isp.example")
        self.assertEqual(complaint.incidents, 3)
        self.assertEqual(complaint.reported_uri, ("http://shop.example.com/x", "mailto:x@shop.example.com"))
        self.assertTrue(complaint.suppress)

    def test_missing_type(self) -> None:
        """A report without Feedback-Type (pre-ARF loops) is taken as abuse, and the defect is noted."""
        complaint, defects = parse_feedback_fields("User-Agent: OldLoop\n")
        self.assertEqual(complaint.feedback_type, "abuse")
        self.assertTrue(defects)

    def test_bad_incidents(self) -> None:
        """A non-numeric Incidents field is dropped rather than failing the report."""
        complaint, _ = parse_feedback_fields("Feedback-Type: abuse\nIncidents: many\n")
        self.assertIsNone(complaint.incidents)


class ComplaintOutcomeTests(SynchronousTestCase):
    """What each feedback type becomes."""

    def outcome_for(self, feedback_type: str) -> Outcome:
        report = parse_feedback(
            arf(f"Feedback-Type: {feedback_type}\nOriginal-Mail-From: {VERP}\n", ORIGINAL), FBL, SECRET
        )
        self.assertEqual(report.kind, "arf")
        return report.outcome()

    def test_abuse_and_fraud_suppress(self) -> None:
        """abuse and fraud are complaints that suppress the recipient."""
        for kind in ("abuse", "fraud"):
            outcome = self.outcome_for(kind)
            self.assertEqual((outcome.event, outcome.suppression), (EventType.COMPLAINED, "complaint"), kind)

    def test_virus_and_other_do_not_suppress(self) -> None:
        """virus and other are recorded as complaints but do not suppress."""
        for kind in ("virus", "other"):
            outcome = self.outcome_for(kind)
            self.assertEqual((outcome.event, outcome.suppression), (EventType.COMPLAINED, None), kind)

    def test_not_spam_is_no_complaint(self) -> None:
        """not-spam and auth-failure reports make no event."""
        for kind in ("not-spam", "auth-failure"):
            outcome = self.outcome_for(kind)
            self.assertIsNone(outcome.event, kind)
            self.assertIsNone(outcome.suppression, kind)

    def test_arf_wins_over_bounce_patterns(self) -> None:
        """A report whose text part quotes bounce wording is still read as the complaint it is."""
        data = arf("Feedback-Type: abuse\n", ORIGINAL).replace(
            b"This is an abuse report.", b"This message was created automatically by mail delivery software"
        )
        self.assertEqual(parse_feedback(data, FBL, SECRET).kind, "arf")

    def test_mislabelled_feedback_part(self) -> None:
        """report-type=feedback-report with a text/plain second part is still read as the feedback fields."""
        report = parse_feedback(arf("Feedback-Type: fraud\n", ORIGINAL, feedback_ctype="text/plain"), FBL, SECRET)
        self.assertEqual(report.complaint and report.complaint.feedback_type, "fraud")


class AttributionTests(SynchronousTestCase):
    """Which message and recipient a complaint is about, when the VERP envelope recipient is gone."""

    def test_original_mail_from(self) -> None:
        """Original-Mail-From carries the VERP address."""
        report = parse_feedback(arf(f"Feedback-Type: abuse\nOriginal-Mail-From: <{VERP}>\n", ORIGINAL), FBL, SECRET)
        self.assertEqual(report.attribution and report.attribution.source, "original-mail-from")
        self.assertEqual((report.queue_id, report.recipient_index), ("0123456789abcdef", 7))

    def test_return_path_headers_only(self) -> None:
        """The Return-Path of a text/rfc822-headers part is used when no field names the VERP address."""
        report = parse_feedback(
            arf("Feedback-Type: abuse\n", f"Return-Path: <{VERP}>\n" + ORIGINAL, original_type="text/rfc822-headers"),
            FBL,
            SECRET,
        )
        self.assertEqual(report.attribution and report.attribution.source, "return-path")
        self.assertEqual(report.original and report.original.message_id, "q1.0@relay.example.net")

    def test_received_envelope_from(self) -> None:
        """A VERP address anywhere in the returned headers (Exim's envelope-from comment) is found."""
        original = f"Received: from relay (envelope-from <{VERP}>) by mx\n" + ORIGINAL
        report = parse_feedback(arf("Feedback-Type: abuse\n", original), FBL, SECRET)
        self.assertEqual(report.attribution and report.attribution.source, "report-text")

    def test_forged_verp(self) -> None:
        """A VERP address signed with another secret, or tampered with, attributes nothing."""
        forged = verp_address("0123456789abcdef", 7, "bounces.relay.example.net", b"x" * 32)
        report = parse_feedback(arf(f"Feedback-Type: abuse\nOriginal-Mail-From: {forged}\n", ORIGINAL), FBL, SECRET)
        self.assertIsNone(report.attribution)
        tampered = VERP.replace("bounces+", "bounces+a", 1)
        self.assertIsNone(parse_feedback(b"Subject: x\n\nhi", tampered, SECRET).attribution)

    def test_rotated_secret(self) -> None:
        """Addresses signed with an older secret still attribute while it is in the verifying list."""
        old = verp_address("0123456789abcdef", 1, "bounces.relay.example.net", OLD_SECRET)
        report = parse_feedback(b"Subject: x\n\nhi", old, [SECRET, OLD_SECRET])
        self.assertEqual((report.queue_id, report.recipient_index), ("0123456789abcdef", 1))

    def test_tracking_link(self) -> None:
        """A signed click or open token in the returned body attributes the complaint and names the account."""
        token = SIGNER.click(9, "fedcba9876543210", 3, 0, "https://shop.example.com/")
        original = ORIGINAL + f"Click https://t.relay.example.net/c/{token} now\n"
        report = parse_feedback(arf("Feedback-Type: abuse\n", original), FBL, SECRET, signer=SIGNER)
        attribution = report.attribution
        assert attribution is not None
        self.assertEqual(
            (attribution.source, attribution.queue_id, attribution.recipient_index, attribution.account_id),
            ("tracking-link", "fedcba9876543210", 3, 9),
        )

    def test_foreign_tracking_token(self) -> None:
        """A token signed by someone else's signer attributes nothing."""
        token = TokenSigner(b"z" * 32).open(9, "fedcba9876543210", 3)
        original = ORIGINAL + f"<img src=https://t.example/o/{token}>\n"
        report = parse_feedback(arf("Feedback-Type: abuse\n", original), FBL, SECRET, signer=SIGNER)
        self.assertIsNone(report.attribution)

    def test_outcome_address(self) -> None:
        """The outcome names the caller's address when given, else the first Original-Rcpt-To."""
        report = parse_feedback(arf("Feedback-Type: abuse\nOriginal-Rcpt-To: a@isp.example\n", ORIGINAL), FBL, SECRET)
        self.assertEqual(report.outcome().address, "a@isp.example")
        self.assertEqual(report.outcome("queue@record.example").address, "queue@record.example")
