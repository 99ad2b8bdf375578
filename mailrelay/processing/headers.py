"""
Byte-level access to a message's header block.

The processing stage edits headers surgically: it removes, replaces and adds
fields without re-serialising the others, so what it does not touch stays
byte-identical (a DKIM signature made by the client, the client's own
folding, 8-bit text under SMTPUTF8).  The stdlib ``email`` package cannot
promise that, so this module splits the raw bytes itself.
"""

from __future__ import annotations

import email.utils
import functools
import math
import re
from collections.abc import Iterable

import attrs

_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


@attrs.frozen
class Field:
    """
    One header field as it appears in the message: ``raw`` holds every
    physical line of it (continuations included) with their line endings.
    A line that is neither a field nor a continuation becomes a field whose
    ``name`` is empty, so nothing is ever lost when the block is rebuilt.
    """

    name: bytes
    raw: bytes
    #: The field name, lowercased, as text (names are ASCII); made once, read
    #: dozens of times per message by the policy, the controls and rendering.
    lname: str = attrs.field(init=False, eq=False, repr=False)

    @lname.default
    def _lname(self) -> str:
        return self.name.decode("ascii").lower()

    @property
    def value(self) -> bytes:
        """The unfolded value: line breaks removed, surrounding blanks stripped."""
        colon = self.raw.find(b":")
        return unfold(self.raw[colon + 1 :]).strip(b" \t") if colon >= 0 else b""


_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def unfold(value: bytes) -> bytes:
    """Remove the line breaks of folding (RFC 5322 section 2.2.3) and the trailing one."""
    newline = value.find(b"\n")
    if newline < 0 or newline == len(value) - 1:
        return value.rstrip(b"\r\n")  # one line: nothing folded (most fields)
    return _FOLD.sub(b"", value).rstrip(b"\r\n")


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """
    Split a message into its header block and the rest.

    The header block ends with the line ending of its last field; the rest
    starts with the empty separator line (so ``header + rest == message``).
    A message without an empty line is all header.
    """
    if message.startswith((b"\r\n", b"\n")):
        return b"", message
    match = re.search(rb"\n(?=\r?\n)", message)
    if match is None:
        return message, b""
    return message[: match.end()], message[match.end() :]


#: The last header block parsed and its fields: the policy, the control headers
#: and the Received: line each read the same block of a message in a row.
_last: tuple[bytes, tuple[Field, ...]] = (b"", ())


def parse_fields(header_block: bytes) -> list[Field]:
    """The fields of a header block, in order; see ``Field`` for odd lines."""
    global _last
    last = _last
    if last[0] == header_block:
        return list(last[1])  # fields are immutable; the list is the caller's
    # Lines are collected per field and joined once: a field folded over
    # many lines must not cost quadratic time (hostile input).
    parts: list[tuple[bytes, list[bytes]]] = []
    for line in _LINE.findall(header_block):
        if line[:1] in (b" ", b"\t") and parts:
            parts[-1][1].append(line)
            continue
        match = _FIELD_NAME.match(line)
        parts.append((match.group(1) if match else b"", [line]))
    fields = [Field(name, b"".join(lines)) for name, lines in parts]
    _last = (bytes(header_block), tuple(fields))
    return fields


def join_fields(fields: Iterable[Field]) -> bytes:
    return b"".join(field.raw for field in fields)


def remove_fields(header_block: bytes, names: Iterable[str], prefixes: Iterable[str] = ()) -> bytes:
    """
    The header block without the fields named in ``names`` (any case) or
    whose name starts with one of ``prefixes`` (lowercase); continuation
    lines go with their field.  Other bytes are kept as they are.
    """
    drop = {name.lower() for name in names}
    starts = tuple(prefixes)
    return join_fields(
        f for f in parse_fields(header_block) if not (f.name and (f.lname in drop or f.lname.startswith(starts)))
    )


def message_date(ts: float) -> str:
    """
    ``ts`` as an RFC 5322 date-time in GMT, to the second (the Date field,
    a Received line).  Cached per second: each message asks more than once.
    """
    return _date_of_second(math.floor(ts))


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def line_ending(message: bytes) -> bytes:
    """The line ending the message uses (CRLF unless its first line ends in a bare LF)."""
    end = message.find(b"\n")
    return b"\n" if end == 0 or (end > 0 and message[end - 1 : end] != b"\r") else b"\r\n"


def make_field(name: str, value: str | bytes, eol: bytes = b"\r\n") -> Field:
    """
    A new field, folded at spaces so lines stay under 78 characters when
    possible (RFC 5322 section 2.1.1); ``value`` must not contain line breaks.
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    if b"\n" in data or b"\r" in data:
        raise ValueError(f"line break in the value of {name}")
    head = name.encode("ascii") + b":"
    words = data.split(b" ")
    lines: list[bytes] = []
    current = head
    for word in words:
        if current != head and len(current) + 1 + len(word) > 76:
            lines.append(current)
            current = b" " + word
        else:
            current += b" " + word
    lines.append(current)
    return Field(name.encode("ascii"), eol.join(lines) + eol)
