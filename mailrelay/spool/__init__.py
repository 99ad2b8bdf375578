"""
mailrelay.spool: durable message storage between the SMTP session and the
queue.  Nothing answered with 250 is lost in a crash, and per-recipient
outcomes are durable so no recipient is delivered twice after a restart.

``Spool`` (in ``spool.py``) is the entry point; the on-disk format and the
reasons for it are in ``records.py``; group commit is in ``sync.py``.
"""

from mailrelay.spool.ids import new_queue_id
from mailrelay.spool.model import (
    RecipientState,
    SpooledMessage,
    SpoolError,
    SpoolLockedError,
    SpoolStats,
    Status,
    UnknownMessage,
)
from mailrelay.spool.spool import BodyReader, Spool, SpoolWriter, disk_free_fraction

__all__ = [
    "BodyReader",
    "RecipientState",
    "Spool",
    "SpoolError",
    "SpoolLockedError",
    "SpoolStats",
    "SpoolWriter",
    "SpooledMessage",
    "Status",
    "UnknownMessage",
    "disk_free_fraction",
    "new_queue_id",
]
