"""Tests for mailrelay.processing.mime: per-recipient rendering."""

from __future__ import annotations

import base64
import email
import email.policy
import html
import re
from collections.abc import Callable
from email.message import EmailMessage

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.processing import mime
from mailrelay.processing.controls import ControlAttributes, RecipientCopy, parse_control_headers
from mailrelay.processing.mime import (
    Decoration,
    RenderRequest,
    Tracking,
    _edits_body,
    parse_structure,
    render,
    rewrite_links,
)
from mailrelay.processing.tokens import Kind, TokenSigner

SIGNER = TokenSigner(b"k" * 32)
BASE = "https://t.example.com"
TO = RecipientCopy("c@example.org", "to")
DECO = Decoration(text_header="HEADER", text_footer="Footer: unsubscribe at example.com")


def tracking(opens: bool = False, clicks: bool = False, unsubscribe: bool = False) -> Tracking:
    return Tracking(BASE, SIGNER, 7, "abc123", 2, opens=opens, clicks=clicks, unsubscribe=unsubscribe)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def part_text(message: EmailMessage, content_type: str) -> str:
    for part in message.walk():
        if part.get_content_type() == content_type and not part.is_attachment():
            return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]
    raise AssertionError(f"no {content_type} part")


PLAIN = (
    b"From: Shop <orders@example.com>\r\n"
    b"To: c@example.org\r\n"
    b"Subject: Order\r\n"
    b'X-MT-ATTR: {"options":\r\n {"openTracking": true}}\r\n'
    b"X-Mailrelay-Tags: t\r\n"
    b"Bcc: secret@example.net\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Thanks for your order.\r\n"
)

HTML_QP = (
    b"From: orders@example.com\r\n"
    b"To: c@example.org\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b'<html><body style=3D"x"><p>Caf=C3=A9</p>\r\n'
    b'<a href=3D"https://shop.example/item?id=3D1&amp;b=3D2">item</a>\r\n'
    b'<a href=3D"mailto:help@example.com">mail</a> <a href=3D"#top">top</a>\r\n'
    b'<a data-no-track href=3D"https://shop.example/secret">no</a>\r\n'
    b"<a href=3D'http://shop.example/single'>s</a> <a class=3Dx href=3Dhttps://shop.example/bare>b</a>\r\n"
    b"</body></html>\r\n"
)


def mixed_message() -> bytes:
    """multipart/mixed: alternative (plain + html) and three attachments, built by the email package."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "orders@example.com"
    message["To"] = "c@example.org"
    message["Subject"] = "Invoice"
    message.set_content("Your invoice is attached.\nSee https://shop.example/inv\n")
    message.add_alternative(
        '<html><body><p>Your invoice: <a href="https://shop.example/inv">view</a></p></body></html>\n',
        subtype="html",
    )
    message.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="pdf", filename="invoice.pdf")
    message.add_attachment("attached notes </body>\n", filename="notes.txt")
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("<html><body>inner</body></html>", subtype="html")
    message.add_attachment(inner)
    return message.as_bytes()


class PlainTextTests(SynchronousTestCase):
    """Single-part text/plain."""

    def test_footer_header_and_headers(self) -> None:
        """Header and footer go around the text; control headers and Bcc go; Message-ID and Date are added."""
        out = render(
            PLAIN,
            RenderRequest(TO, message_id="<q1@relay.example>", date="Mon, 01 Jan 2024 10:00:00 +0000", decoration=DECO),
        )
        self.assertEqual(
            out,
            b"From: Shop <orders@example.com>\r\n"
            b"To: c@example.org\r\n"
            b"Subject: Order\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"Message-ID: <q1@relay.example>\r\n"
            b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"\r\n"
            b"HEADER\r\n\r\nThanks for your order.\r\n\r\nFooter: unsubscribe at example.com\r\n",
        )

    def test_identity(self) -> None:
        """Without anything to do, a message comes out byte-identical."""
        message = PLAIN.replace(b"Bcc: secret@example.net\r\n", b"").replace(b"X-Mailrelay-Tags: t\r\n", b"")
        message = re.sub(rb"X-MT-ATTR:.*?\}\}\r\n", b"", message, flags=re.S)
        self.assertEqual(render(message, RenderRequest(TO)), message)

    def test_existing_ids_kept(self) -> None:
        """Message-ID and Date already present are not replaced or duplicated."""
        out = render(HTML_QP, RenderRequest(TO, message_id="<new@x>", date="Tue, 02 Jan 2024 00:00:00 +0000"))
        self.assertEqual(out, HTML_QP)

    def test_header_only_message(self) -> None:
        """A message that is one header line without a line break still gets well-formed added headers."""
        out = render(b"From: a@example.com", RenderRequest(TO, message_id="<a@b>"))
        self.assertEqual(out, b"From: a@example.com\r\nMessage-ID: <a@b>\r\n\r\n")

    def test_deterministic(self) -> None:
        """The same request renders the same bytes (a retry is identical)."""
        request = RenderRequest(TO, decoration=DECO, tracking=tracking(opens=True, clicks=True, unsubscribe=True))
        self.assertEqual(render(HTML_QP, request), render(HTML_QP, request))

    def test_lf_message(self) -> None:
        """A message with bare LF line endings keeps them in what is added."""
        out = render(PLAIN.replace(b"\r\n", b"\n"), RenderRequest(TO, message_id="<a@b>", decoration=DECO))
        self.assertNotIn(b"\r", out)
        self.assertIn(b"Message-ID: <a@b>\n", out)
        self.assertTrue(out.endswith(b"\nFooter: unsubscribe at example.com\n"))

    def test_8bit_utf8(self) -> None:
        """An 8bit UTF-8 body stays 8bit and keeps its bytes; a non-ASCII footer is added as UTF-8."""
        message = (
            b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
        )
        out = render(message, RenderRequest(TO, decoration=Decoration(text_footer="— Müller")))
        self.assertIn(b"Gr\xc3\xbc\xc3\x9fe\r\n", out)
        self.assertIn("— Müller".encode(), out)
        self.assertIn(b"Content-Transfer-Encoding: 8bit\r\n", out)

    def test_7bit_becomes_qp(self) -> None:
        """A non-ASCII footer in a 7bit UTF-8 part switches it to quoted-printable, readable again."""
        message = b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n"
        out = render(message, RenderRequest(TO, decoration=Decoration(text_footer="Grüße")))
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n", out)
        self.assertTrue(out.isascii())
        self.assertEqual(part_text(parse(out), "text/plain"), "Hello\r\n\r\nGrüße\r\n".replace("\r\n", "\n"))

    def test_iso_8859_1(self) -> None:
        """An ISO-8859-1 QP part keeps its charset when the footer fits, and moves to UTF-8 when it does not."""
        message = (
            b"From: a@example.com\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nS=FC=DF\r\n"
        )
        fits = render(message, RenderRequest(TO, decoration=Decoration(text_footer="Grüße")))
        self.assertIn(b"charset=iso-8859-1", fits)
        self.assertIn(b"Gr=FC=DFe", fits)
        self.assertEqual(part_text(parse(fits), "text/plain"), "Süß\n\nGrüße\n")
        euro = render(message, RenderRequest(TO, decoration=Decoration(text_footer="5 €")))
        self.assertIn(b'charset="utf-8"', euro)
        self.assertEqual(part_text(parse(euro), "text/plain"), "Süß\n\n5 €\n")

    def test_mislabelled_charset(self) -> None:
        """8-bit bytes under a us-ascii label are carried through unchanged next to the footer."""
        message = (
            b"From: a@example.com\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n"
        )
        out = render(message, RenderRequest(TO, decoration=Decoration(text_footer="F")))
        self.assertTrue(out.endswith(b"\r\n\r\ncaf\xe9\r\n\r\nF\r\n"))

    def test_long_line_becomes_qp(self) -> None:
        """An edit that makes a 7bit line longer than 998 characters switches to quoted-printable."""
        links = " ".join(f'<a href="https://shop.example/{i}">{i}</a>' for i in range(14))
        message = b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n" + links.encode() + b"\r\n"
        out = render(message, RenderRequest(TO, tracking=tracking(clicks=True)))
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", out)
        self.assertTrue(all(len(line) <= 998 for line in out.split(b"\r\n")))
        self.assertEqual(part_text(parse(out), "text/html").count("/c/"), 14)


class HTMLTrackingTests(SynchronousTestCase):
    """Click and open tracking, unsubscribe headers."""

    def test_links_rewritten(self) -> None:
        """http(s) links become signed redirects; data-no-track, mailto and anchors stay; URLs are unescaped."""
        out = render(HTML_QP, RenderRequest(TO, tracking=tracking(clicks=True)))
        text = part_text(parse(out), "text/html")
        hrefs = re.findall(r'href="([^"]*)"', text)
        tracked = [h for h in hrefs if h.startswith(BASE + "/c/")]
        self.assertEqual(len(tracked), 3)
        tokens = [SIGNER.verify(h.rpartition("/")[2], Kind.CLICK) for h in tracked]
        self.assertEqual(
            [(t.link, t.url) for t in tokens],
            [
                (0, "https://shop.example/item?id=1&b=2"),
                (1, "http://shop.example/single"),
                (2, "https://shop.example/bare"),
            ],
        )
        self.assertEqual({(t.account_id, t.queue_id, t.recipient) for t in tokens}, {(7, "abc123", 2)})
        self.assertIn('href="mailto:help@example.com"', text)
        self.assertIn('href="#top"', text)
        self.assertIn('<a data-no-track href="https://shop.example/secret">', text)
        self.assertIn("<p>Café</p>", text)

    def test_unredirectable_left_alone(self) -> None:
        """A link with a space or without a host is left as it is instead of failing the copy."""
        message = b'Content-Type: text/html\r\n\r\n<a href="https://a b.example/">x</a><a href="https:///p">y</a>\r\n'
        self.assertEqual(render(message, RenderRequest(TO, tracking=tracking(clicks=True))), message)

    def test_pixel_and_footer(self) -> None:
        """The footer and then the open pixel go right before </body>; the header after <body ...>."""
        request = RenderRequest(
            TO,
            decoration=Decoration(html_header="<div>H</div>", html_footer="<div>F</div>"),
            tracking=tracking(opens=True),
        )
        text = part_text(parse(render(HTML_QP, request)), "text/html")
        self.assertIn('<body style="x"><div>H</div><p>', text)
        pixel = re.search(r'<div>F</div><img src="https://t\.example\.com/o/([A-Za-z0-9_-]+)"[^>]*></body>', text)
        assert pixel is not None
        self.assertEqual(SIGNER.verify(pixel.group(1), Kind.OPEN).recipient, 2)

    def test_unsubscribe_headers(self) -> None:
        """RFC 8058: an https URI with a signed token, a mailto, and List-Unsubscribe-Post."""
        request = RenderRequest(
            TO, tracking=Tracking(BASE, SIGNER, 7, "abc123", 2, unsubscribe=True, unsubscribe_mailto="u@b.example")
        )
        headers = parse(render(HTML_QP, request))
        value = str(headers["List-Unsubscribe"])
        match = re.fullmatch(r"<https://t\.example\.com/u/([A-Za-z0-9_-]+)>, <mailto:u@b\.example>", value)
        assert match is not None
        self.assertEqual(SIGNER.verify(match.group(1), Kind.UNSUBSCRIBE).queue_id, "abc123")
        self.assertEqual(str(headers["List-Unsubscribe-Post"]), "List-Unsubscribe=One-Click")

    def test_client_unsubscribe(self) -> None:
        """The client's X-List-Unsubscribe becomes List-Unsubscribe as is; its own List-Unsubscribe wins."""
        message = b"X-List-Unsubscribe: <mailto:list@host.example>\r\n" + HTML_QP
        controls = parse_control_headers(message.partition(b"\r\n\r\n")[0] + b"\r\n")
        out = render(message, RenderRequest(TO, controls=controls, tracking=tracking(unsubscribe=True)))
        self.assertIn(b"\r\nList-Unsubscribe: <mailto:list@host.example>\r\n", out)
        self.assertNotIn(b"X-List-Unsubscribe", out)
        self.assertNotIn(b"List-Unsubscribe-Post", out)
        own = b"List-Unsubscribe: <https://client.example/u>\r\n" + HTML_QP
        out = render(own, RenderRequest(TO, tracking=tracking(unsubscribe=True)))
        self.assertEqual(out.count(b"List-Unsubscribe:"), 1)
        self.assertIn(b"List-Unsubscribe: <https://client.example/u>", out)

    def test_base64_html(self) -> None:
        """A base64 HTML body is decoded, edited and re-encoded in base64 lines."""
        body = '<html><body><a href="https://x.example/">x</a></body></html>'
        message = (
            b"From: a@example.com\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(body.encode()).replace(b"\n", b"\r\n")
        )
        out = render(message, RenderRequest(TO, tracking=tracking(clicks=True, opens=True)))
        body_out = out.partition(b"\r\n\r\n")[2]
        self.assertTrue(all(len(line) <= 76 for line in body_out.split(b"\r\n")))
        text = part_text(parse(out), "text/html")
        self.assertIn(BASE + "/c/", text)
        self.assertIn(BASE + "/o/", text)

    def test_html_entities_for_unencodable(self) -> None:
        """An HTML footer that the part's charset cannot hold is written as character references."""
        message = b"From: a@example.com\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n<body>x</body>\r\n"
        out = render(message, RenderRequest(TO, decoration=Decoration(html_footer="<p>5 €</p>")))
        self.assertIn(b"<body>x<p>5 &#8364;</p></body>", out)
        self.assertIn(b"charset=iso-8859-1", out)


class MultipartTests(SynchronousTestCase):
    """multipart/alternative and multipart/mixed with attachments."""

    def test_mixed_with_attachments(self) -> None:
        """Both alternatives are decorated; attachments and the attached message stay byte-identical."""
        message = mixed_message()
        out = render(message, RenderRequest(TO, decoration=DECO, tracking=tracking(clicks=True, opens=True)))
        parsed = parse(out)
        plain = part_text(parsed, "text/plain")
        self.assertTrue(plain.startswith("HEADER\n\nYour invoice"))
        self.assertTrue(plain.endswith("Footer: unsubscribe at example.com\n"))
        self.assertIn("See https://shop.example/inv", plain)
        html = part_text(parsed, "text/html")
        self.assertIn("<body><div>HEADER</div><p>", html)
        self.assertIn("<div>Footer: unsubscribe at example.com</div><img ", html)
        self.assertIn(BASE + "/c/", html)
        self.assertIn(BASE + "/o/", html)
        # Attachments: the exact original bytes of each are still in the output.
        top = parse_structure(message)
        for child in top.children[1:]:
            self.assertIn(message[child.start : child.end], out)
        attachments = [p for p in parsed.walk() if p.is_attachment()]
        self.assertEqual(attachments[0].get_content(), bytes(range(256)) * 40)  # type: ignore[attr-defined]
        self.assertEqual(attachments[1].get_content(), "attached notes </body>\r\n")  # type: ignore[attr-defined]
        self.assertNotIn("/o/", out.split(b"forwarded")[1].decode("ascii", "replace"))

    def test_nested_part_moves_to_qp(self) -> None:
        """A non-ASCII footer in a nested 7bit part changes only that part's headers and body."""
        message = mixed_message()
        out = render(message, RenderRequest(TO, decoration=Decoration(text_footer="Grüße")))
        parsed = parse(out)
        self.assertTrue(part_text(parsed, "text/plain").endswith("\n\nGrüße\n"))
        self.assertTrue(part_text(parsed, "text/html").endswith("<div>Grüße</div></body></html>\n"))
        top = parse_structure(message)
        for child in top.children[1:]:
            self.assertIn(message[child.start : child.end], out)
        self.assertEqual(out.count(b"Content-Transfer-Encoding: quoted-printable"), 2)

    def test_alternative_only_html_tracked(self) -> None:
        """Links in the text alternative are not rewritten; the pixel is only in HTML."""
        out = render(mixed_message(), RenderRequest(TO, tracking=tracking(clicks=True, opens=True)))
        self.assertNotIn(BASE, part_text(parse(out), "text/plain"))

    def test_structure(self) -> None:
        """The byte-level parser finds the same tree as the email package."""
        top = parse_structure(mixed_message())
        self.assertEqual(top.content_type, "multipart/mixed")
        self.assertEqual(
            [c.content_type for c in top.children],
            ["multipart/alternative", "application/pdf", "text/plain", "message/rfc822"],
        )
        self.assertEqual([c.content_type for c in top.children[0].children], ["text/plain", "text/html"])
        self.assertEqual([c.attachment for c in top.children], [False, True, True, True])

    def test_preamble_epilogue_kept(self) -> None:
        """Preamble, epilogue and transport padding after boundaries survive."""
        message = (
            b'From: a@example.com\r\nContent-Type: multipart/alternative; boundary="b1"\r\n\r\n'
            b"This is a preamble.\r\n--b1  \r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--b1\r\nContent-Type: text/html\r\n\r\n<body>hi</body>\r\n--b1--\r\nepilogue\r\n"
        )
        out = render(message, RenderRequest(TO, decoration=Decoration(text_footer="F", html_footer="<i>F</i>")))
        self.assertEqual(
            out,
            message.replace(b"\r\nhi\r\n--b1\r\n", b"\r\nhi\r\n\r\nF\r\n--b1\r\n").replace(
                b"<body>hi</body>", b"<body>hi<i>F</i></body>"
            ),
        )

    def test_boundary_lookalikes(self) -> None:
        """Lines that only start like a delimiter, or contain one mid-line, do not split parts."""
        message = (
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n\r\none\r\n--b1x\r\n'
            b"text --b1\r\n--b1 \t\r\nContent-Type: text/html\r\n\r\n<p>two</p>\r\n--b1--"
        )
        top = parse_structure(message)
        self.assertEqual(
            [message[c.body_start : c.end] for c in top.children], [b"one\r\n--b1x\r\ntext --b1", b"<p>two</p>"]
        )
        self.assertEqual([c.content_type for c in top.children], ["text/plain", "text/html"])

    def test_signed_untouched(self) -> None:
        """S/MIME multipart/signed and application/pkcs7-mime bodies are byte-identical."""
        signed = (
            b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="s"\r\n'
            b'\r\n--s\r\nContent-Type: text/html\r\n\r\n<body><a href="https://x.example">x</a></body>\r\n'
            b"--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nMIAGCSqGSIb3\r\n--s--\r\n"
        )
        encrypted = (
            b"From: a@example.com\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\nMIAG\r\n"
        )
        request = RenderRequest(TO, decoration=DECO, tracking=tracking(clicks=True, opens=True))
        for message in (signed, encrypted, signed.replace(b"multipart/signed", b"multipart/encrypted")):
            out = render(message, request)
            self.assertEqual(out.partition(b"\r\n\r\n")[2], message.partition(b"\r\n\r\n")[2])

    def test_pgp_inline_untouched(self) -> None:
        """An inline PGP-signed text part is not decorated."""
        message = b"From: a@example.com\r\n\r\n-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: SHA256\r\n\r\nhi\r\n"
        self.assertEqual(render(message, RenderRequest(TO, decoration=DECO)), message)


class CopyTests(SynchronousTestCase):
    """Mailtarget cc/bcc/archive copies."""

    controls = ControlAttributes(
        cc=("c1@example.org", "jörg@bücher.example"), bcc=("b1@example.org",), archive=("a@example.org",)
    )
    message = b"From: a@example.com\r\nTo: t@example.org\r\nCc: old@example.org\r\nBcc: x@example.org\r\n\r\nhi\r\n"

    def headers(self, role: str, address: str) -> list[tuple[str, str]]:
        out = render(self.message, RenderRequest(RecipientCopy(address, role), controls=self.controls))  # type: ignore[arg-type]
        parsed = email.message_from_bytes(out, policy=email.policy.default)
        return [(k, str(v)) for k, v in parsed.items() if k in ("To", "Cc", "Bcc")]

    def test_to_copy(self) -> None:
        """The To copy shows all cc addresses, replaces the old Cc, and has no Bcc."""
        self.assertEqual(
            self.headers("to", "t@example.org"),
            [("To", "t@example.org"), ("Cc", "c1@example.org, jörg@bücher.example")],
        )

    def test_bcc_copy(self) -> None:
        """A bcc copy has the same To and Cc and a Bcc with only its own address."""
        self.assertEqual(
            self.headers("bcc", "b1@example.org"),
            [("To", "t@example.org"), ("Cc", "c1@example.org, jörg@bücher.example"), ("Bcc", "b1@example.org")],
        )

    def test_archive_copy(self) -> None:
        """An archive copy has no Bcc header."""
        self.assertEqual(
            self.headers("archive", "a@example.org"),
            [("To", "t@example.org"), ("Cc", "c1@example.org, jörg@bücher.example")],
        )

    def test_no_cc_list(self) -> None:
        """Without a cc list the client's Cc stays; Bcc never reaches anyone."""
        out = render(self.message, RenderRequest(TO))
        self.assertIn(b"Cc: old@example.org\r\n", out)
        self.assertNotIn(b"Bcc", out)


_HTML_PIECES = st.sampled_from(
    [
        "text ",
        "<p>",
        '<a href="https://a.example/x?y=1&amp;z=2">',
        "<a href='http://b.example/'>",
        "<a href=https://c.example/>",
        '<a data-no-track href="https://d.example/">',
        '<a href="mailto:x@y.example">',
        '<a href="#anchor">',
        '<A HREF="HTTPS://E.EXAMPLE/">',
        "<a>",
        "</a>",
        "<a name=x>",
        '<a href="https://a b.example/">',
        '<a href="https:///nohost">',
        "<",
        ">",
        '"',
    ]
)


_TRICKY_PIECES = st.one_of(
    _HTML_PIECES,
    st.sampled_from(
        [
            "<a ",
            " href=",
            "href=",
            ' title="',
            "'",
            " data-no-track",
            "&amp;",
            "&amp;amp;",
            "&lt;",
            "&#x41;",
            "&",
            "https://f.example/?a=1",
            "http://g.example/",
            "\t",
            "\n",
        ]
    ),
)


def _reference_rewrite(text: str, make_url: Callable[[int, str], str | None], skip_prefix: str) -> str:
    """The first, plainer implementation: a tag match, then an href search in the tag."""
    index = 0

    def tag(match: re.Match[str]) -> str:
        nonlocal index
        source = match.group(0)
        if re.search(r"\sdata-no-track\b", source, re.I):
            return source
        href = re.search(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", source, re.I)
        if href is None:
            return source
        url = html.unescape(next(g for g in href.groups()[1:] if g is not None)).strip()
        if not re.match(r"\s*https?://", url, re.I) or url.startswith(skip_prefix):
            return source
        new = make_url(index, url)
        if new is None:
            return source
        index += 1
        return source[: href.start()] + f'{href.group(1)}"{html.escape(new)}"' + source[href.end() :]

    return re.sub(r"<a\b[^>]*>", tag, text, flags=re.I)


class RewriteTests(SynchronousTestCase):
    """Link rewriting as a pure function."""

    @example('<a href="https://g.example/>">')
    @example("<a title='<a href=\"https://x.example/\">' href='https://y.example/'>")
    @example('<a name="x"><a href="https://z.example/?a&amp;amp;b&amp;lt;" data-no-track-not>')
    @given(st.lists(_TRICKY_PIECES, max_size=40).map("".join))
    def test_same_as_reference(self, text: str) -> None:
        """The one-pattern scan rewrites exactly what a tag match plus an href search does."""
        self.assertEqual(rewrite_links(text, self.make, BASE + "/")[0], _reference_rewrite(text, self.make, BASE + "/"))

    def make(self, index: int, url: str) -> str | None:
        try:
            return f"{BASE}/c/{SIGNER.click(7, 'q', 0, index, url)}"
        except ValueError:
            return None

    @given(st.lists(_HTML_PIECES, max_size=30).map("".join))
    def test_idempotent(self, text: str) -> None:
        """Rewriting twice is rewriting once."""
        once, _ = rewrite_links(text, self.make, BASE + "/")
        self.assertEqual(rewrite_links(once, self.make, BASE + "/")[0], once)

    @given(st.lists(_HTML_PIECES, max_size=30).map("".join))
    def test_only_hrefs_change(self, text: str) -> None:
        """Removing the rewritten href values from both sides leaves equal text."""
        out, count = rewrite_links(text, self.make, BASE + "/")
        strip = re.compile(r"""href\s*=\s*("[^"]*"|'[^']*'|[^\s"'>]+)""", re.I)
        self.assertEqual(strip.sub("href=", out), strip.sub("href=", text))
        self.assertEqual(count, out.count(BASE + "/c/"))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(_HTML_PIECES, max_size=30).map("".join), st.sampled_from(["7bit", "quoted-printable", "base64"]))
    def test_render_idempotent(self, html_text: str, cte: str) -> None:
        """Rendering a rendered copy again with click tracking changes nothing."""
        body = html_text.encode()
        if cte == "base64":
            body = base64.encodebytes(body).replace(b"\n", b"\r\n")
        message = (
            b"From: a@example.com\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body + b"\r\n"
        )
        request = RenderRequest(TO, tracking=tracking(clicks=True))
        once = render(message, request)
        self.assertEqual(render(once, request), once)

    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=400))
    def test_render_never_raises(self, data: bytes) -> None:
        """Arbitrary bytes render without an exception (delivery must not crash on odd mail)."""
        request = RenderRequest(TO, message_id="<a@b>", decoration=DECO, tracking=tracking(clicks=True, opens=True))
        for message in (
            data,
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + data,
            b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + data,
        ):
            self.assertIsInstance(render(message, request), bytes)


class PlainCopyFastPathTests(SynchronousTestCase):
    """A copy with nothing to add to its text skips the MIME tree and must give the same bytes."""

    def full_path(self, message: bytes, request: RenderRequest) -> bytes:
        self.patch(mime, "_edits_body", lambda request: True)
        try:
            return render(message, request)
        finally:
            self.patch(mime, "_edits_body", _edits_body)

    def assert_same(self, message: bytes, request: RenderRequest) -> None:
        self.assertFalse(_edits_body(request))
        self.assertEqual(render(message, request), self.full_path(message, request))

    def test_known_messages(self) -> None:
        for message in (PLAIN, HTML_QP, mixed_message(), PLAIN.replace(b"\r\n", b"\n"), b"\r\nbody only\r\n"):
            for request in (
                RenderRequest(TO, message_id="<m@x>", date="Mon, 01 Jan 2024 10:00:00 +0000"),
                RenderRequest(RecipientCopy("b@example.org", "bcc"), tracking=tracking(unsubscribe=True)),
                RenderRequest(TO, decoration=Decoration()),
            ):
                self.assert_same(message, request)

    def test_decoration_or_tracking_takes_the_full_path(self) -> None:
        self.assertTrue(_edits_body(RenderRequest(TO, decoration=Decoration(html_footer="<p>f</p>"))))
        self.assertTrue(_edits_body(RenderRequest(TO, tracking=tracking(opens=True))))
        self.assertTrue(_edits_body(RenderRequest(TO, tracking=tracking(clicks=True))))

    @settings(max_examples=80, deadline=None)
    @given(st.binary(max_size=300), st.sampled_from([b"", b"\r\n", b"\n", b"A: b\r\n\r\n", b"A: b\n\nx"]))
    def test_arbitrary_bytes(self, data: bytes, prefix: bytes) -> None:
        self.assert_same(prefix + data, RenderRequest(TO, message_id="<a@b>", date="d"))
