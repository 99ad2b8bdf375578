"""
A tolerant, bounded MIME reader for reports that come back to the relay.

Bounces and complaints are written by every kind of software, a good share
of it broken: missing closing boundaries, mislabelled charsets, 8-bit bytes
in headers, base64 with bad padding.  Anyone on the internet can send one
to port 25, so the reader must also be cheap on hostile input.  The stdlib
``email`` package fits neither need well: it raises or returns ``Header``
objects for undecodable header bytes, re-parses ``message/delivery-status``
into sub-messages (losing the raw text when the part is transfer-encoded),
and has no limits on depth, part count or size.  So this module splits the
bytes itself and never raises on any input:

- at most ``MAX_MESSAGE`` bytes of the message are looked at (the reports
  this package reads put their machine-readable part before the returned
  copy of the original, so the tail is never needed);
- at most ``MAX_PART`` bytes of any one part are decoded;
- at most ``MAX_PARTS`` parts and ``MAX_DEPTH`` levels of nesting.

Whatever was cut or repaired is recorded as a defect, so callers can say
why a report came out the way it did.
"""

from __future__ import annotations

import binascii
import codecs
import email.errors
import email.header
import html
import quopri
import re
from collections.abc import Iterator

import attrs

from mailrelay.processing.headers import split_message

MAX_MESSAGE = 1024 * 1024
MAX_PART = 256 * 1024
MAX_PARTS = 100
MAX_DEPTH = 8
MAX_HEADERS = 200
MAX_LINE = 2000

#: Types whose body is itself a message with headers.
MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
#: Types whose body is only the header block of a message.
HEADER_TYPES = frozenset({"text/rfc822-headers", "message/global-headers", "text/rfc822-header"})

_TOKEN = r"[^\s;=\"]+"
_PARAM = re.compile(r";\s*(" + _TOKEN + r')\s*=\s*("(?:[^"\\]|\\.)*"?|[^;\s]*)')
_RFC2231 = re.compile(r"^([^*]+)\*(\d+)?(\*)?$")


@attrs.frozen
class Header:
    """One header field: lowercase name and unfolded value as text (8-bit bytes read as UTF-8)."""

    name: str
    value: str


@attrs.frozen
class Part:
    """
    One node of a message's MIME tree.

    ``body`` is the raw (still transfer-encoded) body, cut at ``MAX_PART``;
    ``children`` holds the parts of a multipart, or the one embedded message
    of a ``message/rfc822`` part.
    """

    headers: tuple[Header, ...]
    content_type: str
    params: tuple[tuple[str, str], ...]
    body: bytes
    children: tuple[Part, ...] = ()

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for header in self.headers:
            if header.name == name:
                return header.value
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [h.value for h in self.headers if h.name == name]

    def param(self, name: str) -> str | None:
        """A Content-Type parameter (any case), or None."""
        name = name.lower()
        for key, value in self.params:
            if key == name:
                return value
        return None

    @property
    def charset(self) -> str:
        return self.param("charset") or "utf-8"

    def decoded(self) -> bytes:
        """The body with its Content-Transfer-Encoding undone (bad encodings give the raw bytes)."""
        return decode_transfer(self.body, self.get("content-transfer-encoding"))

    def text(self) -> str:
        """The decoded body as text, in its declared charset (UTF-8, then Latin-1 if that fails)."""
        return decode_text(self.decoded(), self.charset)

    def walk(self, into_messages: bool = True) -> Iterator[Part]:
        """This part and its descendants, depth first; optionally not into embedded messages."""
        yield self
        if self.content_type in MESSAGE_TYPES and not into_messages:
            return
        for child in self.children:
            yield from child.walk(into_messages)


@attrs.define
class _Budget:
    parts: int = 0
    defects: list[str] = attrs.Factory(list)

    def defect(self, text: str) -> None:
        if text not in self.defects and len(self.defects) < 20:
            self.defects.append(text)


def to_text(data: bytes) -> str:
    """Header and structure bytes as text: UTF-8 where valid, otherwise Latin-1 (never fails)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_text(data: bytes, charset: str) -> str:
    """``data`` in ``charset``; an unknown or wrong charset falls back to UTF-8, then Latin-1."""
    try:
        codec = codecs.lookup(charset.strip().strip('"').lower() or "utf-8").name
    except (LookupError, ValueError):
        codec = "utf-8"
    if codec in ("ascii", "us-ascii"):
        codec = "utf-8"  # 8-bit text labelled us-ascii is common; UTF-8 reads ASCII the same
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError, ValueError):
        return to_text(data)


def decode_transfer(body: bytes, encoding: str | None) -> bytes:
    """Undo base64 or quoted-printable; anything else is returned as it is."""
    kind = (encoding or "").strip().lower()
    if kind == "base64":
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
        cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
        try:
            return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
        except (binascii.Error, ValueError):
            return body
    if kind == "quoted-printable":
        return quopri.decodestring(body)
    return body


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded (Subject, From); text that fails to decode stays as it is."""
    if "=?" not in value:
        return value
    try:
        parts = email.header.decode_header(value)
    except (email.errors.MessageError, ValueError, LookupError, UnicodeError, AssertionError):
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(decode_text(chunk, charset or "utf-8"))
    return "".join(out)


def parse_content_type(value: str | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``type/subtype`` lowercased (``text/plain`` when missing or malformed) and its parameters."""
    if not value:
        return "text/plain", ()
    head, _, rest = value.partition(";")
    ctype = head.strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype):
        ctype = "text/plain"
    params: dict[str, str] = {}
    continued: dict[str, dict[int, str]] = {}
    for match in _PARAM.finditer(";" + rest):
        key, raw = match.group(1).lower(), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1] if raw.endswith('"') and len(raw) > 1 else raw[1:])
        split = _RFC2231.match(key)
        if split and (split.group(2) is not None or split.group(3)):
            name, index, star = split.group(1), int(split.group(2) or 0), split.group(3)
            if star:
                raw = _rfc2231_value(raw, first=index == 0)
            continued.setdefault(name, {})[index] = raw
            continue
        params.setdefault(key, raw)
    for name, pieces in continued.items():
        params.setdefault(name, "".join(pieces[i] for i in sorted(pieces)))
    return ctype, tuple(params.items())


def _rfc2231_value(raw: str, first: bool) -> str:
    charset = "utf-8"
    if first and raw.count("'") >= 2:
        charset, _, raw = raw.split("'", 2)
    try:
        data = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), raw).encode("latin-1")
    except UnicodeEncodeError:
        return raw
    return decode_text(data, charset or "utf-8")


_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]{1,200})[ \t]*:")


def parse_headers(block: bytes, limit: int = MAX_HEADERS) -> tuple[Header, ...]:
    """
    The fields of a header block as ``Header`` values, unfolded; lines
    that are neither a field nor a continuation are dropped.  (Continuation
    lines are gathered in lists and joined once: appending each to the
    field's bytes is quadratic in the number of lines.)
    """
    fields: list[tuple[str, list[bytes]]] = []
    for line in block[:MAX_PART].splitlines():
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            continue
        match = _FIELD_NAME.match(line)
        if match is None:
            continue
        if len(fields) >= limit:
            break
        fields.append((match.group(1).decode("ascii").lower(), [line[match.end() :]]))
    return tuple(Header(name, to_text(b" ".join(p.strip(b" \t") for p in parts).strip())) for name, parts in fields)


def _split_headers(data: bytes) -> tuple[bytes, bytes]:
    """Header block and body; a message starting with a non-header line is all body."""
    if data.startswith(b"From "):
        # An mbox separator line left in front by whatever stored the message.
        data = data.partition(b"\n")[2]
    head, rest = split_message(data)
    first = head.split(b"\n", 1)[0]
    if head and not re.match(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:", first):
        return b"", data
    # Drop the empty separator line.
    if rest.startswith(b"\r\n"):
        rest = rest[2:]
    elif rest.startswith(b"\n"):
        rest = rest[1:]
    return head, rest


def _split_multipart(body: bytes, boundary: str, budget: _Budget) -> list[bytes]:
    delimiter = re.compile(
        rb"(?:^|\r?\n)--" + re.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*(?=\r?\n|$)"
    )
    pieces: list[bytes] = []
    start: int | None = None
    closed = False
    for match in delimiter.finditer(body):
        if start is not None:
            pieces.append(body[start : match.start()])
        if match.group(1):
            closed = True
            break
        start = match.end()
        # Skip the line ending after the delimiter line.
        if body[start : start + 2] == b"\r\n":
            start += 2
        elif body[start : start + 1] == b"\n":
            start += 1
    else:
        if start is not None:
            pieces.append(body[start:])
    if not pieces:
        budget.defect("multipart without any boundary line")
    elif not closed:
        budget.defect("multipart without a closing boundary")
    return pieces


def _parse(data: bytes, depth: int, budget: _Budget, default_type: str = "text/plain") -> Part:
    budget.parts += 1
    head, body = _split_headers(data)
    headers = parse_headers(head)
    ctype_value = next((h.value for h in headers if h.name == "content-type"), None)
    ctype, params = parse_content_type(ctype_value) if ctype_value is not None else (default_type, ())
    children: list[Part] = []
    if ctype.startswith("multipart/"):
        boundary = dict(params).get("boundary")
        if not boundary:
            budget.defect("multipart without a boundary parameter")
        elif depth >= MAX_DEPTH:
            budget.defect(f"nesting deeper than {MAX_DEPTH} levels not read")
        else:
            child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            for piece in _split_multipart(body, boundary, budget):
                if budget.parts >= MAX_PARTS:
                    budget.defect(f"more than {MAX_PARTS} parts; the rest not read")
                    break
                children.append(_parse(piece, depth + 1, budget, child_type))
        body = b""
    elif ctype in MESSAGE_TYPES:
        if depth >= MAX_DEPTH:
            budget.defect(f"nesting deeper than {MAX_DEPTH} levels not read")
        elif budget.parts < MAX_PARTS:
            inner = decode_transfer(
                body[:MAX_MESSAGE], next((h.value for h in headers if h.name == "content-transfer-encoding"), None)
            )
            children.append(_parse(inner, depth + 1, budget))
        body = body[:MAX_PART]
    if len(body) > MAX_PART:
        budget.defect(f"a part longer than {MAX_PART} bytes was cut")
        body = body[:MAX_PART]
    return Part(headers, ctype, params, body, tuple(children))


def parse_message(data: bytes) -> tuple[Part, tuple[str, ...]]:
    """The MIME tree of ``data`` (first ``MAX_MESSAGE`` bytes) and the defects met on the way."""
    budget = _Budget()
    if len(data) > MAX_MESSAGE:
        budget.defect(f"message longer than {MAX_MESSAGE} bytes; only the start was read")
        data = data[:MAX_MESSAGE]
    root = _parse(data, 0, budget)
    return root, tuple(budget.defects)


def parse_header_block(data: bytes) -> tuple[Header, ...]:
    """Headers from a ``text/rfc822-headers`` body (or a message whose body is ignored)."""
    head, _ = _split_headers(data.lstrip(b"\r\n"))
    return parse_headers(head)


# ---------------------------------------------------------------------------
# Text helpers shared by the report parsers
# ---------------------------------------------------------------------------

_FIELD_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)")


def field_groups(text: str) -> list[list[tuple[str, str]]]:
    """
    ``Name: value`` blocks separated by blank lines (the layout of
    ``message/delivery-status`` and ``message/feedback-report``), with
    folded lines joined and names lowercased.  Lines that are neither a
    field nor a continuation are skipped.
    """
    groups: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for raw in text.splitlines()[:5000]:
        line = raw[:MAX_LINE]
        if not line.strip():
            if current:
                groups.append(current)
                current = []
            continue
        if line[:1] in (" ", "\t") and current:
            name, value = current[-1]
            current[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        match = _FIELD_LINE.match(line)
        if match:
            current.append((match.group(1).lower(), match.group(2).strip()))
    if current:
        groups.append(current)
    return groups


_BLOCK_TAGS = re.compile(r"(?i)<\s*/?\s*(?:br|p|div|tr|li|h[1-6]|table|pre|blockquote)\b[^>]{0,2000}>")
_TAGS = re.compile(r"<[^<>]{0,2000}>")
_INVISIBLE = re.compile(r"(?i)<(style|script|head)\b")


def _drop_invisible(markup: str) -> str:
    """
    Remove style, script and head elements.  A loop of ``find`` calls
    rather than one regex: a lazy ``<style>.*?</style>`` rescans the rest
    of the text for every unclosed opening tag, which is quadratic.
    """
    out: list[str] = []
    pos = 0
    while True:
        match = _INVISIBLE.search(markup, pos)
        if match is None:
            out.append(markup[pos:])
            break
        out.append(markup[pos : match.start()])
        close = re.compile(rf"(?i)</{match.group(1)}[^>]{{0,100}}>").search(markup, match.end())
        if close is None:
            break  # unclosed: the rest is inside it
        pos = close.end()
    return " ".join(out)


def html_to_text(markup: str) -> str:
    """Rough text of an HTML part: enough to find an address and an SMTP reply in it."""
    markup = _drop_invisible(markup[:MAX_PART])
    markup = _BLOCK_TAGS.sub("\n", markup)
    markup = _TAGS.sub("", markup)
    return html.unescape(markup)
