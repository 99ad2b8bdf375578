"""
The spool's on-disk format: framed, checksummed records in append-only files.

Why this shape: creating and fsyncing a file per message costs several times
more than appending to a file that exists, so small messages are appended to
shared segment files and every commit pending at the same moment shares one
fsync (group commit, ``mailrelay.spool.sync``).  Per-recipient outcomes go to
a separate journal so a segment can be deleted as soon as its messages are
finished, whatever else the journal still has to remember.

Directory (one per worker process; every name has a fixed-width decimal
number so names sort in write order)::

    lock                exclusive flock(2) while a process has the spool open; holds its pid
    seg-00000007        segment: FILE_HEADER, then message records (inline or FILE)
    big-<queue id>      body of a message larger than the spill threshold, written
                        while DATA streams; fsynced (with the directory) before its
                        FILE record is appended, so a durable record implies a durable body
    jnl-00000004        journal: FILE_HEADER, then OUTCOME / HOLD / RELEASE / DELETE records
    ckpt-00000004       checkpoint: the state of every live message when jnl-00000004 was
                        started (written as ckpt-*.tmp, fsynced, renamed, directory fsynced)
    tmp-*               unfinished checkpoints; removed at start-up

Record frame (big-endian)::

    magic   2 bytes  b"MR"
    kind    1 byte   see the K_* constants
    flags   1 byte   0
    length  4 bytes  payload length
    crc     4 bytes  CRC-32 of the first 8 header bytes followed by the payload
    payload length bytes

A reader stops at the first frame whose magic, kind, length (beyond the end
of the file) or CRC is wrong: that is a torn tail left by a crash (the write
of a record that was never acknowledged), and nothing after it in that file
was acknowledged either, because a commit is acknowledged only after an
fsync that covers every byte before it.  Files are never appended to after
a restart (a new segment and a new journal are started), so a torn tail is
never followed by good records.

Payloads:

* ``K_FILE_HEADER``: JSON ``{"format": 1, "file": "segment"|"journal"|"checkpoint", "number": n}``.
* ``K_MSG_INLINE`` / ``K_MSG_FILE``: ``u8 id length, queue id (ASCII), u32 meta length,
  meta JSON, body`` where meta is ``{"e": envelope, "r": [recipients], "t": created,
  "n": body length}`` and, for FILE records (body in ``big-<queue id>``, payload body
  empty), ``"c": CRC-32 of the body``.  Compaction copies a record verbatim to the
  current segment; recovery keeps one copy per queue id.
* ``K_OUTCOME``: JSON ``{"q": queue id, "o": {recipient: [status, attempts, next_attempt,
  last_reply]}}``, status being ``mailrelay.spool.model.Status`` values.  A message whose
  recipients are all final is finished.
* ``K_HOLD`` / ``K_RELEASE`` / ``K_DELETE``: JSON ``{"q": queue id}``.  Delete finishes it.
* ``K_CKPT_HEAD``: JSON ``{"w": [segment, offset]}``, the watermark: the end of the current
  segment when the checkpoint's journal was started.
* ``K_CKPT_ENTRIES``: JSON ``[[queue id, held, [state...] or null], ...]``, null meaning
  "all pending".
* ``K_CKPT_END``: JSON ``{"n": number of entries}``; a checkpoint without it is ignored.

Recovery reads the newest complete checkpoint ``c``, then journals ``c, c+1, ...``
in order, then every segment.  A message record is live if its queue id is in the
checkpoint, or if it lies at or after the watermark (it was committed after the
checkpoint's snapshot); its state is the checkpoint's, then the journal's
records applied in order.  Anything else in a segment is a finished message
whose segment was not deleted yet.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import attrs

MAGIC = b"MR"
HEADER = struct.Struct(">2sBBII")
HEADER_SIZE = HEADER.size
FORMAT_VERSION = 1

K_FILE_HEADER = 0x01
K_MSG_INLINE = 0x10
K_MSG_FILE = 0x11
K_OUTCOME = 0x20
K_HOLD = 0x21
K_RELEASE = 0x22
K_DELETE = 0x23
K_CKPT_HEAD = 0x30
K_CKPT_ENTRIES = 0x31
K_CKPT_END = 0x32

KINDS = frozenset(
    {
        K_FILE_HEADER,
        K_MSG_INLINE,
        K_MSG_FILE,
        K_OUTCOME,
        K_HOLD,
        K_RELEASE,
        K_DELETE,
        K_CKPT_HEAD,
        K_CKPT_ENTRIES,
        K_CKPT_END,
    }
)
MESSAGE_KINDS = frozenset({K_MSG_INLINE, K_MSG_FILE})
_U32 = struct.Struct(">I")


# One encoder for every record: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def frame(kind: int, payload: bytes) -> bytes:
    """One record: header and payload, ready to append."""
    head = HEADER.pack(MAGIC, kind, 0, len(payload), 0)[:8]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + _U32.pack(crc) + payload


def file_header(file: str, number: int) -> bytes:
    return frame(K_FILE_HEADER, dumps({"format": FORMAT_VERSION, "file": file, "number": number}))


def message_meta(body_length: int, body_crc: int | None, rest: bytes) -> bytes:
    """
    Meta JSON for a message record.  ``rest`` is ``dumps({"e":..., "r":...,
    "t":...})``, encoded once when the message is opened (so a bad envelope
    fails early); the body's length and CRC are only known at commit.
    """
    head = b'{"n":%d,' % body_length if body_crc is None else b'{"n":%d,"c":%d,' % (body_length, body_crc)
    return head + rest[1:]


def message_record(kind: int, queue_id: str, meta: bytes, body: bytes) -> tuple[bytes, int]:
    """
    A message record and the offset of the body within it, so the body can be
    read later without parsing the record again.
    """
    qid = queue_id.encode("ascii")
    prefix = bytes([len(qid)]) + qid + _U32.pack(len(meta)) + meta
    record = frame(kind, prefix + body)
    return record, HEADER_SIZE + len(prefix)


def parse_message_payload(payload: bytes) -> tuple[str, dict[str, Any], int]:
    """Queue id, meta and the offset of the body in ``payload``."""
    n = payload[0]
    qid = payload[1 : 1 + n].decode("ascii")
    (meta_len,) = _U32.unpack_from(payload, 1 + n)
    start = 1 + n + 4
    meta = json.loads(payload[start : start + meta_len])
    return qid, meta, start + meta_len


def check_frame(record: bytes) -> tuple[int, bytes]:
    """Kind and payload of one whole record read back; ``ValueError`` if damaged."""
    if len(record) < HEADER_SIZE:
        raise ValueError("short record")
    magic, kind, _flags, length, crc = HEADER.unpack_from(record)
    payload = record[HEADER_SIZE:]
    if magic != MAGIC or kind not in KINDS or length != len(payload):
        raise ValueError("bad record header")
    if zlib.crc32(payload, zlib.crc32(record[:8])) != crc:
        raise ValueError("bad record checksum")
    return kind, payload


@attrs.frozen
class Frame:
    offset: int
    length: int  # whole record, header included
    kind: int
    payload: bytes


def iter_frames(f: BinaryIO, size: int) -> Iterator[Frame]:
    """
    Every intact record of an open file, stopping silently at the first
    damaged one (a torn tail).
    """
    offset = 0
    while offset + HEADER_SIZE <= size:
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            return
        magic, kind, _flags, length, crc = HEADER.unpack(head)
        if magic != MAGIC or kind not in KINDS or offset + HEADER_SIZE + length > size:
            return
        payload = f.read(length)
        if len(payload) != length or zlib.crc32(payload, zlib.crc32(head[:8])) != crc:
            return
        yield Frame(offset, HEADER_SIZE + length, kind, payload)
        offset += HEADER_SIZE + length


def read_frames(path: str) -> list[Frame]:
    """All intact records of ``path`` (blocking; run it in a thread)."""
    with open(path, "rb", buffering=1 << 16) as f:
        size = f.seek(0, 2)
        f.seek(0)
        return list(iter_frames(f, size))


@attrs.frozen
class ScannedMessage:
    """A message record found by a segment scan (body not kept)."""

    queue_id: str
    kind: int
    offset: int
    length: int
    body_offset: int  # within the record
    meta: dict[str, Any]


def scan_segment(path: str) -> tuple[int | None, list[ScannedMessage]]:
    """
    The number in the segment's header (None if the header is damaged) and
    its message records, bodies checked and dropped.  Blocking.
    """
    number: int | None = None
    out: list[ScannedMessage] = []
    with open(path, "rb", buffering=1 << 16) as f:
        size = f.seek(0, 2)
        f.seek(0)
        for fr in iter_frames(f, size):
            if fr.kind == K_FILE_HEADER:
                number = int(json.loads(fr.payload)["number"])
            elif fr.kind in MESSAGE_KINDS and number is not None:
                qid, meta, body_offset = parse_message_payload(fr.payload)
                out.append(ScannedMessage(qid, fr.kind, fr.offset, fr.length, HEADER_SIZE + body_offset, meta))
    return number, out


def scan_journal(path: str) -> list[tuple[int, Any]]:
    """The journal's state records as (kind, decoded JSON), in order.  Blocking."""
    frames = read_frames(path)
    if not frames or frames[0].kind != K_FILE_HEADER:
        return []
    return [(fr.kind, json.loads(fr.payload)) for fr in frames[1:]]


@attrs.frozen
class Checkpoint:
    number: int
    watermark: tuple[int, int]
    entries: dict[str, tuple[bool, list[Any] | None]]


def read_checkpoint(path: str) -> Checkpoint | None:
    """A complete checkpoint, or None if it is damaged or unfinished.  Blocking."""
    frames = read_frames(path)
    if len(frames) < 3 or frames[0].kind != K_FILE_HEADER or frames[1].kind != K_CKPT_HEAD:
        return None
    if frames[-1].kind != K_CKPT_END:
        return None
    number = int(json.loads(frames[0].payload)["number"])
    seg, off = json.loads(frames[1].payload)["w"]
    entries: dict[str, tuple[bool, list[Any] | None]] = {}
    for fr in frames[2:-1]:
        if fr.kind != K_CKPT_ENTRIES:
            return None
        for qid, held, states in json.loads(fr.payload):
            entries[qid] = (bool(held), states)
    if json.loads(frames[-1].payload)["n"] != len(entries):
        return None
    return Checkpoint(number, (int(seg), int(off)), entries)


def checkpoint_bytes(
    number: int, watermark: tuple[int, int], entries: list[tuple[str, bool, list[Any] | None]]
) -> bytes:
    """A whole checkpoint file (built in a thread from a snapshot)."""
    parts = [file_header("checkpoint", number), frame(K_CKPT_HEAD, dumps({"w": list(watermark)}))]
    for i in range(0, len(entries), 1000):
        parts.append(frame(K_CKPT_ENTRIES, dumps([list(e) for e in entries[i : i + 1000]])))
    parts.append(frame(K_CKPT_END, dumps({"n": len(entries)})))
    return b"".join(parts)
