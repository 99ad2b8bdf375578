"""Tests for mailrelay.processing.tokens."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.processing.tokens import (
    TRACKING_MAC_BYTES,
    Kind,
    TokenError,
    TokenSigner,
    TrackingToken,
    VerpInfo,
    _Mac,
    parse_verp,
    verp_address,
)

SECRET = b"s" * 32
OTHER = b"o" * 32

queue_ids = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=1, max_size=16).map(lambda s: s * 2),
    st.text(alphabet="0123456789ABCDEF", min_size=1, max_size=16).map(lambda s: s * 2),
    st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
)
small = st.integers(min_value=0, max_value=2**40)
urls = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}.example/{path}",
    st.sampled_from(["http", "https", "HTTPS"]),
    st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Zs", "Zl", "Zp", "Cc"]), max_size=60),
)
tracking_tokens = st.one_of(
    st.builds(TrackingToken, st.sampled_from([Kind.OPEN, Kind.UNSUBSCRIBE]), small, queue_ids, small),
    st.builds(TrackingToken, st.just(Kind.CLICK), small, queue_ids, small, small, urls),
)


class TrackingTokenTests(SynchronousTestCase):
    """Signed open, click and unsubscribe tokens."""

    def setUp(self) -> None:
        self.signer = TokenSigner(SECRET)

    @given(tracking_tokens)
    def test_round_trip(self, token: TrackingToken) -> None:
        """Every token verifies back to exactly what was signed, and is URL-safe."""
        text = self.signer.sign(token)
        self.assertRegex(text, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(self.signer.verify(text), token)

    @given(tracking_tokens, st.data())
    def test_tampered(self, token: TrackingToken, data: st.DataObject) -> None:
        """Changing any one character of a token makes it fail."""
        text = self.signer.sign(token)
        i = data.draw(st.integers(0, len(text) - 1))
        replacement = data.draw(st.sampled_from("AQgw_-09az").filter(lambda c: c != text[i]))
        self.assertRaises(TokenError, self.signer.verify, text[:i] + replacement + text[i + 1 :])

    @given(tracking_tokens, st.data())
    def test_truncated(self, token: TrackingToken, data: st.DataObject) -> None:
        """Any strict prefix of a token fails."""
        text = self.signer.sign(token)
        cut = data.draw(st.integers(0, len(text) - 1))
        self.assertRaises(TokenError, self.signer.verify, text[:cut])

    @given(st.builds(TrackingToken, st.just(Kind.CLICK), small, queue_ids, small, small, urls))
    def test_click_signer(self, token: TrackingToken) -> None:
        """A copy's click signer makes the same tokens as signing each one."""
        assert token.link is not None and token.url is not None
        clicks = self.signer.clicks(token.account_id, token.queue_id, token.recipient)
        self.assertEqual(clicks(token.link, token.url), self.signer.sign(token))
        self.assertEqual(self.signer.verify(clicks(token.link, token.url)), token)

    def test_mac_is_hmac_sha256(self) -> None:
        """The pre-keyed MAC is RFC 2104 HMAC-SHA256, truncated (tokens made before it still verify)."""
        key = hashlib.sha256(b"derived").digest()
        for payload in (b"", b"x", b"y" * 200):
            self.assertEqual(_Mac(key)(payload), hmac.new(key, payload, hashlib.sha256).digest()[:TRACKING_MAC_BYTES])

    def test_compact(self) -> None:
        """An open token for a 32-hex-digit queue id stays under 60 characters."""
        self.assertLess(len(self.signer.open(123456, "0123456789abcdef" * 2, 5)), 60)

    def test_other_secret(self) -> None:
        """A token signed with another secret fails; rotation keeps old tokens valid."""
        text = TokenSigner(OTHER).open(1, "q1", 0)
        self.assertRaises(TokenError, self.signer.verify, text)
        self.assertEqual(TokenSigner([SECRET, OTHER]).verify(text).queue_id, "q1")
        self.assertEqual(TokenSigner([SECRET, OTHER]).verify(self.signer.open(1, "q1", 0)).queue_id, "q1")

    def test_kind_checked(self) -> None:
        """An open token is refused where an unsubscribe token is expected."""
        text = self.signer.open(1, "q1", 0)
        self.assertRaises(TokenError, self.signer.verify, text, Kind.UNSUBSCRIBE)
        self.assertEqual(self.signer.verify(text, Kind.OPEN).kind, Kind.OPEN)

    def test_no_open_redirect(self) -> None:
        """Click tokens only carry http(s) URLs; an unsigned URL cannot be smuggled in."""
        for url in ("javascript:alert(1)", "//evil.example/", "data:text/html,x", "https:///x", "ftp://x.example"):
            self.assertRaises(ValueError, self.signer.click, 1, "q", 0, 0, url)
        text = self.signer.click(1, "q", 0, 3, "https://shop.example/a")
        token = self.signer.verify(text, Kind.CLICK)
        self.assertEqual((token.link, token.url), (3, "https://shop.example/a"))

    def test_bad_shapes(self) -> None:
        """Garbage, padding and non-canonical spellings fail with TokenError."""
        text = self.signer.open(1, "q", 0)
        for bad in ("", "!!!", text + "=", text + "A", "A" * 200, " " + text):
            self.assertRaises(TokenError, self.signer.verify, bad)

    def test_invalid_values(self) -> None:
        """Negative numbers, empty queue ids and links on open tokens are refused when signing."""
        self.assertRaises(ValueError, self.signer.open, -1, "q", 0)
        self.assertRaises(ValueError, self.signer.open, 1, "", 0)
        self.assertRaises(ValueError, self.signer.sign, TrackingToken(Kind.OPEN, 1, "q", 0, link=1))
        self.assertRaises(ValueError, TokenSigner, b"short")
        self.assertRaises(ValueError, TokenSigner, [])


class VerpTests(SynchronousTestCase):
    """VERP return paths."""

    @given(queue_ids.filter(lambda q: len(q.encode()) <= 16), st.integers(0, 100_000))
    def test_round_trip(self, queue_id: str, recipient: int) -> None:
        """Any short queue id and recipient index come back from the address."""
        address = verp_address(queue_id, recipient, "Bounces.Example.COM", SECRET)
        local, _, domain = address.rpartition("@")
        self.assertEqual(domain, "bounces.example.com")
        self.assertTrue(local.startswith("bounces+"))
        self.assertLessEqual(len(local.encode()), 64)
        self.assertEqual(parse_verp(address, SECRET), VerpInfo(queue_id, recipient, "bounces.example.com"))

    def test_known_answers(self) -> None:
        """
        Addresses already sent keep working: the token's bytes (HMAC-SHA256 of
        the IDNA domain and payload, base32) do not change with the code.
        """
        self.assertEqual(
            verp_address("0a1b2c3d4e5f6a7b8c9d", 3, "Bounces.Example.com", b"k" * 32),
            "bounces+aebqccq3fq6u4x3kpogj2soasyn762rlbm2aq@bounces.example.com",
        )
        self.assertEqual(
            verp_address("Q-not-hex", 0, "b.example", [b"k" * 32, b"j" * 32]),
            "bounces+aeaaaujnnzxxillimv4odwzsnqfprqtwgdka@b.example",
        )

    def test_uuid_queue_id_fits(self) -> None:
        """A 32-hex-digit queue id with a large recipient index fits the 64-octet local part."""
        address = verp_address("f" * 32, 10**6, "b.example", SECRET)
        self.assertLessEqual(len(address.rpartition("@")[0]), 64)

    def test_too_long(self) -> None:
        """A queue id that cannot fit raises instead of making an invalid address."""
        self.assertRaises(ValueError, verp_address, "q" * 40, 0, "b.example", SECRET)

    def test_case_insensitive(self) -> None:
        """An MTA that uppercases the address does not break attribution."""
        address = verp_address("Q123", 7, "b.example", SECRET)
        self.assertEqual(parse_verp(address.upper(), SECRET), VerpInfo("Q123", 7, "b.example"))
        self.assertEqual(parse_verp(f"<{address}>", SECRET).recipient, 7)

    @given(st.data())
    def test_tampered(self, data: st.DataObject) -> None:
        """Changing a character of the token fails."""
        address = verp_address("abcdef0123456789", 3, "b.example", SECRET)
        local, _, domain = address.partition("@")
        i = data.draw(st.integers(len("bounces+"), len(local) - 1))
        c = data.draw(st.sampled_from("a27qz").filter(lambda c: c != local[i]))
        self.assertRaises(TokenError, parse_verp, local[:i] + c + local[i + 1 :] + "@" + domain, SECRET)

    def test_other_domain_or_secret(self) -> None:
        """A token moved to another bounce domain, or checked with another secret, fails."""
        local = verp_address("q1", 0, "b.example", SECRET).partition("@")[0]
        self.assertRaises(TokenError, parse_verp, local + "@other.example", SECRET)
        self.assertRaises(TokenError, parse_verp, local + "@b.example", OTHER)
        self.assertEqual(parse_verp(local + "@b.example", [OTHER, SECRET]).queue_id, "q1")

    def test_not_verp(self) -> None:
        """Ordinary addresses, other prefixes and tracking tokens are not VERP addresses."""
        tracking = TokenSigner(SECRET).open(1, "q", 0)
        for address in (
            "postmaster@b.example",
            "bounces@b.example",
            "other+abc@b.example",
            f"bounces+{tracking}@b.example",
            "bounces+@b.example",
        ):
            self.assertRaises(TokenError, parse_verp, address, SECRET)
