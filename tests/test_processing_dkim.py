"""Tests for mailrelay.processing.dkim."""

from __future__ import annotations

import base64
import re
import types

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.processing.dkim import (
    DKIMError,
    DKIMSigner,
    _parse,
    dkim_txt_record,
    dns_records,
    generate_ed25519_key,
    generate_rsa_key,
    public_key_pem,
    relaxed_body,
    sending_domain_records,
)

RSA_KEY = generate_rsa_key()
ED_KEY = generate_ed25519_key()
NOW = 1_700_000_000

MESSAGE = (
    b"Received: from client by relay\r\n"
    b"From: Shop <orders@example.com>\r\n"
    b"To: Customer <c@example.org>\r\n"
    b"Subject: Your order  \r\n\t#1234\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1234@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://t.example.com/u/abc>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Custom: not signed\r\n"
    b"\r\n"
    b"Thanks for your order.  \r\n"
    b"\r\n"
    b"-- \r\nShop\r\n\r\n\r\n"
)


def dns_for(*records: object) -> object:
    """A dkimpy dnsfunc answering from DNSRecord values, as a resolver would (strings joined)."""
    table = {r.name + ".": "".join(r.strings).encode("ascii") for r in records}  # type: ignore[attr-defined]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name.decode("ascii"))

    return dnsfunc


def nacl_shim() -> types.SimpleNamespace:
    """
    The part of PyNaCl that dkimpy's verifier uses, built on cryptography:
    PyNaCl is not installed, and this keeps dkimpy's own canonicalisation
    and header hashing in the Ed25519 verification path.
    """

    class BadSignatureError(Exception):
        pass

    class Base64Encoder:
        @staticmethod
        def decode(data: bytes) -> bytes:
            return base64.b64decode(data)

    class VerifyKey:
        def __init__(self, key: bytes, encoder: type[Base64Encoder]) -> None:
            self._key = ed25519.Ed25519PublicKey.from_public_bytes(encoder.decode(key))

        def verify(self, message: bytes, signature: bytes) -> None:
            try:
                self._key.verify(signature, message)
            except InvalidSignature:
                raise BadSignatureError()

    return types.SimpleNamespace(
        signing=types.SimpleNamespace(VerifyKey=VerifyKey),
        encoding=types.SimpleNamespace(Base64Encoder=Base64Encoder),
        exceptions=types.SimpleNamespace(ValueError=ValueError, BadSignatureError=BadSignatureError),
    )


class RSASigningTests(SynchronousTestCase):
    """RSA-SHA256 signatures through cryptography."""

    def setUp(self) -> None:
        self.signer = DKIMSigner("example.com", "mr1", RSA_KEY)
        self.dnsfunc = dns_for(*self.signer.dns_records("bounces.example.com", relay_host="relay.example.net"))

    def test_verifies(self) -> None:
        """A signed message verifies with dkimpy against the published TXT record."""
        signed = self.signer.sign(MESSAGE, now=NOW) + MESSAGE
        self.assertTrue(dkim.verify(signed, dnsfunc=self.dnsfunc))

    def test_identical_to_dkimpy(self) -> None:
        """The field is byte-identical to dkimpy's pure-Python signer for the same key, headers and time."""
        self.patch(dkim.time, "time", lambda: NOW)
        theirs = dkim.DKIM(MESSAGE)
        theirs.should_sign = {h.encode() for h in ("from", "to", "subject", "date", "message-id")} | {
            b"mime-version",
            b"content-type",
            b"list-unsubscribe",
            b"list-unsubscribe-post",
        }
        theirs.frozen_sign = {b"from"}
        expected = theirs.sign(b"mr1", b"example.com", RSA_KEY, canonicalize=(b"relaxed", b"relaxed"))
        self.assertEqual(self.signer.sign(MESSAGE, now=NOW), expected)

    def test_identical_to_dkimpy_pkcs8(self) -> None:
        """Identical bytes also with a PKCS#8 key and a message with LF line endings."""
        pkcs8 = serialization.load_pem_private_key(RSA_KEY, None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        message = MESSAGE.replace(b"\r\n", b"\n")
        self.patch(dkim.time, "time", lambda: NOW)
        signer = DKIMSigner("example.com", "s", pkcs8, headers=("from", "to", "subject"))
        expected = dkim.sign(
            message,
            b"s",
            b"example.com",
            pkcs8,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject", b"from"],
        )
        self.assertEqual(signer.sign(message, now=NOW), expected)

    def test_signed_header_list(self) -> None:
        """h= has the usual fields present, From twice, and neither Received nor X- fields."""
        field = self.signer.sign(MESSAGE, now=NOW)
        h = re.search(rb"h=([^;]*);", field.replace(b"\r\n", b"")).group(1)  # type: ignore[union-attr]
        names = [n.strip() for n in h.split(b":")]
        self.assertEqual(
            names,
            [
                b"from",
                b"to",
                b"subject",
                b"date",
                b"message-id",
                b"mime-version",
                b"content-type",
                b"list-unsubscribe",
                b"list-unsubscribe-post",
                b"from",
            ],
        )

    def test_fields(self) -> None:
        """d= is the domain, s= the selector, c= relaxed/relaxed, t= the given time; lines stay short."""
        field = self.signer.sign(MESSAGE, now=NOW)
        flat = field.replace(b"\r\n ", b" ")
        for tag in (b"d=example.com;", b"s=mr1;", b"c=relaxed/relaxed;", b"a=rsa-sha256;", b"t=1700000000;"):
            self.assertIn(tag, flat)
        self.assertTrue(field.endswith(b"\r\n"))
        self.assertTrue(all(len(line) <= 78 for line in field.split(b"\r\n")))

    def test_relaxed_survives_rewrapping(self) -> None:
        """Relaxed canonicalisation tolerates whitespace changes by MTAs on the way."""
        signed = self.signer.sign(MESSAGE, now=NOW) + MESSAGE.replace(b"Subject: Your order  ", b"subject:Your order")
        self.assertTrue(dkim.verify(signed, dnsfunc=self.dnsfunc))

    def test_tampering_fails(self) -> None:
        """A changed body, a changed subject, or a second From all fail verification."""
        field = self.signer.sign(MESSAGE, now=NOW)
        for changed in (
            MESSAGE.replace(b"Thanks", b"Thank"),
            MESSAGE.replace(b"Your order", b"Your refund"),
            b"From: evil@attacker.example\r\n" + MESSAGE,
        ):
            self.assertFalse(dkim.verify(field + changed, dnsfunc=self.dnsfunc))

    def test_deterministic(self) -> None:
        """The same message at the same time gives the same bytes (a retry renders the same)."""
        self.assertEqual(self.signer.sign(MESSAGE, now=NOW), self.signer.sign(MESSAGE, now=NOW))

    def test_line_that_is_not_a_field(self) -> None:
        """
        A line that is not a field (the policy refuses those now; a message
        queued before it did) is left out: the rest is signed, not refused.
        """
        message = b"From: a@example.com\r\n\x01bad line\r\nTo: b@example.org\r\n\r\nbody\r\n"
        field = self.signer.sign(message, now=NOW)
        self.assertTrue(dkim.verify(field + message.replace(b"\x01bad line\r\n", b""), dnsfunc=self.dnsfunc))

    def test_blanks_before_colon(self) -> None:
        """
        ``Subject : x`` (RFC 5322's obsolete syntax, which dkimpy's parser
        refuses) is signed around: the other fields are, that one stays out of h=.
        """
        message = MESSAGE.replace(b"Subject: Your order  \r\n\t#1234\r\n", b"Subject : Your order\r\n")
        field = self.signer.sign(message, now=NOW)
        h = re.search(rb"h=([^;]*);", field.replace(b"\r\n", b"")).group(1)  # type: ignore[union-attr]
        self.assertNotIn(b"subject", [n.strip() for n in h.split(b":")])
        self.assertIn(b"to", [n.strip() for n in h.split(b":")])
        without = message.replace(b"Subject : Your order\r\n", b"")
        self.assertTrue(dkim.verify(field + without, dnsfunc=self.dnsfunc))


_HEADER_LINES = st.lists(
    st.sampled_from(
        [
            b"From: a@example.com",
            b"To: b@example.org,",
            b" c@example.org",
            b"\tfolded  value ",
            b"Subject:",
            b"Subject:x",
            b"X-A:  two  spaces\t",
            b"x-b: \xc3\xa9",
            b"Cc: d@example.net\r",
        ]
    ),
    min_size=1,
    max_size=8,
)
_BODY_BYTES = st.lists(
    st.sampled_from([b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"bc", b"\xc3\xa9"]), max_size=40
).map(b"".join)


class EquivalenceTests(SynchronousTestCase):
    """The faster message splitting and body canonicalisation equal dkimpy's on any input."""

    @given(_BODY_BYTES)
    def test_relaxed_body(self, body: bytes) -> None:
        """relaxed_body equals dkimpy's Relaxed.canonicalize_body for CRLF bodies."""
        body = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
        self.assertEqual(relaxed_body(body), Relaxed.canonicalize_body(body))

    @settings(max_examples=50, deadline=None)
    @given(_BODY_BYTES, st.sampled_from([b"\r\n", b"\n"]))
    def test_whole_signature(self, body: bytes, eol: bytes) -> None:
        """The whole field equals dkimpy's for arbitrary bodies and either line ending."""
        message = b"From: a@example.com" + eol + b"Subject:  x \t y" + eol + eol + body
        signer = DKIMSigner("example.com", "s", RSA_KEY, headers=("from", "subject"))
        original = dkim.time.time
        dkim.time.time = lambda: NOW
        try:
            expected = dkim.sign(
                message,
                b"s",
                b"example.com",
                RSA_KEY,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[b"from", b"subject", b"from"],
            )
        finally:
            dkim.time.time = original
        self.assertEqual(signer.sign(message, now=NOW), expected)


    @settings(max_examples=200, deadline=None)
    @given(_HEADER_LINES, st.sampled_from([b"\r\n", b"\n"]))
    def test_header_fields(self, lines: list[bytes], eol: bytes) -> None:
        """The relay's header parsing gives dkimpy's fields for any block both can read."""
        message = eol.join(lines) + eol + eol + b"body" + eol
        try:
            expected, _ = dkim.rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError):
            return  # a block that starts with a continuation line: dkimpy cannot read it
        headers, _ = _parse(message)
        self.assertEqual([tuple(h) for h in expected], headers)


class Ed25519Tests(SynchronousTestCase):
    """The optional second signature (RFC 8463)."""

    def setUp(self) -> None:
        dkim.nacl = nacl_shim()  # type: ignore[attr-defined]
        self.addCleanup(delattr, dkim, "nacl")
        self.signer = DKIMSigner("example.com", "mr1", RSA_KEY, ED_KEY)
        self.dnsfunc = dns_for(*self.signer.dns_records("bounces.example.com", relay_host="relay.example.net"))

    def test_both_verify(self) -> None:
        """Two fields: Ed25519 first (own selector), then RSA; each verifies with dkimpy."""
        fields = self.signer.sign(MESSAGE, now=NOW)
        self.assertEqual(fields.count(b"DKIM-Signature:"), 2)
        self.assertIn(b"a=ed25519-sha256", fields.split(b"DKIM-Signature:")[1])
        self.assertIn(b"s=mr1-ed25519", fields.replace(b"\r\n ", b""))
        signed = fields + MESSAGE
        self.assertTrue(dkim.DKIM(signed).verify(idx=0, dnsfunc=self.dnsfunc))
        self.assertTrue(dkim.DKIM(signed).verify(idx=1, dnsfunc=self.dnsfunc))

    def test_tampered_fails(self) -> None:
        """A changed subject fails the Ed25519 signature; a changed body fails its body hash."""
        fields = self.signer.sign(MESSAGE, now=NOW)
        subject = fields + MESSAGE.replace(b"Your order", b"Your refund")
        self.assertFalse(dkim.DKIM(subject).verify(idx=0, dnsfunc=self.dnsfunc))
        body = fields + MESSAGE.replace(b"Thanks", b"Thank")
        self.assertRaises(dkim.ValidationError, dkim.DKIM(body).verify, idx=0, dnsfunc=self.dnsfunc)

    def test_dknewkey_seed(self) -> None:
        """A base64 seed as dkimpy's dknewkey writes it is accepted and gives the same signature."""
        key = serialization.load_pem_private_key(ED_KEY, None)
        seed = base64.b64encode(
            key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        )
        other = DKIMSigner("example.com", "mr1", RSA_KEY, seed)
        self.assertEqual(other.sign(MESSAGE, now=NOW), self.signer.sign(MESSAGE, now=NOW))


class KeyTests(SynchronousTestCase):
    """Key loading and generation."""

    def test_generated_rsa(self) -> None:
        """Generated RSA keys are 2048-bit PKCS#1 PEM."""
        key = serialization.load_pem_private_key(RSA_KEY, None)
        self.assertTrue(RSA_KEY.startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertEqual(key.key_size, 2048)  # type: ignore[union-attr]

    def test_wrong_key_types(self) -> None:
        """An unreadable key, an EC key, or an Ed25519 key where RSA belongs raise DKIMError."""
        ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for pem in (b"garbage", ec_pem, ED_KEY):
            self.assertRaises(DKIMError, DKIMSigner, "example.com", "s", pem)
        self.assertRaises(DKIMError, DKIMSigner, "example.com", "s", RSA_KEY, b"!!notbase64")
        self.assertRaises(DKIMError, DKIMSigner, "example.com", "s", RSA_KEY, RSA_KEY)

    def test_oversign_must_be_signed(self) -> None:
        """Oversigning a field that is not signed is a configuration error."""
        self.assertRaises(DKIMError, DKIMSigner, "example.com", "s", RSA_KEY, oversign=("x-foo",))


class DNSRecordTests(SynchronousTestCase):
    """The records to publish."""

    def test_dkim_record(self) -> None:
        """The RSA record is v=DKIM1; k=rsa; p=<SPKI> at selector._domainkey, in strings of at most 255."""
        record = dkim_txt_record("example.com", "mr1", public_key_pem(RSA_KEY))
        self.assertEqual((record.name, record.type), ("mr1._domainkey.example.com", "TXT"))
        self.assertEqual(len(record.strings), 2)
        self.assertTrue(all(len(s) <= 255 for s in record.strings))
        text = "".join(record.strings)
        self.assertTrue(text.startswith("v=DKIM1; k=rsa; p=MII"))
        self.assertEqual(record.value, " ".join(f'"{s}"' for s in record.strings))

    def test_private_key_accepted(self) -> None:
        """A private key PEM gives the same record as its public half."""
        self.assertEqual(
            dkim_txt_record("example.com", "s", RSA_KEY), dkim_txt_record("example.com", "s", public_key_pem(RSA_KEY))
        )

    def test_ed25519_record(self) -> None:
        """The Ed25519 record holds the raw 32-byte key (RFC 8463 section 4.2)."""
        record = dkim_txt_record("example.com", "e", public_key_pem(ED_KEY))
        p = record.strings[0].split("p=")[1]
        self.assertTrue(record.strings[0].startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(len(base64.b64decode(p)), 32)

    def test_mx_and_spf(self) -> None:
        """Without a CNAME target, the return path gets an MX to the relay and an SPF record."""
        records = dns_records("example.com", "s", RSA_KEY, "bounces.example.com", relay_host="relay.example.net")
        self.assertEqual(
            [(r.name, r.type) for r in records][1:], [("bounces.example.com", "MX"), ("bounces.example.com", "TXT")]
        )
        self.assertEqual(records[1].value, "10 relay.example.net.")
        self.assertEqual(records[2].strings, ("v=spf1 a:relay.example.net -all",))

    def test_cname(self) -> None:
        """With a target, one CNAME carries the return path."""
        records = dns_records(
            "example.com",
            "s",
            RSA_KEY,
            "rp.example.com",
            return_path_target="rp.relay.example.net",
            spf="ip4:192.0.2.1",
        )
        self.assertEqual(records[1:], (records[1],))
        self.assertEqual((records[1].type, records[1].value), ("CNAME", "rp.relay.example.net."))

    def test_sending_domain_return_path_is_marked_for_later(self) -> None:
        """
        The rp.<domain> CNAME shown for a sending domain says it is optional
        and not used yet: return paths are on the bounce domain (docs/feedback.md).
        """
        records = sending_domain_records("shop.example", "s", RSA_KEY.decode("ascii"), None, "bounces.relay.example")
        self.assertEqual([r.type for r in records], ["TXT", "CNAME"])
        cname = records[1]
        self.assertEqual((cname.name, cname.value), ("rp.shop.example", "bounces.relay.example."))
        self.assertIn("optional", cname.purpose)
        self.assertIn("bounce domain today", cname.purpose)

    def test_needs_a_target(self) -> None:
        """Neither relay host nor CNAME target is an error."""
        self.assertRaises(ValueError, dns_records, "example.com", "s", RSA_KEY, "b.example.com")
