"""
Signed tokens: tracking links (open pixel, click redirect, one-click
unsubscribe) and VERP return paths.

A token is its payload followed by a truncated HMAC-SHA256 of it, so the
web and bounce handlers learn which message, recipient and link it names
without a database read, and nobody can make one without the secret.

Click tokens carry the target URL inside the signed payload (with the
link's index, for statistics).  The alternative, an index into a link list
stored per message, needs a write per rendered message and a read per
click, ties the redirect to storage that may be pruned, and fails across
nodes whose storage lags; carrying the URL costs only token length.  Either
way there is no open redirect: the redirect target is only ever a URL the
relay itself signed, and only http(s).

Secrets are a sequence: the first signs, all verify, so an operator can
rotate without breaking links in mail already delivered.  Each use derives
its own key from the secret, so a tracking token can never pass as a VERP
token or the reverse.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence

import attrs

TRACKING_MAC_BYTES = 16  # 128 bits: forgery is an online guess per request
VERP_MAC_BYTES = 10  # 80 bits: the local part has room for 64 octets only
VERP_PREFIX = "bounces"
MAX_LOCAL_PART = 64
_VERSION = 1


class TokenError(ValueError):
    """A token is malformed, truncated, tampered with or signed with another secret."""


class Kind(enum.IntEnum):
    OPEN = 1
    CLICK = 2
    UNSUBSCRIBE = 3


@attrs.frozen
class TrackingToken:
    """
    What a tracking token names.  ``link`` (the link's index in the
    message) and ``url`` are set for clicks only.
    """

    kind: Kind
    account_id: int
    queue_id: str
    recipient: int
    link: int | None = None
    url: str | None = None


@attrs.frozen
class VerpInfo:
    """What a VERP return path names: the message, the recipient and the bounce domain."""

    queue_id: str
    recipient: int
    domain: str


# A host, and no white space anywhere (\s and \S split the characters as str.isspace() does).
_HTTP_URL = re.compile(r"(?i)https?://[^/?#\s]+\S*")


def _is_http_url(url: str) -> bool:
    return _HTTP_URL.fullmatch(url) is not None


# ---------------------------------------------------------------------------
# Compact binary fields
# ---------------------------------------------------------------------------


_ONE_BYTE = tuple(bytes((n,)) for n in range(0x80))


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]  # most numbers in a token: link and recipient indexes, id lengths
    if n < 0:
        raise ValueError("negative numbers have no token encoding")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    start = pos
    while True:
        if pos >= len(data) or pos - start >= 9:
            raise TokenError("truncated number")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if pos - start > 1 and byte == 0:
                raise TokenError("overlong number")
            return n, pos


_HEX_LOWER = re.compile(r"(?:[0-9a-f]{2})+")
_HEX_UPPER = re.compile(r"(?:[0-9A-F]{2})+")


@functools.lru_cache(maxsize=1024)  # every link of a message packs the same id
def _pack_queue_id(queue_id: str) -> bytes:
    """A flag byte and the id: hexadecimal ids (the usual kind) take half the room."""
    if _HEX_LOWER.fullmatch(queue_id):
        return b"\x01" + bytes.fromhex(queue_id)
    if _HEX_UPPER.fullmatch(queue_id):
        return b"\x02" + bytes.fromhex(queue_id)
    if not queue_id:
        raise ValueError("empty queue id")
    return b"\x00" + queue_id.encode("utf-8")


def _unpack_queue_id(data: bytes) -> str:
    if len(data) < 2:
        raise TokenError("missing queue id")
    flag, rest = data[0], data[1:]
    if flag == 1:
        return rest.hex()
    if flag == 2:
        return rest.hex().upper()
    if flag == 0:
        try:
            text = rest.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError("queue id is not UTF-8")
        if _HEX_LOWER.fullmatch(text) or _HEX_UPPER.fullmatch(text):
            raise TokenError("non-canonical queue id")
        return text
    raise TokenError("unknown queue id encoding")


@functools.lru_cache(maxsize=32)  # every VERP address of every message derives the same key
def _derive(secret: bytes, purpose: bytes) -> bytes:
    if len(secret) < 16:
        raise ValueError("a token secret needs at least 16 bytes")
    return hmac.digest(secret, b"mailrelay token key/" + purpose, "sha256")


def _secrets(secrets: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
    found = (secrets,) if isinstance(secrets, bytes) else tuple(secrets)
    if not found:
        raise ValueError("at least one secret is needed")
    return found


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise TokenError("not a token")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        # Unused low bits set: another spelling of the same bytes.
        raise TokenError("non-canonical encoding")
    return data


# ---------------------------------------------------------------------------
# Tracking tokens
# ---------------------------------------------------------------------------


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class _Mac:
    """
    Truncated HMAC-SHA256 (RFC 2104) with one key whose two pads are hashed
    once: a token then costs two hash-state copies, not a new HMAC object
    (``hmac.HMAC.copy`` is Python code; this is 40% less time per token).
    """

    def __init__(self, key: bytes, size: int = TRACKING_MAC_BYTES) -> None:
        assert len(key) <= 64  # derived keys are 32 bytes: used as they are, not hashed first
        self._size = size
        padded = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(padded.translate(_IPAD))
        self._outer = hashlib.sha256(padded.translate(_OPAD))

    def __call__(self, payload: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[: self._size]


class ClickSigner:
    """
    The click tokens of one recipient's copy: what every link of the copy
    shares (account, recipient, queue id) is encoded once, so each link
    costs only its URL, its index and the MAC.
    """

    def __init__(self, mac: _Mac, account_id: int, queue_id: str, recipient: int) -> None:
        self._mac = mac
        self._head = bytes((_VERSION, Kind.CLICK)) + _varint(account_id) + _varint(recipient)
        packed = _pack_queue_id(queue_id)
        self._queue_id = _varint(len(packed)) + packed

    def __call__(self, link: int, url: str) -> str:
        """The token for link number ``link`` to ``url``; ValueError unless it is an http(s) URL."""
        if not _is_http_url(url):
            raise ValueError("click tokens redirect to http and https URLs only")
        payload = self._head + _varint(link) + self._queue_id + url.encode("utf-8")
        return _b64encode(payload + self._mac(payload))


class TokenSigner:
    """
    Makes and checks tracking tokens.  Tokens are URL-safe base64 without
    padding, about 50 characters for an open or unsubscribe token.
    """

    def __init__(self, secrets: bytes | Sequence[bytes]) -> None:
        self._macs = tuple(_Mac(_derive(s, b"tracking")) for s in _secrets(secrets))

    def sign(self, token: TrackingToken) -> str:
        """The token text for ``token``; raises ValueError for values it cannot carry."""
        if token.kind is Kind.CLICK:
            if token.link is None or token.url is None:
                raise ValueError("a click token needs a link index and a URL")
            return self.clicks(token.account_id, token.queue_id, token.recipient)(token.link, token.url)
        if token.link is not None or token.url is not None:
            raise ValueError("only click tokens carry a link")
        payload = (
            bytes((_VERSION, token.kind))
            + _varint(token.account_id)
            + _varint(token.recipient)
            + _pack_queue_id(token.queue_id)
        )
        return _b64encode(payload + self._macs[0](payload))

    def open(self, account_id: int, queue_id: str, recipient: int) -> str:
        return self.sign(TrackingToken(Kind.OPEN, account_id, queue_id, recipient))

    def unsubscribe(self, account_id: int, queue_id: str, recipient: int) -> str:
        return self.sign(TrackingToken(Kind.UNSUBSCRIBE, account_id, queue_id, recipient))

    def click(self, account_id: int, queue_id: str, recipient: int, link: int, url: str) -> str:
        return self.clicks(account_id, queue_id, recipient)(link, url)

    def clicks(self, account_id: int, queue_id: str, recipient: int) -> ClickSigner:
        """A signer for the click tokens of one copy (all its links)."""
        return ClickSigner(self._macs[0], account_id, queue_id, recipient)

    def verify(self, text: str, kind: Kind | None = None) -> TrackingToken:
        """
        The token ``text`` names; raises ``TokenError`` unless it is exactly
        as signed (with any of the secrets) and, if given, of ``kind``.
        """
        data = _b64decode(text)
        if len(data) < 2 + TRACKING_MAC_BYTES:
            raise TokenError("token too short")
        payload, mac = data[:-TRACKING_MAC_BYTES], data[-TRACKING_MAC_BYTES:]
        if not any(hmac.compare_digest(mac, sign(payload)) for sign in self._macs):
            raise TokenError("bad signature")
        token = _parse_tracking(payload)
        if kind is not None and token.kind is not kind:
            raise TokenError(f"expected a {kind.name.lower()} token")
        return token


def _parse_tracking(payload: bytes) -> TrackingToken:
    if payload[0] != _VERSION:
        raise TokenError("unknown token version")
    try:
        kind = Kind(payload[1])
    except ValueError:
        raise TokenError("unknown token kind")
    account_id, pos = _read_varint(payload, 2)
    recipient, pos = _read_varint(payload, pos)
    if kind is not Kind.CLICK:
        return TrackingToken(kind, account_id, _unpack_queue_id(payload[pos:]), recipient)
    link, pos = _read_varint(payload, pos)
    length, pos = _read_varint(payload, pos)
    if pos + length > len(payload):
        raise TokenError("truncated queue id")
    queue_id = _unpack_queue_id(payload[pos : pos + length])
    try:
        url = payload[pos + length :].decode("utf-8")
    except UnicodeDecodeError:
        raise TokenError("URL is not UTF-8")
    if not _is_http_url(url):
        raise TokenError("not an http(s) URL")
    return TrackingToken(kind, account_id, queue_id, recipient, link, url)


# ---------------------------------------------------------------------------
# VERP return paths
# ---------------------------------------------------------------------------


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).rstrip(b"=").decode("ascii").lower()


def _b32decode(text: str) -> bytes:
    if not re.fullmatch(r"[a-z2-7]*", text) or len(text) % 8 in (1, 3, 6):
        raise TokenError("not a VERP token")
    try:
        data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except binascii.Error:
        raise TokenError("not a VERP token")
    if _b32encode(data) != text:
        raise TokenError("non-canonical encoding")
    return data


def _verp_mac(key: bytes, domain: str, payload: bytes) -> bytes:
    # The bounce domain is signed too: a token only works where it was sent from.
    return _verp_macs(key)(_idna(domain) + b"\x00" + payload)


@functools.lru_cache(maxsize=16)
def _verp_macs(key: bytes) -> _Mac:
    return _Mac(key, VERP_MAC_BYTES)


@functools.lru_cache(maxsize=256)
def _idna(domain: str) -> bytes:
    return domain.encode("idna")


def verp_address(
    queue_id: str,
    recipient_index: int,
    bounce_domain: str,
    secret: bytes | Sequence[bytes],
    *,
    prefix: str = VERP_PREFIX,
) -> str:
    """
    The return path ``<prefix>+<token>@<bounce domain>`` for one recipient
    of one message.  The token is lowercase base32, because some MTAs
    change the case of local parts; the local part stays within RFC 5321's
    64 octets or this raises ValueError (keep queue ids short, or hex).
    """
    domain = bounce_domain.lower().rstrip(".")
    key = _derive(_secrets(secret)[0], b"verp")
    payload = bytes((_VERSION,)) + _varint(recipient_index) + _pack_queue_id(queue_id)
    local = f"{prefix}+{_b32encode(payload + _verp_mac(key, domain, payload))}"
    if len(local) > MAX_LOCAL_PART:
        raise ValueError(f"VERP local part of {len(local)} characters exceeds {MAX_LOCAL_PART}")
    return f"{local}@{domain}"


def parse_verp(
    address: str,
    secret: bytes | Sequence[bytes],
    *,
    prefix: str = VERP_PREFIX,
) -> VerpInfo:
    """
    The message and recipient a bounce was sent to; ``TokenError`` for an
    address that is not one of ours (wrong form, tampered, other secret).
    """
    local, sep, domain = address.strip().strip("<>").rpartition("@")
    head, plus, text = local.partition("+")
    if not sep or not plus or head.lower() != prefix.lower():
        raise TokenError("not a VERP address")
    domain = domain.lower().rstrip(".")
    data = _b32decode(text.lower())
    if len(data) < 3 + VERP_MAC_BYTES:
        raise TokenError("VERP token too short")
    payload, mac = data[:-VERP_MAC_BYTES], data[-VERP_MAC_BYTES:]
    try:
        keys = [_derive(s, b"verp") for s in _secrets(secret)]
        ok = any(hmac.compare_digest(mac, _verp_mac(key, domain, payload)) for key in keys)
    except UnicodeError:
        raise TokenError("bad bounce domain")
    if not ok:
        raise TokenError("bad signature")
    if payload[0] != _VERSION:
        raise TokenError("unknown token version")
    recipient, pos = _read_varint(payload, 1)
    return VerpInfo(_unpack_queue_id(payload[pos:]), recipient, domain)
