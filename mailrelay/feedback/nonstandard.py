"""
Bounces that are not RFC 3464 reports: one documented table of formats.

Most large receivers send proper DSNs now, but qmail, old Exim, old
Postfix, Exchange, Yahoo's old servers, Gmail's text-only notices and
Lotus Domino still send (or are relayed as) plain text.  Each row of
``FORMATS`` says how to recognise one format and where in it the failed
address and the remote server's reply are.  Rows are tried in order; the
first whose ``detect`` pattern is found in the notice text is used.

Two ways to find recipients:

- ``start``: a line that opens one recipient's paragraph (``<x@y>:`` for
  qmail, ``  x@y`` for Exim).  The following lines, up to a blank line or
  the next opening line, are its diagnostic; indented lines continue the
  line before them (Postfix and Exim fold long replies that way).
- ``inline``: a sentence with the address in it (Gmail, Domino), with an
  optional ``diag`` group.

The reply is then looked for in the recipient's diagnostic (the row's
``reply`` patterns, then any ``4xx``/``5xx`` reply), then anywhere in the
notice.  ``end`` cuts off the returned copy of the message, so nothing in
it is mistaken for a recipient.

``flufl.bounce`` (Mailman's detectors) was considered as a fallback and
not used: it returns addresses only, never the reply, so it cannot tell a
dead mailbox from a block; the VERP return path already names the
recipient; and version 6.0.0 raises IndexError for any message without a
From header.
"""

from __future__ import annotations

import re

import attrs

from mailrelay.feedback.dsn import make_status
from mailrelay.feedback.model import Action, RecipientStatus

MAX_TEXT = 64 * 1024
MAX_LINE = 2000
MAX_RECIPIENTS = 100

ADDR = r"[^\s@<>()\[\]\"',;:]{1,128}@[^\s@<>()\[\]\"',;:]{1,253}"
_FLAGS = re.I | re.M


def _c(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, _FLAGS)


@attrs.frozen
class BounceFormat:
    """One row of the table; see the module docstring."""

    name: str
    detect: re.Pattern[str]
    start: re.Pattern[str] | None = None
    inline: tuple[re.Pattern[str], ...] = ()
    reply: tuple[re.Pattern[str], ...] = ()
    end: re.Pattern[str] | None = None
    delayed: re.Pattern[str] | None = None


_COPY_BELOW = _c(r"^-{2,} ?Below this line is a copy of the message")

FORMATS: tuple[BounceFormat, ...] = (
    # QSBMF, http://cr.yp.to/proto/qsbmf.txt: "<addr>:" then free text; "(#5.1.1)" status hints.
    BounceFormat(
        "qmail",
        detect=_c(
            r"^Hi\. This is the qmail(?:-send)? program|^This is the mail transfer program at|"
            r"I'm afraid I wasn't able to deliver your message"
        ),
        start=_c(rf"^<(?P<addr>{ADDR})>:[ \t]*(?P<rest>.*)$"),
        reply=(_c(r"Remote host said:\s*(?P<reply>[245]\d\d\b.*)$"),),
        end=_COPY_BELOW,
    ),
    # Yahoo's pre-DSN servers, a qmail descendant.
    BounceFormat(
        "yahoo",
        detect=_c(r"Sorry,? we were unable to deliver your message to the following address"),
        start=_c(rf"^<(?P<addr>{ADDR})>:[ \t]*(?P<rest>.*)$"),
        reply=(_c(r"Remote host said:\s*(?P<reply>[245]\d\d\b.*)$"),),
        end=_COPY_BELOW,
    ),
    # Postfix before DSN support (2.3), and its notice text when the report part is missing.
    BounceFormat(
        "postfix",
        detect=_c(r"This is the (?:mail system|Postfix program) at host"),
        start=_c(rf"^<(?P<addr>{ADDR})>(?: \(expanded from <[^>\n]{{0,300}}>\))?:[ \t]*(?P<rest>.*)$"),
        reply=(_c(r"said:\s*(?P<reply>[245]\d\d[ -].*?)(?:\s*\(in reply to [^)\n]{0,100}\))?\s*$"),),
        delayed=_c(r"THIS IS A WARNING ONLY"),
    ),
    # Exim: two-space-indented address, four-space-indented details.
    BounceFormat(
        "exim",
        detect=_c(r"This message was created automatically by mail delivery software"),
        start=_c(rf"^ {{1,3}}(?P<addr>{ADDR})[ \t]*$"),
        reply=(
            _c(
                r"SMTP error from remote (?:mail server|mailer) after [^\n]{0,300}?:\s*(?:host [^\n:]{0,300}:\s*)?"
                r"(?P<reply>[245]\d\d[ -].*)$"
            ),
        ),
        end=_c(r"^-{2,} (?:This is a copy of (?:the|your) message|The body of the message|Original message)"),
        delayed=_c(r"has not yet been delivered|not yet been delivered"),
    ),
    # Sendmail without DSN.
    BounceFormat(
        "sendmail",
        detect=_c(r"The following addresses had (?:permanent fatal|transient non-fatal) errors"),
        start=_c(rf"^[ \t]*<?(?P<addr>{ADDR})>?[ \t]*(?:\(expanded from: [^)\n]{{0,300}}\))?[ \t]*$"),
        reply=(_c(r"\(reason:\s*(?P<reply>[^)\n]*)\)"),),
        end=_c(r"^\s*-{3,} (?:Transcript of session follows|Original message follows|The original message)"),
        delayed=_c(r"transient non-fatal errors|Warning: could not send message for past"),
    ),
    # Microsoft Exchange / Microsoft 365 NDR text: address lines in the administrators' section.
    BounceFormat(
        "microsoft",
        detect=_c(
            r"Delivery has failed to these recipients or groups|Your message to \S{1,300} couldn't be "
            r"delivered|Your message did not reach some or all of the intended recipients|"
            r"Diagnostic information for administrators|The following recipient\(s\) cannot be reached"
        ),
        start=_c(rf"^[ \t]*(?P<addr>{ADDR})(?:[ \t]+\({ADDR}\)|[ \t]+on [0-9][^\n]{{0,60}})?[ \t]*$"),
        reply=(
            _c(r"Remote Server returned '(?P<reply>[^'\n]*)'"),
            _c(r"#(?P<reply>[245]\d\d[ -][^#\n]*)#"),
            _c(r"smtp;\s*(?P<reply>[245]\d\d[ -][^>\n]*)>?"),
        ),
        end=_c(r"^Original message headers:"),
    ),
    # Gmail's text-only notices, current and old wording.
    BounceFormat(
        "gmail",
        detect=_c(
            r"^\*\* (?:Address not found|Message not delivered|Message blocked|Delivery incomplete|"
            r"Message delayed) \*\*|Delivery to the following recipients? (?:failed|has been delayed)"
        ),
        inline=(
            _c(rf"Your message wasn't delivered to (?P<addr>{ADDR}) because"),
            _c(rf"Your message to (?P<addr>{ADDR}) has (?:been blocked|not been delivered)"),
            _c(rf"There was a (?:temporary )?problem delivering your message to (?P<addr>{ADDR})"),
            _c(
                rf"Delivery to the following recipients? (?:failed permanently|failed|has been delayed):"
                rf"\s{{0,200}}(?P<addr>{ADDR})"
            ),
        ),
        reply=(
            _c(
                r"The (?:response|error)(?: from the remote server| that the other server returned)? was:"
                r"\s{0,20}(?P<reply>\S[^\n]*(?:\n[^\n]+){0,10})"
            ),
        ),
        end=_c(r"^-{3,} ?Original message ?-{3,}"),
        delayed=_c(r"^\*\* (?:Delivery incomplete|Message delayed) \*\*|has been delayed|will (?:keep|retry)"),
    ),
    # Lotus Notes / HCL Domino.
    BounceFormat(
        "domino",
        detect=_c(r"^\s*was not delivered to:"),
        inline=(
            _c(
                rf"was not delivered to:\s{{0,200}}?(?P<addr>{ADDR})\s{{0,200}}?because:\s{{0,200}}?"
                r"(?P<diag>[^\n]+)"
            ),
        ),
    ),
)

_ANY_REPLY = re.compile(r"(?<![\w.:/#-])([45]\d\d)(?:[ -]([45]\.\d{1,3}\.\d{1,3}))?[ -](?=\S)")
_STATUS_HINT = re.compile(r"#\s?([245]\.\d{1,3}\.\d{1,3})(?!\d)")


@attrs.frozen
class Found:
    """One recipient a text notice names, before classification."""

    address: str
    diagnostic: str
    reply: str | None
    status_hint: str


def _clean_address(address: str) -> str:
    return address.strip().strip("<>").rstrip(".")


def _find_reply(text: str, patterns: tuple[re.Pattern[str], ...]) -> str | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match and match.group("reply").strip():
            return " ".join(match.group("reply").split())
    for line in text.splitlines():
        match = _ANY_REPLY.search(line)
        if match:
            return line[match.start() :].strip()
    return None


def _lines(text: str) -> list[str]:
    return [line[:MAX_LINE] for line in text[:MAX_TEXT].splitlines()]


def _paragraph_blocks(fmt: BounceFormat, lines: list[str]) -> list[tuple[str, list[str]]]:
    assert fmt.start is not None
    blocks: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    for line in lines:
        match = fmt.start.match(line)
        if match:
            current = (match.group("addr"), [])
            blocks.append(current)
            rest = match.groupdict().get("rest") or ""
            if rest.strip():
                current[1].append(rest.strip())
            if len(blocks) >= MAX_RECIPIENTS:
                break
            continue
        if current is None:
            continue
        if not line.strip():
            current = None
            continue
        if line[:1] in (" ", "\t") and current[1] and fmt.name in ("postfix", "exim", "microsoft"):
            current[1][-1] = f"{current[1][-1]} {line.strip()}"
        else:
            current[1].append(line.strip())
    return blocks


def extract(fmt: BounceFormat, text: str) -> list[Found]:
    """The recipients a notice of format ``fmt`` names, in order, one per address."""
    if fmt.end is not None:
        end = fmt.end.search(text[:MAX_TEXT])
        if end:
            text = text[: end.start()]
    lines = _lines(text)
    section = "\n".join(lines)
    found: list[Found] = []
    if fmt.start is not None:
        for address, diag_lines in _paragraph_blocks(fmt, lines):
            diagnostic = "\n".join(diag_lines)
            hint = _STATUS_HINT.search(diagnostic)
            found.append(Found(address, diagnostic, _find_reply(diagnostic, fmt.reply), hint.group(1) if hint else ""))
    for pattern in fmt.inline:
        for match in pattern.finditer(section):
            diagnostic = " ".join((match.groupdict().get("diag") or "").split())
            hint = _STATUS_HINT.search(diagnostic)
            reply = _find_reply(diagnostic, fmt.reply) if diagnostic else None
            found.append(Found(match.group("addr"), diagnostic, reply, hint.group(1) if hint else ""))
            if len(found) >= MAX_RECIPIENTS:
                break
    shared = None
    if any(f.reply is None for f in found):
        shared = _find_reply(section, fmt.reply) if fmt.reply else None
    out: dict[str, Found] = {}
    for item in found:
        address = _clean_address(item.address)
        if "@" not in address:
            continue
        if item.reply is None and shared is not None and not item.diagnostic:
            item = attrs.evolve(item, reply=shared)
        item = attrs.evolve(item, address=address)
        key = address.lower()
        if key not in out or (out[key].reply is None and item.reply is not None):
            out[key] = item
    return list(out.values())


def to_status(item: Found, action: Action) -> RecipientStatus:
    """A classified ``RecipientStatus`` for one recipient of a text notice."""
    if item.reply:
        found = make_status(item.address, action, item.status_hint, item.reply, diagnostic_type="smtp")
    else:
        found = make_status(item.address, action, item.status_hint, item.diagnostic, diagnostic_type="text")
    # A text notice has no Status field: report the enhanced code its reply carries.
    return found if found.status else attrs.evolve(found, status=found.reply.status)


def detect(text: str) -> BounceFormat | None:
    """The first row of ``FORMATS`` whose ``detect`` pattern is in ``text``."""
    head = text[:MAX_TEXT]
    for fmt in FORMATS:
        if fmt.detect.search(head):
            return fmt
    return None


def parse_text_bounce(text: str) -> tuple[BounceFormat, Action, list[RecipientStatus]] | None:
    """
    The format, the action (``delayed`` for a warning) and the recipients
    of a text notice; None if no row recognises it.  A recognised notice
    naming no address but quoting a reply gives one recipient ``""``: the
    VERP return path says whom it was for.
    """
    fmt = detect(text)
    if fmt is None:
        return None
    action: Action = "delayed" if fmt.delayed is not None and fmt.delayed.search(text[:MAX_TEXT]) else "failed"
    found = [to_status(item, action) for item in extract(fmt, text)]
    if not found:
        reply = find_any_reply(text)
        if reply is not None:
            found = [anonymous_status(reply, action)]
    return fmt, action, found


def anonymous_status(reply: str, action: Action = "failed") -> RecipientStatus:
    """The status of a recipient a notice does not name, from the reply it quotes."""
    return to_status(Found("", reply, reply, ""), action)


def find_any_reply(text: str) -> str | None:
    """The first ``4xx``/``5xx`` SMTP reply in ``text`` (for notices no row recognises)."""
    return _find_reply("\n".join(_lines(text)), ())
