"""Tests for mailrelay.feedback.nonstandard and auto-reply recognition."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.events.model import EventType
from mailrelay.feedback import FORMATS, parse_feedback
from mailrelay.feedback.nonstandard import detect, parse_text_bounce
from mailrelay.processing.tokens import verp_address

SECRET = b"t" * 32
VERP = verp_address("00ff00ff00ff00ff", 0, "bounces.relay.example.net", SECRET)


def message(body: str, headers: str = "From: someone@example.org\nSubject: Re: your order\n") -> bytes:
    return f"{headers}To: {VERP}\n\n{body}".encode()


class TableTests(SynchronousTestCase):
    """The pattern table itself."""

    def test_names_unique(self) -> None:
        """Every row has its own name (reports name the row that read them)."""
        names = [fmt.name for fmt in FORMATS]
        self.assertEqual(len(names), len(set(names)))

    def test_every_row_finds_recipients(self) -> None:
        """Each row has a way to find recipients: a start line or inline sentences."""
        for fmt in FORMATS:
            self.assertTrue(fmt.start is not None or fmt.inline, fmt.name)

    def test_unrecognised(self) -> None:
        """Ordinary text matches no row."""
        self.assertIsNone(detect("Thanks for your order, see you soon.\n"))
        self.assertIsNone(parse_text_bounce("Hello\n"))


class WarningTests(SynchronousTestCase):
    """Delay warnings in text form are delays, not bounces."""

    def test_postfix_warning(self) -> None:
        """Postfix's "THIS IS A WARNING ONLY" notice gives delayed recipients and no event."""
        body = (
            "This is the mail system at host mx.example.org.\n\n"
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n\n"
            "<a@example.org>: host mx.example.org[192.0.2.1] said: 452 4.2.2 Mailbox full\n"
        )
        report = parse_feedback(message(body), VERP, SECRET)
        self.assertEqual(report.recipients[0].action, "delayed")
        self.assertIsNone(report.outcome().event)

    def test_exim_warning(self) -> None:
        """Exim's "has not yet been delivered" warning is a delay."""
        body = (
            "This message was created automatically by mail delivery software.\n"
            "A message that you sent has not yet been delivered to one or more of its\n"
            "recipients after more than 24 hours on the queue on mx.example.net.\n\n"
            "  b@example.net\n    host mx.example.net [192.0.2.2]: 451 4.3.0 try again later\n"
        )
        [block] = parse_feedback(message(body), VERP, SECRET).recipients
        self.assertEqual((block.recipient, block.action, block.category), ("b@example.net", "delayed", "soft"))


class FormatTests(SynchronousTestCase):
    """Formats beyond the sample files."""

    def test_sendmail(self) -> None:
        """Sendmail without DSN: the address line and the "(reason: ...)" reply."""
        body = (
            "   ----- The following addresses had permanent fatal errors -----\n"
            "<c@example.org>\n"
            "    (reason: 550 5.1.1 <c@example.org>... User unknown)\n\n"
            "   ----- Transcript of session follows -----\n"
            "<d@example.org>\n"
        )
        report = parse_feedback(message(body), VERP, SECRET)
        self.assertEqual(report.detector, "sendmail")
        [block] = report.recipients
        self.assertEqual(
            (block.recipient, str(block.reply)), ("c@example.org", "550 5.1.1 <c@example.org>... User unknown")
        )

    def test_old_gmail(self) -> None:
        """Gmail's older "Delivery to the following recipient failed permanently" wording."""
        body = (
            "Delivery to the following recipient failed permanently:\n\n     e@example.com\n\n"
            "Technical details of permanent failure:\nGoogle tried to deliver your message, but it was rejected.\n\n"
            "The error that the other server returned was:\n550 5.1.1 <e@example.com>: User unknown\n"
        )
        [block] = parse_feedback(message(body), VERP, SECRET).recipients
        self.assertEqual((block.recipient, block.reply.code, block.category), ("e@example.com", 550, "hard"))

    def test_exchange_hash_form(self) -> None:
        """The Exchange "#550 5.1.1 ...##" diagnostic form is read."""
        body = (
            "Delivery has failed to these recipients or groups:\n\n"
            "f@contoso.example\n#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##\n"
        )
        [block] = parse_feedback(message(body), VERP, SECRET).recipients
        self.assertEqual((block.recipient, block.reply.status, block.category), ("f@contoso.example", "5.1.1", "hard"))

    def test_html_only_notice(self) -> None:
        """A notice sent as HTML only is read from its text."""
        body = (
            "<html><head><style>p{}</style></head><body><p>This is the mail system at host mx.example.org.</p>"
            "<p>&lt;g@example.org&gt;: host mx.example.org said: 550 5.1.1 no such user</p></body></html>\n"
        )
        data = message(body, "From: MAILER-DAEMON@mx.example.org\nContent-Type: text/html\n")
        [block] = parse_feedback(data, VERP, SECRET).recipients
        self.assertEqual((block.recipient, block.reply.status), ("g@example.org", "5.1.1"))

    def test_recognised_without_address(self) -> None:
        """A recognised notice naming no address gives one recipient "" from its reply (VERP says who)."""
        body = "Hi. This is the qmail-send program at mx.example.org.\n\nRemote host said: 550 5.1.1 unknown\n"
        report = parse_feedback(message(body), VERP, SECRET)
        [block] = report.recipients
        self.assertEqual((block.recipient, block.category), ("", "hard"))
        self.assertEqual(report.outcome("h@example.org").address, "h@example.org")

    def test_recognised_but_empty(self) -> None:
        """A recognised notice with neither address nor reply is unknown, naming the format."""
        body = "Hi. This is the qmail-send program at mx.example.org.\n\nSomething odd.\n"
        report = parse_feedback(message(body), VERP, SECRET)
        self.assertEqual((report.kind, report.detector), ("unknown", "qmail"))
        self.assertIn("qmail", report.reason)

    def test_generic_bounce(self) -> None:
        """An unknown format from MAILER-DAEMON quoting a 5xx reply is a generic bounce for the VERP recipient."""
        data = message(
            "Your mail could not be sent.\n\n  550 5.1.1 mailbox unavailable\n",
            "From: MAILER-DAEMON@mx.example.org\nSubject: Returned mail\n",
        )
        report = parse_feedback(data, VERP, SECRET)
        self.assertEqual((report.kind, report.detector), ("nonstandard", "generic"))
        outcome = report.outcome()
        self.assertEqual((outcome.event, outcome.suppression), (EventType.BOUNCED, "hard_bounce"))

    def test_human_reply_is_unknown(self) -> None:
        """A person replying to the return path, quoting a reply code in passing, is unknown, not a bounce."""
        data = message("Hi, I got error 550 5.1.1 from your site yesterday.\n")
        self.assertEqual(parse_feedback(data, VERP, SECRET).kind, "unknown")

    def test_copy_of_message_ignored(self) -> None:
        """Addresses in the returned copy below qmail's separator are not taken for recipients."""
        body = (
            "Hi. This is the qmail-send program at mx.example.org.\n\n"
            "<i@example.org>:\nRemote host said: 550 5.1.1 unknown\n\n"
            "--- Below this line is a copy of the message.\n\n<j@example.org>:\nRemote host said: 550 5.1.1 x\n"
        )
        self.assertEqual(
            [r.recipient for r in parse_feedback(message(body), VERP, SECRET).recipients], ["i@example.org"]
        )


class AutoReplyTests(SynchronousTestCase):
    """RFC 3834 and de-facto auto-reply markers."""

    def kind(self, headers: str, body: str = "I am away.\n") -> str:
        return parse_feedback(message(body, headers), VERP, SECRET).kind

    def test_markers(self) -> None:
        """Each marker on its own makes an auto-reply."""
        for headers in (
            "Auto-Submitted: auto-replied\n",
            "Auto-Submitted: auto-generated\n",
            "X-Autoreply: yes\n",
            "X-Autorespond: vacation\n",
            "Precedence: auto_reply\n",
            "Subject: Out of Office: Deals\n",
            "Subject: Automatische Antwort: Deals\n",
            "Subject: =?utf-8?q?R=C3=A9ponse_automatique=3A_Deals?=\n",
        ):
            self.assertEqual(self.kind("From: p@example.org\n" + headers), "autoreply", headers)

    def test_auto_submitted_no(self) -> None:
        """Auto-Submitted: no is a person's message, not an auto-reply."""
        self.assertEqual(self.kind("From: p@example.org\nAuto-Submitted: no\nSubject: hi\n"), "unknown")

    def test_dsn_marked_auto_submitted(self) -> None:
        """A bounce marked Auto-Submitted (as Exim and Postfix mark theirs) is still a bounce."""
        body = "Hi. This is the qmail-send program at x.\n\n<k@example.org>:\nRemote host said: 550 5.1.1 no\n"
        self.assertEqual(self.kind("From: MAILER-DAEMON@x\nAuto-Submitted: auto-replied\n", body), "nonstandard")
