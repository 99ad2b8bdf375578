"""
RFC 3464 delivery status notifications, and the SMTP reply inside them.

A ``message/delivery-status`` body is one block of per-message fields and
one block per recipient, separated by blank lines.  What real MTAs send
deviates in ways that must not lose the bounce:

- fields folded over several lines (Gmail folds ``Diagnostic-Code`` and
  repeats ``550-5.1.1`` at the start of each line of a multi-line reply);
- a missing blank line between two recipients (a repeated field starts a
  new block), or between the per-message block and the first recipient;
- optional fields missing, ``Action`` missing (it follows from
  ``Status``), address types missing (``Final-Recipient: x@y``);
- ``Status: 5.0.0`` while the diagnostic carries the real ``5.2.1``
  (Exim): the reply is rebuilt from the diagnostic where it has one,
  because that is what the receiving server said.

The rebuilt ``Reply`` goes through ``mailrelay.delivery.classify`` so the
relay has one table of what replies mean, for its own deliveries and for
bounces that come back later alike.
"""

from __future__ import annotations

import re

import attrs

from mailrelay.delivery.classify import classify
from mailrelay.feedback.mime import field_groups
from mailrelay.feedback.model import ACTIONS, Action, RecipientStatus
from mailrelay.types import Reply

_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
_REPLY_START = re.compile(r"\s*([245]\d\d)(?:[ \t-]+|$)(?:([245]\.\d{1,3}\.\d{1,3})(?![\d.])[ \t]*)?")
_ADDR_TYPE = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._+-]{0,30})\s*;\s*(.*)", re.S)
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")

_CODE_FOR_CLASS = {"2": 250, "4": 450, "5": 550}
_CODE_FOR_ACTION = {"failed": 550, "delayed": 450}
_ACTION_ALIASES = {
    "failure": "failed",
    "fail": "failed",
    "bounced": "failed",
    "bounce": "failed",
    "delay": "delayed",
    "deferred": "delayed",
    "deliver": "delivered",
    "success": "delivered",
    "succeeded": "delivered",
}
_PER_RECIPIENT = frozenset(
    {"final-recipient", "original-recipient", "action", "status", "diagnostic-code", "remote-mta"}
)
_STARTS_BLOCK = ("final-recipient", "action", "status")


def parse_status(value: str | None) -> str:
    """The enhanced status code at the start of ``value`` (``"5.1.1"``), or ``""``."""
    match = _STATUS.match(value or "")
    return ".".join(match.groups()) if match else ""


def parse_address_field(value: str | None) -> tuple[str | None, str]:
    """
    ``(type, address)`` from ``rfc822; <x@y>``; the type is None when the
    sender left it out.  RFC 6533 ``utf-8`` escapes (``\\x{E9}``) are decoded.
    """
    if not value:
        return None, ""
    kind: str | None = None
    match = _ADDR_TYPE.match(value)
    if match and "@" not in match.group(1):
        kind, value = match.group(1).lower(), match.group(2)
    value = value.strip()
    if kind == "utf-8":
        value = _UTF8_ESCAPE.sub(lambda m: _chr(m.group(1)), value)
    value = value.strip().strip("<>").strip()
    if any(ch.isspace() for ch in value):
        words = [w.strip("<>,;") for w in value.split()]
        value = next((w for w in words if "@" in w), words[0] if words else "")
    return kind, value


def _chr(hexdigits: str) -> str:
    number = int(hexdigits, 16)
    return chr(number) if number <= 0x10FFFF and not 0xD800 <= number <= 0xDFFF else "\ufffd"


def parse_mta(value: str | None) -> str | None:
    """The host of an MTA field (``dns; mx.example.com. (comment)`` -> ``mx.example.com``)."""
    if not value:
        return None
    host = value.split(";", 1)[1] if ";" in value.split("(")[0] else value
    host = host.split("(")[0].strip()
    host = host.split()[0] if host.split() else ""
    return host.rstrip(".") or None


def normalise_action(value: str | None, status: str) -> Action | None:
    """The RFC 3464 action a sender meant; from the status class when missing or unknown."""
    word = (value or "").strip().lower().split(" ")[0].split("(")[0].strip(";,.")
    word = _ACTION_ALIASES.get(word, word)
    for action in ACTIONS:
        if word == action:
            return action
    if status[:1] == "5":
        return "failed"
    if status[:1] == "4":
        return "delayed"
    if status[:1] == "2":
        return "delivered"
    return None


def parse_reply(text: str, status: str, action: Action) -> Reply:
    """
    The SMTP reply a diagnostic stands for.  ``550-5.1.1 a 550-5.1.1 b``
    (a multi-line reply unfolded into one) becomes ``550 5.1.1 a b``.
    Without a reply code the code follows from ``status``, then from
    ``action``; the enhanced code is the reply's own when it has one.
    """
    text = " ".join(text.split())
    match = _REPLY_START.match(text)
    code: int | None = None
    reply_status = ""
    if match:
        code = int(match.group(1))
        reply_status = match.group(2) or ""
        text = text[match.end() :]
        repeat = re.escape(str(code)) + r"[ -]" + (re.escape(reply_status) + r"(?=\s)" if reply_status else "")
        text = re.sub(r"(?:^|\s)" + repeat + r"\s*", " ", text).strip()
    if code is None:
        code = _CODE_FOR_CLASS.get(status[:1]) or _CODE_FOR_ACTION.get(action, 250)
    if reply_status and reply_status[0] != str(code)[0]:
        reply_status = ""
    if not reply_status and status[:1] == str(code)[0]:
        reply_status = status
    return Reply(code, reply_status, text)


def make_status(
    recipient: str,
    action: Action,
    status: str,
    diagnostic: str,
    *,
    diagnostic_type: str | None = None,
    original_recipient: str | None = None,
    remote_mta: str | None = None,
    last_attempt: str | None = None,
    will_retry_until: str | None = None,
) -> RecipientStatus:
    """A ``RecipientStatus`` with its reply rebuilt and classified."""
    reply = parse_reply(diagnostic, status, action)
    return RecipientStatus(
        recipient=recipient,
        action=action,
        status=status,
        diagnostic=" ".join(diagnostic.split()),
        reply=reply,
        classification=classify(reply),
        original_recipient=original_recipient,
        diagnostic_type=diagnostic_type,
        remote_mta=remote_mta,
        last_attempt=last_attempt,
        will_retry_until=will_retry_until,
    )


@attrs.frozen
class DeliveryStatus:
    """A parsed ``message/delivery-status`` body."""

    per_message: tuple[tuple[str, str], ...]
    recipients: tuple[RecipientStatus, ...]
    defects: tuple[str, ...] = ()

    def get(self, name: str) -> str | None:
        return next((value for key, value in self.per_message if key == name), None)


def _blocks(groups: list[list[tuple[str, str]]]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    per_message: list[tuple[str, str]] = []
    blocks: list[dict[str, str]] = []
    for group in groups:
        if not any(name in _PER_RECIPIENT for name, _ in group):
            per_message.extend(group)
            continue
        current: dict[str, str] = {}
        for name, value in group:
            if name in _STARTS_BLOCK and name in current:
                blocks.append(current)
                current = {}
            if name in _PER_RECIPIENT:
                current.setdefault(name, value)
            elif not blocks and not current:
                per_message.append((name, value))  # per-message field before the first recipient
            else:
                current.setdefault(name, value)
        if current:
            blocks.append(current)
    return per_message, blocks


def parse_delivery_status(text: str) -> DeliveryStatus:
    """The per-message fields and per-recipient statuses of a ``message/delivery-status`` body."""
    per_message, blocks = _blocks(field_groups(text))
    recipients: list[RecipientStatus] = []
    defects: list[str] = []
    for block in blocks[:100]:
        status = parse_status(block.get("status"))
        if block.get("status") and not status:
            defects.append(f"unreadable Status {block['status'][:40]!r}")
        diag_type, diagnostic = None, block.get("diagnostic-code", "")
        match = _ADDR_TYPE.match(diagnostic)
        if match and not re.match(r"\d", match.group(1)):
            diag_type, diagnostic = match.group(1).lower(), match.group(2)
        action = normalise_action(block.get("action"), status)
        if action is None:
            reply_code = _REPLY_START.match(diagnostic)
            action = normalise_action(None, reply_code.group(1)[0] if reply_code else "")
        if action is None:
            defects.append("a recipient block with neither Action nor Status was skipped")
            continue
        _, final = parse_address_field(block.get("final-recipient"))
        original = parse_address_field(block.get("original-recipient"))[1] or None
        recipients.append(
            make_status(
                final or original or "",
                action,
                status,
                diagnostic,
                diagnostic_type=diag_type,
                original_recipient=original,
                remote_mta=parse_mta(block.get("remote-mta")),
                last_attempt=block.get("last-attempt-date"),
                will_retry_until=block.get("will-retry-until"),
            )
        )
    return DeliveryStatus(tuple(per_message), tuple(recipients), tuple(defects))
