"""
Tests that mailrelay.feedback survives what anyone can send to port 25:
arbitrary bytes, broken MIME, wrong charsets, huge and deeply nested
messages, and inputs built to make regular expressions backtrack.
"""

from __future__ import annotations

import base64
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.feedback import FeedbackReport, parse_feedback
from mailrelay.feedback import report as report_module
from mailrelay.feedback.mime import MAX_DEPTH, MAX_MESSAGE, MAX_PART, decode_transfer, parse_message
from tests.test_feedback import DATA, SECRET, envelope_rcpt, load

KINDS = {"dsn", "arf", "nonstandard", "autoreply", "unknown"}
SAMPLES = sorted(p.name for p in DATA.glob("*.eml"))
REPORT_HEAD = (
    b"From: MAILER-DAEMON@mx.example.org\r\n"
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
)


def check(test: SynchronousTestCase, data: bytes, rcpt: str = "bounces+x@y.example") -> FeedbackReport:
    """Parse ``data`` and assert the result is a well-formed report produced without the safety net."""
    report = parse_feedback(data, rcpt, SECRET)
    test.assertIsInstance(report, FeedbackReport)
    test.assertIn(report.kind, KINDS)
    test.assertTrue(report.reason)
    test.assertFalse(report.reason.startswith("internal error"), report.reason)
    return report


class ArbitraryInputTests(SynchronousTestCase):
    """Property tests: nothing but a report ever comes out."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=3000), st.text(max_size=80))
    def test_arbitrary_bytes(self, data: bytes, rcpt: str) -> None:
        """Arbitrary bytes and an arbitrary recipient give a report, never an exception."""
        check(self, data, rcpt)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=3000))
    def test_arbitrary_report_body(self, body: bytes) -> None:
        """Arbitrary bytes inside a delivery-status part give a report, never an exception."""
        check(self, REPORT_HEAD + body)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"Content-Type: multipart/report; report-type=feedback-report; boundary=x\n",
                    b"Content-Type: message/rfc822\n",
                    b"Content-Type: text/rfc822-headers\n",
                    b"Content-Type: message/delivery-status\n",
                    b"Content-Type: message/feedback-report\n",
                    b"Content-Transfer-Encoding: base64\n",
                    b"Content-Transfer-Encoding: quoted-printable\n",
                    b"\n",
                    b"\r\n",
                    b"--x\n",
                    b"--x--\n",
                    b"Final-Recipient: rfc822; a@b\n",
                    b"Action: failed\n",
                    b"Status: 5.1.1\n",
                    b"Diagnostic-Code: smtp; 550 5.1.1 x\n",
                    b" folded\n",
                    b"Feedback-Type: abuse\n",
                    b"Subject: =?utf-8?b?////?=\n",
                    b"=?x?q?=ZZ?=",
                    b"\xff\xfe\x00",
                    b"<a@b>:\n",
                    b"  a@b\n",
                    b"Hi. This is the qmail-send program\n",
                    b"Remote host said: 550 ",
                    b"Return-Path: <bounces+aaaaaaaa@b>\n",
                ]
            ),
            max_size=60,
        )
    )
    def test_structured_fragments(self, fragments: list[bytes]) -> None:
        """Any sequence of report-like fragments gives a report, never an exception."""
        check(self, b"".join(fragments))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.floats(0, 1), st.binary(max_size=8)), max_size=12))
    def test_mutated_samples(self, name: str, edits: list[tuple[float, bytes]]) -> None:
        """Samples with bytes deleted and inserted at random places give a report, never an exception."""
        data = bytearray(load(name))
        for where, junk in edits:
            at = int(where * len(data))
            data[at : at + len(junk) % 5] = junk
        check(self, bytes(data), envelope_rcpt(load(name)))

    def test_safety_net(self) -> None:
        """Should a parser bug raise, the caller still gets an unknown report naming the error."""

        def broken(*args: object) -> FeedbackReport:
            raise KeyError("bug")

        self.patch(report_module, "_recognise", broken)
        report = parse_feedback(load("postfix-dsn.eml"), "x", SECRET)
        self.assertEqual(report.kind, "unknown")
        self.assertIn("KeyError", report.reason)

    def test_bad_secret(self) -> None:
        """An unusable secret is a configuration error and raises ValueError at once."""
        self.assertRaises(ValueError, parse_feedback, b"", "x", b"short")
        self.assertRaises(ValueError, parse_feedback, b"", "x", [])


class BrokenMimeTests(SynchronousTestCase):
    """Real-world breakage that must not lose the bounce."""

    def test_latin1_diagnostic(self) -> None:
        """Latin-1 bytes in a delivery-status part are read, not rejected."""
        data = (
            REPORT_HEAD + b"Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            b"Diagnostic-Code: smtp; 550 5.1.1 Empf\xe4nger unbekannt\r\n--b--\r\n"
        )
        [block] = check(self, data).recipients
        self.assertEqual(block.diagnostic, "550 5.1.1 Empf\u00e4nger unbekannt")

    def test_base64_status_part(self) -> None:
        """A base64-encoded delivery-status part, with its padding missing, is decoded."""
        encoded = base64.b64encode(b"Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n")
        data = (
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
            b"--b\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
            + encoded.rstrip(b"=")
            + b"\n--b--\n"
        )
        self.assertEqual(check(self, data).recipients[0].recipient, "a@example.org")

    def test_unterminated_multipart(self) -> None:
        """A report cut before its closing boundary is read as far as it goes, and the defect noted."""
        data = load("postfix-dsn.eml")
        cut = data[: data.index(b"Content-Description: Undelivered Message Headers")]
        report = check(self, cut)
        self.assertEqual(report.kind, "dsn")
        self.assertIn("multipart without a closing boundary", report.defects)

    def test_undecodable_transfer_encoding(self) -> None:
        """base64 that cannot be decoded comes back as the raw bytes rather than failing."""
        self.assertEqual(decode_transfer(b"a", "base64"), b"")
        self.assertEqual(decode_transfer(b"!!", "x-unknown"), b"!!")

    def test_unknown_charset(self) -> None:
        """An unknown charset falls back to UTF-8 or Latin-1."""
        data = (
            b"Content-Type: text/plain; charset=x-no-such-charset\n"
            b"Subject: Undelivered\nFrom: MAILER-DAEMON@x\n\n"
            b"This is the mail system at host x.\n\n<a@example.org>: host x said: 550 5.1.1 unbekannt \xe4\n"
        )
        self.assertEqual(check(self, data).recipients[0].recipient, "a@example.org")


class SizeGuardTests(SynchronousTestCase):
    """Only the start of a large message and of each part is read."""

    def test_huge_returned_message(self) -> None:
        """A DSN followed by a 5 MB returned message is read from its first megabyte, and says so."""
        data = load("postfix-dsn.eml").replace(
            b"Content-Type: text/plain; charset=utf-8\n\n--4Rk",
            b"Content-Type: text/plain\n\n" + b"x" * 5_000_000 + b"\n--4Rk",
        )
        report = check(self, data, envelope_rcpt(data))
        self.assertEqual((report.kind, report.recipients[0].recipient), ("dsn", "alice@example.org"))
        self.assertTrue(any(str(MAX_MESSAGE) in d for d in report.defects))

    def test_part_cut(self) -> None:
        """A part longer than MAX_PART is cut to it."""
        root, defects = parse_message(b"Content-Type: text/plain\n\n" + b"y" * (MAX_PART + 10))
        self.assertEqual(len(root.body), MAX_PART)
        self.assertTrue(defects)

    def test_deep_nesting(self) -> None:
        """Nesting deeper than MAX_DEPTH is not followed, and the defect is noted."""
        data = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(50))
        root, defects = parse_message(data)
        depth = 0
        part = root
        while part.children:
            part, depth = part.children[0], depth + 1
        self.assertEqual(depth, MAX_DEPTH)
        self.assertIn(f"nesting deeper than {MAX_DEPTH} levels not read", defects)

    def test_hostile_inputs_are_fast(self) -> None:
        """Inputs shaped to make a parser quadratic each take well under a second (measured: milliseconds)."""
        cases = {
            "folded header": b"X-A: a\n" + b" b\n" * 300_000 + b"\nbody",
            "unclosed style": b"Content-Type: text/html\n\n" + b"<style>" * 150_000,
            "open tags": b"Content-Type: text/html\n\n" + (b"<" + b"a" * 1999) * 400,
            "address runs": b"From: mailer-daemon@x\nSubject: Undelivered\n\n" + (b"a" * 100 + b"@") * 9000,
            "many parts": b"Content-Type: multipart/mixed; boundary=x\n\n" + b"--x\n\n" * 200_000,
            "status lines": REPORT_HEAD + b"Final-Recipient: rfc822; a@b\nAction: failed\n" * 50_000,
            "qmail line": b"\nHi. This is the qmail-send program\n\n<a@b>:\nRemote host said: 550 " + b"5" * 900_000,
            "quoted param": b'Content-Type: multipart/report; boundary="' + b'\\"' * 300_000 + b"\n\n",
            "verp candidates": b"Subject: x\n\n" + b"bounces+aaaaaaaaaaaaaaaaaaaa@x.example " * 30_000,
        }
        for name, data in cases.items():
            start = time.perf_counter()
            check(self, data)
            self.assertLess(time.perf_counter() - start, 1.0, name)
