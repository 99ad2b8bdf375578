"""
Bounces and complaints that come back to the relay on port 25.

Mail for the relay's VERP return paths (``bounces+<token>@<bounce
domain>``) and its feedback-loop address is accepted without AUTH and
handed, as raw bytes with its envelope recipient, to ``parse_feedback``.
The result says what kind of message it was (RFC 3464 DSN, RFC 5965 ARF
complaint, a known text bounce, an auto-reply, or unknown), which queued
message and recipient it is about, and per recipient what happened and
how ``mailrelay.delivery.classify`` classes it.  ``FeedbackReport.outcome``
turns that into the event and suppression to record.  See
``docs/feedback.md``.
"""

from mailrelay.feedback.model import (
    COMPLAINT_TYPES,
    SUPPRESSING_TYPES,
    Action,
    Attribution,
    Complaint,
    FeedbackReport,
    Kind,
    OriginalMessage,
    Outcome,
    RecipientStatus,
    SuppressionReason,
)
from mailrelay.feedback.nonstandard import FORMATS, BounceFormat
from mailrelay.feedback.report import parse_feedback

__all__ = [
    "COMPLAINT_TYPES",
    "FORMATS",
    "SUPPRESSING_TYPES",
    "Action",
    "Attribution",
    "BounceFormat",
    "Complaint",
    "FeedbackReport",
    "Kind",
    "OriginalMessage",
    "Outcome",
    "RecipientStatus",
    "SuppressionReason",
    "parse_feedback",
]
