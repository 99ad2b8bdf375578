"""
RFC 5965 Abuse Reporting Format: feedback-loop complaints.

A mailbox provider that runs a feedback loop (Yahoo, AOL, Microsoft JMRP,
Comcast...) sends ``multipart/report; report-type=feedback-report`` when a
user presses "this is spam".  Its second part, ``message/feedback-report``,
is a block of fields; its third is the message complained about, whole
(``message/rfc822``) or as headers only (``text/rfc822-headers``).

Providers redact the complaining address (AOL writes ``redacted``) and
rewrite the envelope, so the VERP token the relay put in the return path
is often not where a bounce would carry it.  ``Original-Mail-From`` (the
original envelope sender, i.e. the VERP address) and the embedded
message's ``Return-Path`` and ``Message-ID`` are kept so the caller can
still attribute the complaint; see ``report.attribute``.
"""

from __future__ import annotations

import re

from mailrelay.feedback.dsn import parse_address_field, parse_mta
from mailrelay.feedback.mime import field_groups
from mailrelay.feedback.model import Complaint

#: When a report has no Feedback-Type (non-ARF feedback loops), it is a spam complaint.
DEFAULT_FEEDBACK_TYPE = "abuse"


def _address(value: str) -> str:
    return parse_address_field(value)[1]


def parse_feedback_fields(text: str) -> tuple[Complaint, tuple[str, ...]]:
    """The complaint a ``message/feedback-report`` body describes, and what was missing or odd in it."""
    fields = [field for group in field_groups(text) for field in group]
    defects: list[str] = []

    def first(*names: str) -> str | None:
        return next((value for name, value in fields if name in names and value), None)

    def every(*names: str) -> tuple[str, ...]:
        return tuple(value for name, value in fields if name in names and value)

    raw_type = first("feedback-type")
    feedback_type = (raw_type or "").strip().lower().split()[0].strip(";,") if (raw_type or "").strip() else ""
    if not feedback_type:
        defects.append(f"no Feedback-Type; taken as {DEFAULT_FEEDBACK_TYPE}")
        feedback_type = DEFAULT_FEEDBACK_TYPE
    incidents_text = first("incidents")
    incidents = int(incidents_text) if incidents_text and re.fullmatch(r"\d{1,9}", incidents_text) else None
    rcpt_to = tuple(a for a in (_address(v) for v in every("original-rcpt-to", "removal-recipient")) if a)
    mail_from = _address(first("original-mail-from") or "") or None
    complaint = Complaint(
        feedback_type=feedback_type,
        user_agent=first("user-agent"),
        version=first("version"),
        original_mail_from=mail_from,
        original_rcpt_to=rcpt_to,
        original_envelope_id=first("original-envelope-id"),
        source_ip=first("source-ip"),
        arrival_date=first("arrival-date", "received-date"),
        reporting_mta=parse_mta(first("reporting-mta")),
        reported_domain=every("reported-domain"),
        reported_uri=every("reported-uri"),
        incidents=incidents,
        authentication_results=first("authentication-results"),
    )
    return complaint, tuple(defects)
