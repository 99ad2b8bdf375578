"""
Delivery status notifications (RFC 3464): the bounce and delay notices the
queue sends back.

A notice is ``multipart/report; report-type=delivery-status`` with three
parts: a text for people (what failed and the remote server's words, as
Postfix writes it), the ``message/delivery-status`` fields for software,
and the original message's header section as ``text/rfc822-headers`` (not
the whole message: it may be 20 MB, and the headers are what a sender needs
to recognise it).

Building one is pure: every value that changes the bytes (times, ids, the
boundary) comes in as an argument, so a test can compare exact output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

from mailrelay.processing.controls import strip_control_headers
from mailrelay.processing.headers import message_date, parse_fields, split_message

Action = Literal["failed", "delayed"]

#: Header fields of the original that never go back in a notice.
_PRIVATE = ("bcc", "resent-bcc", "dkim-signature")


@attrs.frozen
class DSNRecipient:
    """
    One recipient in a notice.  ``status`` is the RFC 3463 code (``5.1.1``);
    ``diagnostic`` the remote reply (or the relay's own sentence) and
    ``remote_mta`` the server that gave it, when there was one.
    """

    recipient: str
    action: Action
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


def status_of(code: int, status: str) -> str:
    """The enhanced status code of a reply, or the class default when the server gave none."""
    if status and status[0] in "245" and status.count(".") == 2:
        return status
    return f"{str(code)[0]}.0.0" if 200 <= code < 600 else "5.0.0"


def _address_field(name: str, address: str) -> str:
    # RFC 6533: an address that is not ASCII is typed utf-8.
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{name}: {kind}; {address}"


def _clean(text: str) -> str:
    """One header-safe line: no CR/LF, no control characters, bounded."""
    out = "".join(ch if ch >= " " and ch != "\x7f" else " " for ch in text)
    return " ".join(out.split())[:900]


def original_headers(message: bytes) -> bytes:
    """The header section of ``message`` as it may go back to the sender (no Bcc, no control headers)."""
    head = strip_control_headers(split_message(message)[0])
    kept = [f.raw for f in parse_fields(head) if not (f.name and f.lname in _PRIVATE)]
    lines = b"".join(r if r.endswith(b"\n") else r + b"\r\n" for r in kept)
    # One line ending throughout: the notice is CRLF.
    return lines.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _human_text(
    reporting_mta: str,
    queue_id: str,
    recipients: Sequence[DSNRecipient],
    reason: str | None,
    delayed: bool,
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if delayed:
        until = max((r.will_retry_until or 0.0) for r in recipients)
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            f"It will be retried until {message_date(until)}." if until else "It will be retried.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    if reason:
        lines += ["", reason]
    lines += ["", f"The queue id of your message was {queue_id}.", ""]
    for r in recipients:
        said = f"host {r.remote_mta} said: {r.diagnostic}" if r.remote_mta and r.diagnostic else r.diagnostic
        lines.append(f"<{r.recipient}>: {_clean(said or r.status)}")
    return "\r\n".join(lines) + "\r\n"


def build_dsn(
    *,
    reporting_mta: str,
    from_address: str,
    to_address: str,
    queue_id: str,
    arrival: float,
    now: float,
    message_id: str,
    recipients: Sequence[DSNRecipient],
    original: bytes,
    reason: str | None = None,
) -> bytes:
    """
    The notice for the message ``queue_id`` (accepted at ``arrival``) about
    ``recipients``, from ``from_address`` (MAILER-DAEMON) to
    ``to_address``.  ``original`` is the stored message, or at least its
    header section.  All recipients must share one action: a bounce and a
    delay notice are separate messages.
    """
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    actions = {r.action for r in recipients}
    if len(actions) != 1:
        raise ValueError("one notice reports one action")
    delayed = actions == {"delayed"}
    boundary = f"{queue_id}.{int(now)}/{reporting_mta}"
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    utf8 = not all(r.recipient.isascii() for r in recipients)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"

    head = [
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{to_address}>",
        f"Subject: {subject}",
        f"Date: {message_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    human = _human_text(reporting_mta, queue_id, recipients, reason, delayed)
    fields = [f"Reporting-MTA: dns; {reporting_mta}", f"Arrival-Date: {message_date(arrival)}", ""]
    for r in recipients:
        fields.append(_address_field("Final-Recipient", r.recipient))
        fields.append(f"Action: {r.action}")
        fields.append(f"Status: {r.status}")
        if r.remote_mta:
            fields.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        if r.diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {_clean(r.diagnostic)}")
        if r.last_attempt is not None:
            fields.append(f"Last-Attempt-Date: {message_date(r.last_attempt)}")
        if r.will_retry_until is not None and r.action == "delayed":
            fields.append(f"Will-Retry-Until: {message_date(r.will_retry_until)}")
        fields.append("")
    headers = original_headers(original)
    human_bytes = human.encode("utf-8")
    parts = [
        "\r\n".join(head).encode("utf-8") + b"\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\n",
        b"Content-Type: text/plain; charset=" + (b"us-ascii" if human_bytes.isascii() else b"utf-8") + b"\r\n\r\n",
        human_bytes,
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\n",
        f"Content-Type: {status_type}\r\n\r\n".encode(),
        "\r\n".join(fields).encode("utf-8"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Undelivered Message Headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n\r\n",
        headers,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
