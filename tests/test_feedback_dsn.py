"""Tests for mailrelay.feedback.dsn: RFC 3464 fields, blocks and the reply rebuilt from them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.events.model import EventType
from mailrelay.feedback import parse_feedback
from mailrelay.feedback.dsn import (
    normalise_action,
    parse_address_field,
    parse_delivery_status,
    parse_mta,
    parse_reply,
    parse_status,
)
from mailrelay.processing.tokens import verp_address

SECRET = b"d" * 32
VERP = verp_address("abcdef0123456789", 2, "bounces.relay.example.net", SECRET)


def dsn(
    status_body: str, text: str = "Delivery failed.\n", ctype: str = "message/delivery-status", to: str = VERP
) -> bytes:
    """A minimal multipart/report around a delivery-status body."""
    return (
        "From: MAILER-DAEMON@mx.example.org\n"
        f"To: {to}\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n'
        "\n--b\nContent-Type: text/plain\n\n"
        f"{text}\n--b\nContent-Type: {ctype}\n\n"
        f"{status_body}\n--b--\n"
    ).encode()


class FieldTests(SynchronousTestCase):
    """The small field parsers."""

    def test_status(self) -> None:
        """Only a well-formed enhanced code at the start counts; trailing comments are ignored."""
        self.assertEqual(parse_status("5.1.1"), "5.1.1")
        self.assertEqual(parse_status(" 4.7.650 (throttled)"), "4.7.650")
        self.assertEqual(parse_status("550"), "")
        self.assertEqual(parse_status("6.1.1"), "")
        self.assertEqual(parse_status("5.1.1234"), "")
        self.assertEqual(parse_status(None), "")

    def test_address_field(self) -> None:
        """Address types, angle brackets, missing types and RFC 6533 escapes are all read."""
        self.assertEqual(parse_address_field("rfc822; x@example.com"), ("rfc822", "x@example.com"))
        self.assertEqual(parse_address_field("RFC822;<x@example.com>"), ("rfc822", "x@example.com"))
        self.assertEqual(parse_address_field("x@example.com"), (None, "x@example.com"))
        self.assertEqual(parse_address_field("utf-8; j\\x{E9}r\\x{F4}me@example.com"), ("utf-8", "jérôme@example.com"))
        self.assertEqual(parse_address_field("rfc822; x@example.com (Mr X)"), ("rfc822", "x@example.com"))
        self.assertEqual(parse_address_field(""), (None, ""))

    def test_mta(self) -> None:
        """The host of an MTA field, without its type, trailing dot or comment."""
        self.assertEqual(parse_mta("dns; mx.example.com"), "mx.example.com")
        self.assertEqual(parse_mta("dns; mx.example.com. (2001:db8::1; the server)"), "mx.example.com")
        self.assertEqual(parse_mta("dns;[192.0.2.1]"), "[192.0.2.1]")
        self.assertEqual(parse_mta("mx.example.com"), "mx.example.com")
        self.assertIsNone(parse_mta("dns;"))

    def test_actions(self) -> None:
        """The five actions in any case, common misspellings, and the status class when the action is unknown."""
        self.assertEqual(normalise_action("FAILED", ""), "failed")
        self.assertEqual(normalise_action("delayed (will retry)", ""), "delayed")
        self.assertEqual(normalise_action("failure", ""), "failed")
        self.assertEqual(normalise_action("expanded", "2.0.0"), "expanded")
        self.assertEqual(normalise_action(None, "5.1.1"), "failed")
        self.assertEqual(normalise_action("bogus", "4.4.1"), "delayed")
        self.assertEqual(normalise_action(None, "2.0.0"), "delivered")
        self.assertIsNone(normalise_action(None, ""))


class ReplyTests(SynchronousTestCase):
    """The SMTP reply a diagnostic stands for, as classify needs it."""

    def test_plain(self) -> None:
        """Code, enhanced code and text are split."""
        reply = parse_reply("550 5.1.1 <x@example.com>: User unknown", "5.1.1", "failed")
        self.assertEqual((reply.code, reply.status, reply.text), (550, "5.1.1", "<x@example.com>: User unknown"))

    def test_multiline_prefixes(self) -> None:
        """Repeated ``550-5.1.1`` line prefixes of a multi-line reply are removed."""
        reply = parse_reply("550-5.1.1 first 550-5.1.1 second 550 5.1.1  third", "5.1.1", "failed")
        self.assertEqual(reply.text, "first second third")

    def test_reply_status_wins(self) -> None:
        """The enhanced code of the reply is used over the Status field (Exim's 5.0.0)."""
        self.assertEqual(parse_reply("550 5.2.1 disabled", "5.0.0", "failed").status, "5.2.1")

    def test_no_code(self) -> None:
        """Without a reply code, the code follows from Status, then from the action."""
        self.assertEqual(parse_reply("unknown user", "5.1.1", "failed").code, 550)
        self.assertEqual(parse_reply("timed out", "4.4.1", "delayed").code, 450)
        self.assertEqual(parse_reply("", "", "failed").code, 550)
        self.assertEqual(parse_reply("", "", "delayed").code, 450)
        self.assertEqual(parse_reply("", "", "delivered").code, 250)

    def test_mismatched_class(self) -> None:
        """A Status of another class than the reply is not attached to it."""
        reply = parse_reply("421 try later", "5.0.0", "failed")
        self.assertEqual((reply.code, reply.status), (421, ""))


class DeliveryStatusTests(SynchronousTestCase):
    """Whole message/delivery-status bodies, including the deviations real MTAs send."""

    def test_several_blocks(self) -> None:
        """Each per-recipient block becomes one status, in order, with its own fields."""
        status = parse_delivery_status(
            "Reporting-MTA: dns; mx.example.org\nArrival-Date: today\n\n"
            "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n\n"
            "Final-Recipient: rfc822; b@example.org\nAction: delayed\nStatus: 4.2.2\n\n"
            "Final-Recipient: rfc822; c@example.org\nAction: delivered\nStatus: 2.0.0\n"
        )
        self.assertEqual(status.get("reporting-mta"), "dns; mx.example.org")
        self.assertEqual(
            [(r.recipient, r.action) for r in status.recipients],
            [("a@example.org", "failed"), ("b@example.org", "delayed"), ("c@example.org", "delivered")],
        )

    def test_folded_fields(self) -> None:
        """Continuation lines (spaces or tabs) are joined to their field."""
        [block] = parse_delivery_status(
            "Final-Recipient:\n rfc822;\n\tx@example.org\nAction: failed\nStatus: 5.1.1\n"
            "Diagnostic-Code: smtp; 550 5.1.1\n    user\n\tunknown\n"
        ).recipients
        self.assertEqual(block.recipient, "x@example.org")
        self.assertEqual(block.diagnostic, "550 5.1.1 user unknown")

    def test_missing_blank_lines(self) -> None:
        """A repeated Final-Recipient starts a new block even without a blank line; per-message fields stay apart."""
        status = parse_delivery_status(
            "Reporting-MTA: dns; mx.example.org\n"
            "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n"
            "Final-Recipient: rfc822; b@example.org\nAction: failed\nStatus: 5.2.2\n"
        )
        self.assertEqual(status.get("reporting-mta"), "dns; mx.example.org")
        self.assertEqual(
            [(r.recipient, r.status) for r in status.recipients],
            [("a@example.org", "5.1.1"), ("b@example.org", "5.2.2")],
        )

    def test_missing_optional_fields(self) -> None:
        """No Action (taken from Status), no Diagnostic-Code, no Remote-MTA: still a hard bounce."""
        [block] = parse_delivery_status("Final-Recipient: x@example.org\nStatus: 5.1.1\n").recipients
        self.assertEqual((block.action, block.diagnostic, block.remote_mta), ("failed", "", None))
        self.assertEqual(block.category, "hard")

    def test_original_recipient_only(self) -> None:
        """A block with only Original-Recipient names that address."""
        [block] = parse_delivery_status("Original-Recipient: rfc822;o@example.org\nAction: failed\n").recipients
        self.assertEqual(block.recipient, "o@example.org")

    def test_unreadable_block(self) -> None:
        """A block with neither Action nor Status is skipped and said so."""
        status = parse_delivery_status("Final-Recipient: rfc822; x@example.org\nRemote-MTA: dns; mx\n")
        self.assertEqual(status.recipients, ())
        self.assertTrue(status.defects)

    def test_relayed_and_expanded(self) -> None:
        """relayed and expanded are positive: soft, no event, no suppression."""
        report = parse_feedback(
            dsn(
                "Final-Recipient: rfc822; a@example.org\nAction: relayed\nStatus: 2.0.0\n\n"
                "Final-Recipient: rfc822; b@example.org\nAction: expanded\nStatus: 2.0.0\n"
            ),
            VERP,
            SECRET,
        )
        self.assertEqual([r.action for r in report.recipients], ["relayed", "expanded"])
        self.assertEqual({r.category for r in report.recipients}, {"soft"})
        self.assertIsNone(report.outcome().event)

    def test_delayed_block_class_is_soft(self) -> None:
        """A delayed block whose reply reads like a block is still soft and never suppressed."""
        report = parse_feedback(
            dsn(
                "Final-Recipient: rfc822; a@example.org\nAction: delayed\nStatus: 4.7.0\n"
                "Diagnostic-Code: smtp; 421 4.7.0 blocked using zen.spamhaus.org\n"
            ),
            VERP,
            SECRET,
        )
        [block] = report.recipients
        self.assertEqual(block.classification.category, "block")
        self.assertEqual(block.category, "soft")
        self.assertIsNone(report.outcome().suppression)

    def test_failed_with_transient_reply(self) -> None:
        """A message given up after a transient error is a soft bounce: bounced event, no suppression."""
        report = parse_feedback(
            dsn(
                "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 4.4.7\n"
                "Diagnostic-Code: smtp; 451 4.4.7 message expired\n"
            ),
            VERP,
            SECRET,
        )
        outcome = report.outcome()
        self.assertEqual((outcome.event, outcome.category, outcome.suppression), (EventType.BOUNCED, "soft", None))

    def test_global_delivery_status(self) -> None:
        """RFC 6533 message/global-delivery-status is read like message/delivery-status, in UTF-8."""
        report = parse_feedback(
            dsn(
                "Final-Recipient: utf-8; \u00fcser@example.org\nAction: failed\nStatus: 5.1.1\n",
                ctype="message/global-delivery-status",
            ),
            VERP,
            SECRET,
        )
        self.assertEqual(report.recipients[0].recipient, "\u00fcser@example.org")

    def test_diagnostic_from_text(self) -> None:
        """A block without Diagnostic-Code takes the reply the human-readable part quotes for its address."""
        text = (
            "This is the mail system at host mx.example.org.\n\n"
            "<a@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1 no such user\n"
            "    (in reply to RCPT TO command)\n"
        )
        report = parse_feedback(
            dsn("Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.0.0\n", text=text), VERP, SECRET
        )
        [block] = report.recipients
        self.assertEqual((block.diagnostic_type, block.reply.status), ("text", "5.1.1"))
        self.assertEqual(block.diagnostic, "550 5.1.1 no such user")

    def test_envelope_id(self) -> None:
        """Original-Envelope-Id (the ENVID the relay may send) is kept for attribution."""
        report = parse_feedback(
            dsn(
                "Original-Envelope-Id: q-abcdef\nReporting-MTA: dns; mx.example.org\n\n"
                "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n",
                to="postmaster@x",
            ),
            "postmaster@relay.example.net",
            SECRET,
        )
        self.assertEqual(report.envelope_id, "q-abcdef")
        self.assertEqual(report.reporting_mta, "mx.example.org")
        self.assertIsNone(report.attribution)

    def test_verp_in_report_text(self) -> None:
        """Sent to another address, a DSN is still attributed by a VERP address in its own headers."""
        report = parse_feedback(
            dsn("Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n"),
            "postmaster@relay.example.net",
            SECRET,
        )
        self.assertEqual(report.attribution and report.attribution.source, "report-text")
        self.assertEqual((report.queue_id, report.recipient_index), ("abcdef0123456789", 2))

    def test_report_type_without_typed_part(self) -> None:
        """When the status part is mislabelled text/plain, report-type=delivery-status still finds it (2nd part)."""
        report = parse_feedback(
            dsn("Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n", ctype="text/plain"),
            VERP,
            SECRET,
        )
        self.assertEqual((report.kind, report.recipients[0].recipient), ("dsn", "a@example.org"))


local = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}", fullmatch=True)
addresses = st.builds(lambda a, b: f"{a}@{b}.example", local, st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True))
statuses = st.builds(lambda c, a, b: f"{c}.{a}.{b}", st.sampled_from("245"), st.integers(0, 7), st.integers(0, 30))
diag_text = st.text(
    alphabet=st.characters(whitelist_categories=["L", "N"], whitelist_characters=" .,<>@"), max_size=60
).map(lambda s: " ".join(s.split()))
blocks = st.tuples(
    addresses,
    st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded"]),
    statuses,
    st.one_of(st.integers(200, 299), st.integers(400, 599)),
    diag_text,
    st.booleans(),
)


class DeliveryStatusRoundTripTests(SynchronousTestCase):
    """Any well-formed report comes back field for field."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(blocks, min_size=1, max_size=6), st.booleans())
    def test_round_trip(self, generated: list[tuple[str, str, str, int, str, bool]], fold: bool) -> None:
        """Recipients, actions, statuses and diagnostics survive being written as a DSN and parsed back."""
        parts = ["Reporting-MTA: dns; mx.example.org\n"]
        for address, action, status, code, text, with_diag in generated:
            block = f"Final-Recipient: rfc822; {address}\nAction: {action}\nStatus: {status}\n"
            if with_diag:
                sep = "\n   " if fold else " "
                block += f"Diagnostic-Code: smtp; {code} {status}{sep}{text}\n"
            parts.append(block)
        report = parse_feedback(dsn("\n".join(parts)), VERP, SECRET)
        self.assertEqual(report.kind, "dsn")
        self.assertEqual(len(report.recipients), len(generated))
        for found, (address, action, status, code, text, with_diag) in zip(report.recipients, generated, strict=True):
            self.assertEqual((found.recipient, found.action, found.status), (address, action, status))
            if with_diag:
                self.assertEqual(found.reply.code, code)
                self.assertEqual(found.diagnostic, " ".join(f"{code} {status} {text}".split()))
            if found.action != "failed":
                self.assertEqual(found.category, "soft")
                self.assertFalse(found.suppress)
