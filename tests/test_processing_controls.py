"""Tests for mailrelay.processing.controls and mailrelay.processing.headers."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.processing.controls import (
    ControlAttributes,
    ControlHeaderError,
    PolicyHeaderError,
    RecipientCopy,
    control_header_names,
    fan_out,
    is_valid_address,
    parse_control_headers,
    parse_policy_headers,
    strip_control_headers,
)
from mailrelay.processing.headers import make_field, message_date, parse_fields, remove_fields, split_message, unfold
from mailrelay.storage.counters import utc_day
from mailrelay.types import Reply, SMTPReplyError


def block(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


class HeaderBlockTests(SynchronousTestCase):
    """Byte-level header splitting keeps every byte it does not remove."""

    def test_split_message(self) -> None:
        """The header block ends with its last field's line ending; the rest starts at the empty line."""
        head, rest = split_message(b"A: 1\r\nB: 2\r\n\r\nbody\r\n")
        self.assertEqual((head, rest), (b"A: 1\r\nB: 2\r\n", b"\r\nbody\r\n"))

    def test_split_bare_lf(self) -> None:
        """Messages with bare LF line endings split the same way."""
        self.assertEqual(split_message(b"A: 1\nB: 2\n\nbody"), (b"A: 1\nB: 2\n", b"\nbody"))

    def test_split_no_body(self) -> None:
        """A message without an empty line is all header."""
        self.assertEqual(split_message(b"A: 1\r\n"), (b"A: 1\r\n", b""))

    def test_folded_field(self) -> None:
        """Continuation lines belong to their field and unfold into its value."""
        fields = parse_fields(b"Subject: one\r\n two\r\n\tthree\r\nTo: x@y.example\r\n")
        self.assertEqual([f.name for f in fields], [b"Subject", b"To"])
        self.assertEqual(fields[0].value, b"one two\tthree")
        self.assertEqual(fields[1].value, b"x@y.example")
        # A line break not followed by a blank is not folding: kept (only the last one goes).
        self.assertEqual(unfold(b" a\r\nb\r\n"), b" a\r\nb")
        self.assertEqual(unfold(b" a\n\tb\n"), b" a\tb")

    def test_parse_again_gives_a_fresh_list(self) -> None:
        """Parsing the same block twice (the remembered one) gives equal fields in a list of the caller's own."""
        block = bytearray(b"A: 1\r\nB: 2\r\n")
        first = parse_fields(block)
        first.append(parse_fields(b"C: 3\r\n")[0])
        again = parse_fields(bytes(block))
        self.assertEqual([f.name for f in again], [b"A", b"B"])
        block[3] = ord("9")  # the caller's buffer changing does not change what was remembered
        self.assertEqual(parse_fields(b"A: 1\r\nB: 2\r\n")[0].value, b"1")
        self.assertEqual(parse_fields(block)[0].value, b"9")

    def test_garbage_lines_kept(self) -> None:
        """A line that is no field survives a rebuild untouched."""
        data = b"garbage line\r\nA: 1\r\n"
        self.assertEqual(remove_fields(data, ["b"]), data)

    def test_make_field_folds(self) -> None:
        """A long value folds at spaces into lines of at most 78 characters."""
        field = make_field("Cc", ", ".join(f"person{i}@example.com" for i in range(12)))
        lines = field.raw.split(b"\r\n")[:-1]
        self.assertGreater(len(lines), 1)
        self.assertTrue(all(len(line) <= 78 for line in lines))
        self.assertEqual(parse_fields(field.raw)[0].value.count(b"@"), 12)

    def test_make_field_refuses_line_breaks(self) -> None:
        """A value with CR or LF cannot inject another header."""
        self.assertRaises(ValueError, make_field, "Bcc", "a@b.example\r\nX-Evil: 1")


class DateTests(SynchronousTestCase):
    def test_message_date(self) -> None:
        """RFC 5322 dates in GMT, to the second (a fraction never rounds up), the same when cached."""
        self.assertEqual(message_date(0), "Thu, 01 Jan 1970 00:00:00 GMT")
        self.assertEqual(message_date(951868799.9999999), "Tue, 29 Feb 2000 23:59:59 GMT")
        self.assertEqual(message_date(951868800), "Wed, 01 Mar 2000 00:00:00 GMT")
        for _ in range(2):
            self.assertEqual(message_date(1763830000.5), "Sat, 22 Nov 2025 16:46:40 GMT")

    def test_utc_day(self) -> None:
        """The UTC day of a timestamp, at and around midnight, before 1970 too."""
        self.assertEqual(utc_day(951868799.999), "2000-02-29")
        self.assertEqual(utc_day(951868800), "2000-03-01")
        self.assertEqual(utc_day(-1), "1969-12-31")
        self.assertEqual(utc_day(1763830000), "2025-11-22")


class MailtargetTests(SynchronousTestCase):
    """The X-MT-ATTR JSON dialect."""

    def test_page_example(self) -> None:
        """The exact example from the Mailtarget page enables both kinds of tracking."""
        attrs = parse_control_headers(
            block('X-MT-ATTR: { "optionsAttributes" : { "openTracking" : true,"clickTracking" : true }}')
        )
        self.assertEqual((attrs.open_tracking, attrs.click_tracking), (True, True))

    def test_options_spelling(self) -> None:
        """``options`` with camelCase or snake_case keys is read as well."""
        a = parse_control_headers(block('X-MT-ATTR: {"options": {"openTracking": false}}'))
        b = parse_control_headers(block('X-MT-ATTR: {"options": {"click_tracking": true}}'))
        self.assertEqual((a.open_tracking, a.click_tracking), (False, None))
        self.assertEqual((b.open_tracking, b.click_tracking), (None, True))

    def test_folded_json(self) -> None:
        """A JSON value folded over several lines is unfolded before parsing."""
        attrs = parse_control_headers(b'X-MT-ATTR: {"cc": ["a@example.com",\r\n  "b@example.com"],\r\n\t"bcc": []}\r\n')
        self.assertEqual(attrs.cc, ("a@example.com", "b@example.com"))

    def test_address_shapes(self) -> None:
        """Strings, name-addr strings and objects with email/address are all accepted."""
        value = json.dumps(
            {
                "cc": ["a@example.com", "Bee <b@example.com>", {"email": "c@example.com", "name": "C"}],
                "bcc": [{"address": "d@example.com"}, {"address": {"email": "e@example.com"}}],
                "archive": ["arch@example.org"],
            }
        )
        attrs = parse_control_headers(block("X-MT-ATTR: " + value))
        self.assertEqual(attrs.cc, ("a@example.com", "b@example.com", "c@example.com"))
        self.assertEqual(attrs.bcc, ("d@example.com", "e@example.com"))
        self.assertEqual(attrs.archive, ("arch@example.org",))

    def test_utf8_address(self) -> None:
        """An SMTPUTF8 address in cc is accepted."""
        attrs = parse_control_headers(block('X-MT-ATTR: {"cc": ["jörg@bücher.example"]}'))
        self.assertEqual(attrs.cc, ("jörg@bücher.example",))

    def test_rfc2047_encoded_value(self) -> None:
        """A value a library encoded as RFC 2047 words is decoded before JSON parsing."""
        encoded = "=?utf-8?b?eyJ0YWdzIjogWyJjYWbDqSJdfQ==?="  # {"tags": ["café"]}
        self.assertEqual(parse_control_headers(block("X-MT-ATTR: " + encoded)).tags, ("café",))

    def test_json_with_encoded_word_inside(self) -> None:
        """JSON containing ``=?`` inside a string is parsed as JSON, not as RFC 2047."""
        attrs = parse_control_headers(block('X-MT-ATTR: {"metadata": {"u": "=?utf-8?q?x?="}}'))
        self.assertEqual(attrs.metadata, (("u", "=?utf-8?q?x?="),))

    def test_tags_campaign_metadata(self) -> None:
        """tags, campaign_id and scalar metadata are carried over."""
        attrs = parse_control_headers(
            block('X-MT-ATTR: {"tags": ["a", " b "], "campaign_id": "spring", "metadata": {"n": 3, "s": "x"}}')
        )
        self.assertEqual(attrs.tags, ("a", "b"))
        self.assertEqual(attrs.campaign, "spring")
        self.assertEqual(attrs.metadata, (("n", "3"), ("s", "x")))

    def test_unknown_keys_ignored(self) -> None:
        """Keys mailrelay does not know (substitution_data...) do not refuse the message."""
        attrs = parse_control_headers(block('X-MT-ATTR: {"substitution_data": {"x": 1}}'))
        self.assertEqual(attrs, ControlAttributes(tags=()))

    def assertRefused(self, header_block: bytes, detail: str) -> ControlHeaderError:
        error = self.assertRaises(ControlHeaderError, parse_control_headers, header_block)
        self.assertIsInstance(error, SMTPReplyError)
        self.assertEqual(error.reply.code, 550)
        self.assertEqual(error.reply.status, "5.6.0")
        self.assertIn(detail, str(error.reply.text))
        return error

    def test_bad_json(self) -> None:
        """Broken JSON gives the page's reply with the parser's position."""
        error = self.assertRefused(block('X-MT-ATTR: {"cc": ["a@example.com"'), "X-MT-ATTR")
        self.assertEqual(
            error.reply,
            Reply(550, "5.6.0", "JSON parsing error in X-MT-ATTR: Expecting ',' delimiter at character 24"),
        )

    def test_not_an_object(self) -> None:
        """A JSON array at the top is refused, naming what was found."""
        self.assertRefused(block("X-MT-ATTR: [1, 2]"), "expected a JSON object, got array")

    def test_flag_wrong_type(self) -> None:
        """A string where a boolean belongs is refused, naming the key."""
        self.assertRefused(
            block('X-MT-ATTR: {"options": {"openTracking": "true"}}'),
            "options.openTracking must be true or false, got string",
        )

    def test_options_not_object(self) -> None:
        """``optionsAttributes`` must be an object."""
        self.assertRefused(block('X-MT-ATTR: {"optionsAttributes": true}'), "optionsAttributes must be an object")

    def test_contradicting_spellings(self) -> None:
        """The two option spellings may not disagree."""
        self.assertRefused(
            block('X-MT-ATTR: {"options": {"openTracking": true}, "optionsAttributes": {"openTracking": false}}'),
            "contradicts",
        )

    def test_cc_not_array(self) -> None:
        """cc must be an array."""
        self.assertRefused(block('X-MT-ATTR: {"cc": "a@example.com"}'), "cc must be an array, got string")

    def test_bad_address(self) -> None:
        """An invalid address is refused with its index and value."""
        self.assertRefused(
            block('X-MT-ATTR: {"bcc": ["ok@example.com", "not an address"]}'),
            "bcc[1] is not a valid email address: 'not an address'",
        )

    def test_address_wrong_type(self) -> None:
        """A number in an address array is refused."""
        self.assertRefused(block('X-MT-ATTR: {"archive": [5]}'), "archive[0] must be an email address, got number")

    def test_object_without_email(self) -> None:
        """An object without an email field is refused."""
        self.assertRefused(block('X-MT-ATTR: {"cc": [{"name": "x"}]}'), 'cc[0] must have an "email" field')

    def test_twice(self) -> None:
        """Two X-MT-ATTR headers are ambiguous and refused."""
        self.assertRefused(block("X-MT-ATTR: {}", "X-MT-ATTR: {}"), "given more than once")

    def test_deep_nesting(self) -> None:
        """Hostile nesting gives a reply, not a RecursionError."""
        self.assertRefused(block("X-MT-ATTR: " + "[" * 100000), "X-MT-ATTR")

    def test_reply_has_no_line_breaks(self) -> None:
        """Input echoed into the reply cannot break the SMTP reply into several lines."""
        error = self.assertRefused(block('X-MT-ATTR: {"cc": ["a\\r\\n250 ok"]}'), "cc[0]")
        self.assertNotIn(b"\n", error.reply.to_bytes()[:-2])
        error = self.assertRefused(block('X-MT-ATTR: {"cc": ["j\\u00f6rg"]}'), "'j?rg'")
        self.assertTrue(error.reply.to_bytes().isascii())

    def test_invalid_utf8(self) -> None:
        """Bytes that are not UTF-8 are refused."""
        self.assertRefused(b'X-MT-ATTR: {"tags": ["\xff"]}\r\n', "not valid UTF-8")


class OtherDialectTests(SynchronousTestCase):
    """MailPace, Moosend and mailrelay's own headers."""

    def test_mailpace_tags(self) -> None:
        """One tag or a comma-separated list, from the MailPace page."""
        self.assertEqual(parse_control_headers(block("X-MailPace-Tags: a single tag")).tags, ("a single tag",))
        self.assertEqual(
            parse_control_headers(block("X-MailPace-Tags: tag one, tag two, tag three")).tags,
            ("tag one", "tag two", "tag three"),
        )

    def test_tags_add_up(self) -> None:
        """Tags from every dialect are combined, duplicates removed, first spelling kept."""
        attrs = parse_control_headers(
            block('X-MT-ATTR: {"tags": ["a"]}', "X-MailPace-Tags: b, A", "X-Mailrelay-Tags: c", "x-mailrelay-tags: d")
        )
        self.assertEqual(attrs.tags, ("a", "b", "c", "d"))

    def test_list_unsubscribe(self) -> None:
        """The MailPace page's X-List-Unsubscribe example is kept as the value."""
        attrs = parse_control_headers(
            block(
                "X-List-Unsubscribe: <http://www.host.com/list.cgi?cmd=unsub&lst=list>,"
                " <mailto:list-request@host.com?subject=unsubscribe>"
            )
        )
        self.assertEqual(
            attrs.list_unsubscribe,
            "<http://www.host.com/list.cgi?cmd=unsub&lst=list>, <mailto:list-request@host.com?subject=unsubscribe>",
        )

    def test_list_unsubscribe_bad(self) -> None:
        """A value without angle brackets or with another scheme is refused, naming the header."""
        for value in ("http://x.example/u", "<javascript:alert(1)>"):
            error = self.assertRaises(ControlHeaderError, parse_control_headers, block("X-List-Unsubscribe: " + value))
            self.assertIn("Invalid X-List-Unsubscribe header", str(error.reply.text))

    def test_moosend(self) -> None:
        """campaign_guid and mailing_list_id name the campaign and the list."""
        attrs = parse_control_headers(
            block("campaign_guid: 6d284908-f535-48aa-bf77-542b0d8da338", "mailing_list_id: list-1")
        )
        self.assertEqual((attrs.campaign, attrs.mailing_list), ("6d284908-f535-48aa-bf77-542b0d8da338", "list-1"))

    def test_own_headers_win(self) -> None:
        """X-Mailrelay-Campaign and -List override the vendor dialects."""
        attrs = parse_control_headers(
            block(
                'X-MT-ATTR: {"campaign_id": "mt"}',
                "campaign_guid: moosend",
                "X-Mailrelay-Campaign: own",
                "mailing_list_id: l1",
                "X-Mailrelay-List: l2",
            )
        )
        self.assertEqual((attrs.campaign, attrs.mailing_list), ("own", "l2"))

    def test_track(self) -> None:
        """X-Mailrelay-Track sets opens, clicks and unsubscribe, overriding X-MT-ATTR."""
        attrs = parse_control_headers(
            block(
                'X-MT-ATTR: {"options": {"openTracking": true, "clickTracking": true}}',
                "X-Mailrelay-Track: opens=no; Clicks=Yes, unsubscribe=off",
            )
        )
        self.assertEqual((attrs.open_tracking, attrs.click_tracking, attrs.unsubscribe), (False, True, False))

    def test_track_bad(self) -> None:
        """An unknown key or value is refused with the header's name."""
        for value in ("opens=maybe", "views=yes", "opens"):
            error = self.assertRaises(ControlHeaderError, parse_control_headers, block("X-Mailrelay-Track: " + value))
            self.assertEqual(error.reply.status, "5.6.0")
            self.assertIn("Invalid X-Mailrelay-Track header", str(error.reply.text))

    def test_unknown_own_header(self) -> None:
        """A misspelt X-Mailrelay- header is refused rather than silently ignored."""
        error = self.assertRaises(ControlHeaderError, parse_control_headers, block("X-Mailrelay-Tag: a"))
        self.assertIn("X-Mailrelay-Tag", str(error.reply.text))

    def test_campaign_twice(self) -> None:
        """A single-valued header given twice is refused."""
        self.assertRaises(ControlHeaderError, parse_control_headers, block("campaign_guid: a", "campaign_guid: b"))

    def test_too_many_tags(self) -> None:
        """More than the tag limit is refused."""
        tags = ", ".join(f"t{i}" for i in range(40))
        self.assertRaises(ControlHeaderError, parse_control_headers, block("X-Mailrelay-Tags: " + tags))

    def test_no_controls(self) -> None:
        """A header block without control headers gives the default value."""
        self.assertEqual(parse_control_headers(block("From: a@b.example", "To: c@d.example")), ControlAttributes())

    def test_json_round_trip(self) -> None:
        """to_json/from_json keep every attribute, through a JSON encoding."""
        attrs = ControlAttributes(
            open_tracking=True,
            cc=("a@x.example",),
            bcc=("b@x.example",),
            tags=("t",),
            campaign="c",
            metadata=(("k", "v"),),
        )
        self.assertEqual(ControlAttributes.from_json(json.loads(json.dumps(attrs.to_json()))), attrs)


class StripTests(SynchronousTestCase):
    """Control headers never reach a recipient."""

    def test_strip_all_dialects(self) -> None:
        """Every control header goes, with its continuation lines; the rest stays byte-identical."""
        data = (
            b"From: a@b.example\r\n"
            b'X-MT-ATTR: {"cc":\r\n ["x@y.example"]}\r\n'
            b"Subject: hi\r\n"
            b"x-mailpace-tags: a\r\n"
            b"X-List-Unsubscribe: <mailto:u@b.example>\r\n"
            b"campaign_guid: c\r\n"
            b"MAILING_LIST_ID: l\r\n"
            b"X-Mailrelay-Anything: z\r\n\tmore\r\n"
            b"To: c@d.example\r\n"
        )
        self.assertEqual(strip_control_headers(data), b"From: a@b.example\r\nSubject: hi\r\nTo: c@d.example\r\n")

    def test_names(self) -> None:
        """The advertised names include every dialect."""
        names, prefixes = control_header_names()
        self.assertEqual(
            set(names), {"x-mt-attr", "x-mailpace-tags", "x-list-unsubscribe", "campaign_guid", "mailing_list_id"}
        )
        self.assertEqual(prefixes, ("x-mailrelay-",))

    @given(st.lists(st.sampled_from(["X-MT-ATTR: {}", "Subject: s", "To: t@x.example", " folded", "campaign_guid: g"])))
    def test_strip_idempotent(self, lines: list[str]) -> None:
        """Stripping twice is stripping once, and leaves no control header behind."""
        data = block("From: a@b.example", *lines)
        once = strip_control_headers(data)
        self.assertEqual(strip_control_headers(once), once)
        self.assertEqual(parse_control_headers(once), ControlAttributes())


class FanOutTests(SynchronousTestCase):
    """Mailtarget's copy semantics."""

    def test_roles_and_duplicates(self) -> None:
        """Each address receives one copy; the envelope recipients come first."""
        attrs = ControlAttributes(
            cc=("c@x.example", "T@x.example"), bcc=("b@x.example", "C@x.example"), archive=("a@x.example",)
        )
        self.assertEqual(
            fan_out(["t@x.example"], attrs),
            (
                RecipientCopy("t@x.example", "to"),
                RecipientCopy("c@x.example", "cc"),
                RecipientCopy("b@x.example", "bcc"),
                RecipientCopy("a@x.example", "archive"),
            ),
        )


class AddressTests(SynchronousTestCase):
    """Address validation for the copy lists."""

    def test_valid(self) -> None:
        """Ordinary, plus-addressed, quoted, UTF-8 and literal addresses are valid."""
        for address in ("a@b.example", "a.b+c@sub.b.example", '"a b"@b.example', "ü@ü.example", "a@[192.0.2.1]"):
            self.assertTrue(is_valid_address(address), address)

    def test_invalid(self) -> None:
        """Missing parts, spaces, dotless domains and overlong local parts are invalid."""
        for address in (
            "",
            "a",
            "@b.example",
            "a@",
            "a b@c.example",
            "a@localhost",
            "a..b@c.example",
            "x" * 65 + "@b.example",
        ):
            self.assertFalse(is_valid_address(address), address)


class PolicyHeadersTests(SynchronousTestCase):
    """The headers the session policy checks."""

    def test_ordinary(self) -> None:
        """From, To, Reply-To, Subject (RFC 2047 decoded), Message-ID and Date are read."""
        headers = parse_policy_headers(
            block(
                'From: "Shop" <Orders@Shop.Example>',
                "To: c@d.example",
                "Reply-To: help@shop.example",
                "Subject: =?utf-8?q?Bestellbest=C3=A4tigung?=",
                "Message-ID: <1@shop.example>",
                "Date: Mon, 1 Jan 2024 10:00:00 +0000",
            )
        )
        self.assertEqual(headers.from_address, "Orders@Shop.Example")
        self.assertEqual(headers.from_domain, "shop.example")
        self.assertTrue(headers.to_present)
        self.assertEqual(headers.reply_to, ("help@shop.example",))
        self.assertTrue(headers.reply_to_valid)
        self.assertEqual(headers.subject, "Bestellbestätigung")
        self.assertEqual(headers.message_id, "<1@shop.example>")
        self.assertEqual(headers.date, "Mon, 1 Jan 2024 10:00:00 +0000")
        self.assertTrue(headers.date_valid)
        headers.require_recipients_headers()

    def test_utf8_from(self) -> None:
        """An SMTPUTF8 From address is read as text."""
        headers = parse_policy_headers(block("From: Jörg <jörg@bücher.example>", "To: x@y.example"))
        self.assertEqual((headers.from_address, headers.from_domain), ("jörg@bücher.example", "bücher.example"))

    def assertPolicyRefused(self, header_block: bytes, status: str, text: str) -> None:
        error = self.assertRaises(PolicyHeaderError, parse_policy_headers, header_block)
        self.assertEqual((error.reply.code, error.reply.status), (550, status))
        self.assertIn(text, str(error.reply.text))

    def test_bad_date(self) -> None:
        """A Date that does not parse is reported, not refused."""
        headers = parse_policy_headers(block("From: a@b.example", "Date: yesterday"))
        self.assertEqual((headers.date, headers.date_valid), ("yesterday", False))

    def test_no_from(self) -> None:
        """A message without From is refused."""
        self.assertPolicyRefused(block("To: x@y.example"), "5.6.0", "Message must have a From header")

    def test_line_that_is_not_a_field(self) -> None:
        """
        A line with no colon, a name with a blank in it, or a continuation with
        no field before it is refused at once: DKIM signing could not read it.
        """
        for bad, shown in (
            ("no colon here", "'no colon here'"),
            ("Bad Name: x", "'Bad Name: x'"),
            ("From a@b.example Mon Jan  1 00:00:00 2024", "'From a@b.example Mon Jan  1 00:00:00 2024'"),
            ("\x01ctl: x", "'?ctl: x'"),
        ):
            self.assertPolicyRefused(
                block("From: a@b.example", bad, "To: c@d.example"),
                "5.6.0",
                f"Malformed header line (not a Name: value field): {shown}",
            )
        self.assertPolicyRefused(block(" leading", "From: a@b.example"), "5.6.0", "Malformed header line")
        self.assertPolicyRefused(block(":", "From: a@b.example"), "5.6.0", "Malformed header line")

    def test_odd_but_valid_fields(self) -> None:
        """Folding, blanks before the colon (RFC 5322's obsolete syntax) and an empty value are fields."""
        headers = parse_policy_headers(
            block("From: a@b.example", "Subject : hello", "To:", " c@d.example", "X-Empty:", "X-Tab\t: x")
        )
        self.assertEqual((headers.from_address, headers.subject, headers.to_present), ("a@b.example", "hello", True))

    def test_two_from_headers(self) -> None:
        """Two From fields are refused."""
        self.assertPolicyRefused(block("From: a@b.example", "From: c@d.example"), "5.6.0", "more than one From")

    def test_several_from_addresses(self) -> None:
        """A From with two authors is refused: the relay checks exactly one sending domain."""
        self.assertPolicyRefused(block("From: a@b.example, c@d.example"), "5.1.7", "exactly one address")

    def test_empty_from(self) -> None:
        """A From with no address is refused."""
        self.assertPolicyRefused(block("From: undisclosed-recipients:;"), "5.1.7", "no address")

    def test_bad_from(self) -> None:
        """A From that is not an address is refused."""
        self.assertPolicyRefused(block("From: not an address"), "5.1.7", "")

    def test_missing_to_and_bad_reply_to(self) -> None:
        """The checks for To and Reply-To give precise replies."""
        no_to = parse_policy_headers(block("From: a@b.example"))
        self.assertFalse(no_to.to_present)
        error = self.assertRaises(PolicyHeaderError, no_to.require_recipients_headers)
        self.assertIn("Message must have a To header", str(error.reply.text))
        bad = parse_policy_headers(block("From: a@b.example", "To: c@d.example", "Reply-To: nonsense"))
        self.assertFalse(bad.reply_to_valid)
        error = self.assertRaises(PolicyHeaderError, bad.require_recipients_headers)
        self.assertEqual(error.reply.status, "5.1.7")

    @given(st.binary(max_size=300))
    def test_garbage(self, data: bytes) -> None:
        """Arbitrary bytes give a PolicyHeaders or a PolicyHeaderError, never another exception."""
        try:
            parse_policy_headers(b"From: a@b.example\r\n" + data)
        except PolicyHeaderError:
            pass

    @given(st.binary(max_size=300))
    def test_control_garbage(self, data: bytes) -> None:
        """Arbitrary bytes in control headers give a value or a ControlHeaderError only."""
        for name in (b"X-MT-ATTR: ", b"X-Mailrelay-Track: ", b"X-List-Unsubscribe: ", b"X-MailPace-Tags: "):
            try:
                parse_control_headers(name + data + b"\r\n")
            except ControlHeaderError:
                pass


class PolicyFastPathTests(SynchronousTestCase):
    """The regex fast path for plain address headers agrees with the email package, which reads the rest."""

    def test_same_answers(self) -> None:
        """Plain, quoted, bare, commented, encoded, grouped and broken From values give the same results both ways."""
        import mailrelay.processing.controls as controls

        values = [
            b"Shop <sender@example.com>",
            b"sender@example.com",
            b'"Shop, Inc." <sender@example.com>',
            b"Shop (the best) <sender@example.com>",
            b"=?utf-8?q?Caf=C3=A9?= <cafe@example.com>",
            b"Shop <a@example.com>, Other <b@example.com>",
            b"undisclosed:;",
            b"Shop <not an address>",
            b"  Shop   Name  <sender@sub.example.com>  ",
            b"Shop <sender@example.com",
        ]
        for value in values:
            block = b"From: " + value + b"\r\nTo: x@example.net\r\nReply-To: " + value + b"\r\nSubject: Hi\r\n"
            fast = self._result(lambda block=block: parse_policy_headers(block))
            original = controls._simple_address
            controls._simple_address = lambda v: None  # type: ignore[assignment]
            try:
                slow = self._result(lambda block=block: parse_policy_headers(block))
            finally:
                controls._simple_address = original
            self.assertEqual(fast, slow, value)

    def _result(self, fn: object) -> object:
        try:
            h = fn()  # type: ignore[operator]
        except PolicyHeaderError as e:
            return str(e.reply)
        return (h.from_address, h.from_domain, h.reply_to, h.reply_to_valid, h.subject)
