"""
The durable spool: messages stream in while DATA arrives, become durable and
visible at ``commit()``, and carry per-recipient delivery state until every
recipient is final.  The on-disk format and the reasons for it are described
in ``mailrelay.spool.records``.

Threads: everything here runs in the reactor thread except fsync, file
reads, checkpoint writes and deletions, which go to the injected thread pool.
Appends (``os.write`` of at most ``spill_threshold`` plus the envelope) stay
in the reactor thread: they only copy into the page cache, and keeping them
there keeps the order of records in a file equal to the order of calls.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.interfaces import ISpool, ISpoolWriter
from mailrelay.spool import records as rec
from mailrelay.spool.ids import QueueIds
from mailrelay.spool.model import (
    PENDING,
    RecipientState,
    SpooledMessage,
    SpoolError,
    SpoolLockedError,
    SpoolStats,
    Status,
    UnknownMessage,
)
from mailrelay.spool.sync import GroupCommitter

log = Logger()
_T = TypeVar("_T")

SEG, JNL, CKPT, BIG, TMP = "seg-", "jnl-", "ckpt-", "big-", "tmp-"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def disk_free_fraction(path: str) -> float:
    """
    Free fraction (0..1) of the file system holding ``path``, counting only
    the blocks an unprivileged process may use; the SMTP layer refuses new
    mail below 5% so a full disk never turns a 250 into a lost message.
    """
    st = os.statvfs(path)
    if st.f_blocks == 0:
        return 1.0
    return st.f_bavail / st.f_blocks


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 20), offset)
        if not chunk:
            raise SpoolError("unexpected end of spool file")
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _number(name: str, prefix: str) -> int | None:
    rest = name[len(prefix) :]
    return int(rest) if name.startswith(prefix) and len(rest) == 8 and rest.isdigit() else None


class _AppendFile:
    """A segment or journal being appended to (or sealed, waiting for its last sync)."""

    def __init__(self, path: str, number: int, fd: int | None, size: int) -> None:
        self.path = path
        self.number = number
        self.fd = fd
        self.size = size


class _Segment(_AppendFile):
    def __init__(self, path: str, number: int, fd: int | None, size: int) -> None:
        super().__init__(path, number, fd, size)
        # Queue ids whose record here is still needed, with the record length.
        self.refs: dict[str, int] = {}
        self.live_bytes = 0
        self.sealed_at: float | None = None
        self.deleting = False

    def add(self, queue_id: str, length: int) -> None:
        self.refs[queue_id] = length
        self.live_bytes += length

    def discard(self, queue_id: str) -> None:
        length = self.refs.pop(queue_id, None)
        if length is not None:
            self.live_bytes -= length


class _Entry:
    """The in-memory index entry of one message (live, or committing)."""

    __slots__ = (
        "_snapshot",
        "body_crc",
        "body_offset",
        "created",
        "envelope",
        "finished",
        "held",
        "kind",
        "length",
        "offset",
        "queue_id",
        "recipients",
        "segment",
        "size",
        "states",
        "visible",
    )

    def __init__(
        self,
        queue_id: str,
        envelope: Mapping[str, Any],
        recipients: tuple[str, ...],
        created: float,
        size: int,
        kind: int,
        segment: _Segment,
        offset: int,
        length: int,
        body_offset: int,
        body_crc: int | None,
    ) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self.recipients = recipients
        self.states: tuple[RecipientState, ...] = (PENDING,) * len(recipients)
        self.held = False
        self.created = created
        self.size = size
        self.kind = kind
        self.segment = segment
        self.offset = offset
        self.length = length
        self.body_offset = body_offset
        self.body_crc = body_crc
        self.visible = False
        self.finished = False
        self._snapshot: SpooledMessage | None = None

    def snapshot(self) -> SpooledMessage:
        # The queue asks several times per delivery; only the states (a new
        # tuple on every change) and ``held`` change after the commit.
        snap = self._snapshot
        if snap is None or snap.states is not self.states or snap.held != self.held:
            snap = self._snapshot = SpooledMessage(
                self.queue_id, self.envelope, self.recipients, self.states, self.size, self.created, self.held
            )
        return snap

    def all_final(self) -> bool:
        return all(s.is_final for s in self.states)


@implementer(ISpoolWriter)
class SpoolWriter:
    """
    One message streaming in.  The body stays in memory up to the spool's
    spill threshold; beyond it, it goes to ``big-<queue id>`` as it arrives,
    so a 20 MB message costs the reactor one buffer, not 20 MB.
    """

    def __init__(
        self,
        spool: Spool,
        queue_id: str,
        envelope: Mapping[str, Any],
        recipients: tuple[str, ...],
        meta_rest: bytes,
    ) -> None:
        self.queue_id = queue_id
        self.size = 0
        self.envelope = envelope
        self.recipients = recipients
        self.spilled = False
        self._spool = spool
        self._meta_rest = meta_rest
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._crc = 0
        self._state = "open"

    @property
    def buffered(self) -> int:
        """Body bytes held in memory right now."""
        return sum(len(c) for c in self._chunks)

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise SpoolError(f"message {self.queue_id} is {self._state}")
        if not data:
            return
        self.size += len(data)
        if self._fd is None:
            self._chunks.append(bytes(data))
            if self.size > self._spool.spill_threshold:
                self._spill()
        else:
            _write_all(self._fd, data)
            self._crc = zlib.crc32(data, self._crc)

    def _spill(self) -> None:
        self._fd = self._spool._create_big(self.queue_id)
        self.spilled = True
        data = b"".join(self._chunks)
        self._chunks = []
        _write_all(self._fd, data)
        self._crc = zlib.crc32(data, self._crc)

    def commit(self) -> Deferred[str]:
        if self._state != "open":
            return fail(SpoolError(f"message {self.queue_id} is {self._state}"))
        self._state = "committing"
        self._spool._writers.discard(self)
        if self._fd is None:
            body = b"".join(self._chunks)
            self._chunks = []
            d = self._spool._commit_inline(self, body)
        else:
            fd, self._fd = self._fd, None
            d = self._spool._commit_file(self, fd, self._crc)

        def done(result: str) -> str:
            self._state = "committed"
            return result

        return d.addCallback(done)

    def abort(self) -> None:
        """Throw the message away; a no-op once ``commit`` was called."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._spool._writers.discard(self)
        self._chunks = []
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            self._spool._remove_big(self.queue_id)


class BodyReader:
    """
    Reads a message body in pieces from a worker thread, so a 20 MB message
    can be sent chunk by chunk.  The file is opened when the reader is made,
    so compaction or deletion afterwards cannot pull it away.  Unlike
    ``Spool.read_message`` it does not check the CRC.
    """

    def __init__(self, spool: Spool, fd: int, base: int, size: int) -> None:
        self._spool = spool
        self._fd: int | None = fd
        self._base = base
        self.size = size
        self._reads = 0
        self._closing = False

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """Up to ``length`` bytes from ``offset`` (empty at the end of the body)."""
        if self._fd is None or self._closing:
            return fail(SpoolError("body reader is closed"))
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return succeed(b"")
        self._reads += 1
        d = self._spool._in_thread(_pread_exact, self._fd, length, self._base + offset)
        return d.addBoth(self._read_done)

    def _read_done(self, result: _T) -> _T:
        self._reads -= 1
        if self._closing and self._reads == 0:
            self._really_close()
        return result

    def close(self) -> None:
        self._closing = True
        if self._reads == 0:
            self._really_close()

    def _really_close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@implementer(ISpool)
class Spool:
    """
    One spool directory, owned by one process (an exclusive lock file says
    so).  Call ``recover()`` once before anything else; ``close()`` at
    shutdown.

    ``reactor`` delivers thread results, ``threadpool`` (started by the
    caller, two or more threads so reads do not queue behind an fsync) runs
    the blocking work, ``clock`` schedules sync rounds and compaction and
    stamps queue ids.  ``fsync`` is injectable to count or fail syncs in
    tests; it is used for every file and directory sync.
    """

    def __init__(
        self,
        directory: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        spill_threshold: int = 256 * 1024,
        segment_size: int = 16 * 1024 * 1024,
        journal_size: int = 8 * 1024 * 1024,
        compact_ratio: float = 0.5,
        compact_after: float = 300.0,
        compact_interval: float = 60.0,
        fresh_budget: int = 64 * 1024 * 1024,
        fresh_age: float = 30.0,
        fsync: Callable[[int], None] = os.fsync,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.spill_threshold = spill_threshold
        self.segment_size = segment_size
        self.journal_size = journal_size
        self.compact_ratio = compact_ratio
        self.compact_after = compact_after
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self._fsync = fsync
        self._new_id = QueueIds(randbytes)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._lock_fd = self._lock()
        self._dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        self._committer = GroupCommitter(reactor, threadpool, clock, fsync, after_round=self._after_round)
        self._index: dict[str, _Entry] = {}
        self._segments: dict[int, _Segment] = {}
        self._head: _Segment | None = None
        self._journal: _AppendFile | None = None
        self._sealed: list[_AppendFile] = []
        self._big_files: set[str] = set()
        # Bodies of inline messages just committed, kept for their first read: the
        # queue reads a new message at once, so this saves a file read and a thread
        # hop per message.  Each with the time it was kept; see ``_keep_fresh``.
        self._fresh: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._fresh_size = 0
        self._fresh_budget = fresh_budget
        self._fresh_age = fresh_age
        self._checkpoint_size = 0
        self._checkpointing = False
        self._compacting = False
        self._background: set[Deferred[Any]] = set()
        self._writers: set[SpoolWriter] = set()
        self._listeners: list[Callable[[SpooledMessage], object]] = []
        self._state = "new"
        self._commits = 0
        self._compactor = LoopingCall(self._periodic)
        self._compactor.clock = clock
        self._compact_interval = compact_interval

    # -- opening and closing -------------------------------------------------

    def _lock(self) -> int:
        path = os.path.join(self.directory, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLockedError(
                f"spool directory {self.directory} is already open in another process (pid {owner}); "
                "each worker process needs its own spool directory"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    def close(self) -> Deferred[None]:
        """Wait for pending syncs and background work, close every file, unlock."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closing"
        if self._compactor.running:
            self._compactor.stop()
        for writer in list(self._writers):
            writer.abort()
        while self._background:
            await DeferredList(list(self._background), consumeErrors=True)
        await self._committer.idle()
        files: list[_AppendFile] = [*self._sealed, *self._segments.values()]
        if self._journal is not None:
            files.append(self._journal)
        for f in files:
            if f.fd is not None:
                os.close(f.fd)
                f.fd = None
        os.close(self._dirfd)
        os.close(self._lock_fd)
        self._state = "closed"

    def _in_thread(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def _track(self, d: Deferred[Any], what: str) -> None:
        """Run background work, logging (not raising) its failure, so close can wait for it."""
        self._background.add(d)

        def done(result: object) -> None:
            self._background.discard(d)
            if isinstance(result, Failure):
                log.failure("spool {what} failed", result, what=what)

        d.addBoth(done)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _require_ready(self) -> None:
        if self._state != "ready":
            raise SpoolError(f"spool {self.directory} is {self._state}, not ready")
        if self._committer.failure is not None:
            raise SpoolError(str(self._committer.failure.value))

    # -- recovery ------------------------------------------------------------

    def recover(self) -> Deferred[list[SpooledMessage]]:
        """
        Scan the directory (file by file in worker threads, so the reactor
        keeps running), rebuild the index, clear what is no longer needed and
        start a fresh segment, journal and checkpoint.  Fires with the live
        messages in queue id (time) order.
        """
        if self._state != "new":
            return fail(SpoolError("recover() runs once"))
        self._state = "recovering"
        return Deferred.fromCoroutine(self._recover())

    async def _recover(self) -> list[SpooledMessage]:
        names = await self._in_thread(os.listdir, self.directory)
        for name in names:
            if name.startswith(TMP):
                await self._in_thread(os.unlink, self._path(name))
        ckpts = sorted(n for n in (_number(x, CKPT) for x in names) if n is not None)
        jnls = sorted(n for n in (_number(x, JNL) for x in names) if n is not None)
        segs = sorted(n for n in (_number(x, SEG) for x in names) if n is not None)
        bigs = {x[len(BIG) :] for x in names if x.startswith(BIG)}

        checkpoint: rec.Checkpoint | None = None
        for n in reversed(ckpts):
            checkpoint = await self._in_thread(rec.read_checkpoint, self._path(f"{CKPT}{n:08d}"))
            if checkpoint is not None:
                break
        base = checkpoint.number if checkpoint else 0
        watermark = checkpoint.watermark if checkpoint else (0, 0)
        known = checkpoint.entries if checkpoint else {}

        # Segments: the last intact copy of each message record.
        found: dict[str, tuple[_Segment, rec.ScannedMessage, bool]] = {}
        for n in segs:
            path = self._path(f"{SEG}{n:08d}")
            _, scanned = await self._in_thread(rec.scan_segment, path)
            size = await self._in_thread(os.path.getsize, path)
            seg = _Segment(path, n, None, size)
            seg.sealed_at = self._clock.seconds()
            self._segments[n] = seg
            for sm in scanned:
                after = (n, sm.offset) >= watermark
                earlier = found.get(sm.queue_id)
                found[sm.queue_id] = (seg, sm, after or (earlier is not None and earlier[2]))

        for i, (qid, (seg, sm, after)) in enumerate(found.items()):
            await self._pause(i)
            if not (after or qid in known):
                continue  # finished before the checkpoint; its segment is waiting to be deleted
            meta = sm.meta
            entry = _Entry(
                qid,
                meta["e"],
                tuple(meta["r"]),
                float(meta["t"]),
                int(meta["n"]),
                sm.kind,
                seg,
                sm.offset,
                sm.length,
                sm.body_offset,
                meta.get("c"),
            )
            if qid in known:
                held, states = known[qid]
                entry.held = held
                if states is not None:
                    entry.states = tuple(RecipientState.from_json(s) for s in states)
            entry.visible = True
            self._index[qid] = entry

        for n in jnls:
            if n < base:
                continue
            for i, (kind, obj) in enumerate(await self._in_thread(rec.scan_journal, self._path(f"{JNL}{n:08d}"))):
                await self._pause(i)
                self._replay(kind, obj)

        for i, (qid, entry) in enumerate(list(self._index.items())):
            await self._pause(i)
            if entry.all_final():
                del self._index[qid]
            elif entry.kind == rec.K_MSG_FILE and qid not in bigs:
                log.error("spool {dir}: body file of {qid} is missing; dropping it", dir=self.directory, qid=qid)
                del self._index[qid]
            else:
                entry.segment.add(qid, entry.length)
        self._big_files = {qid for qid, e in self._index.items() if e.kind == rec.K_MSG_FILE}

        doomed = [self._path(f"{BIG}{q}") for q in bigs - self._big_files]
        for seg in list(self._segments.values()):
            if not seg.refs:
                del self._segments[seg.number]
                doomed.append(seg.path)
        number = max([*jnls, *ckpts, 0]) + 1
        doomed += [self._path(f"{JNL}{n:08d}") for n in jnls]
        doomed += [self._path(f"{CKPT}{n:08d}") for n in ckpts]

        seg_number = max([*segs, watermark[0]]) + 1
        self._head = self._new_segment(seg_number)
        self._journal = self._new_journal(number)
        await self._committer.wait()
        await self._write_checkpoint(number, (seg_number, 0))
        await self._in_thread(self._unlink_all, doomed)

        self._state = "ready"
        if self._compact_interval > 0:
            self._compactor.start(self._compact_interval, now=False)
        return sorted((e.snapshot() for e in self._index.values()), key=lambda m: m.queue_id)

    async def _pause(self, i: int) -> None:
        """Every few thousand items of a long loop, let the reactor run."""
        if i % 1000 == 999:
            d: Deferred[None] = Deferred()
            self._clock.callLater(0, d.callback, None)
            await d

    def _replay(self, kind: int, obj: Any) -> None:
        entry = self._index.get(obj.get("q", "")) if isinstance(obj, dict) else None
        if entry is None:
            return  # a message finished or copied before what survives
        if kind == rec.K_OUTCOME:
            states = list(entry.states)
            for rcpt, raw in obj["o"].items():
                if rcpt in entry.recipients:
                    states[entry.recipients.index(rcpt)] = RecipientState.from_json(raw)
            entry.states = tuple(states)
        elif kind == rec.K_HOLD:
            entry.held = True
        elif kind == rec.K_RELEASE:
            entry.held = False
        elif kind == rec.K_DELETE:
            del self._index[entry.queue_id]

    def _unlink_all(self, paths: Iterable[str]) -> None:
        removed = False
        for path in paths:
            try:
                os.unlink(path)
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            self._fsync(self._dirfd)

    # -- files ----------------------------------------------------------------

    def _create(self, name: str) -> int:
        return os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_CLOEXEC, 0o600)

    def _new_segment(self, number: int) -> _Segment:
        name = f"{SEG}{number:08d}"
        fd = self._create(name)
        header = rec.file_header("segment", number)
        _write_all(fd, header)
        seg = _Segment(self._path(name), number, fd, len(header))
        self._segments[number] = seg
        self._committer.mark(fd)
        self._committer.mark(self._dirfd)
        return seg

    def _new_journal(self, number: int) -> _AppendFile:
        name = f"{JNL}{number:08d}"
        fd = self._create(name)
        header = rec.file_header("journal", number)
        _write_all(fd, header)
        self._committer.mark(fd)
        self._committer.mark(self._dirfd)
        return _AppendFile(self._path(name), number, fd, len(header))

    def _append(self, f: _AppendFile, data: bytes) -> int:
        """Append ``data`` to ``f`` (for the next sync round); returns its offset."""
        assert f.fd is not None
        offset = f.size
        try:
            _write_all(f.fd, data)
        except OSError:
            try:
                os.ftruncate(f.fd, offset)
            except OSError as e:
                # A partial record that cannot be cut off would hide every later
                # record at recovery: stop accepting rather than lose them.
                self._committer.failure = Failure(SpoolError(f"cannot repair {f.path} after a failed write: {e}"))
            raise
        f.size += len(data)
        self._committer.mark(f.fd)
        return offset

    def _after_round(self) -> None:
        """Close sealed files whose last records are now durable."""
        still = []
        for f in self._sealed:
            if f.fd is not None and self._committer.busy(f.fd):
                still.append(f)
            elif f.fd is not None:
                os.close(f.fd)
                f.fd = None
        self._sealed = still

    def _current_segment(self) -> _Segment:
        """
        The segment to append to, starting a new one first if it is full.
        If a new one cannot be created (no inodes, too many files) the full
        one grows a little more rather than the commit failing.
        """
        head = self._head
        assert head is not None
        if head.size < self.segment_size:
            return head
        try:
            new = self._new_segment(head.number + 1)
        except OSError as e:
            log.error("spool {dir}: cannot start a new segment: {e}", dir=self.directory, e=e)
            return head
        head.sealed_at = self._clock.seconds()
        self._sealed.append(head)
        self._head = new
        self._maybe_delete(head)
        return new

    def _maybe_delete(self, seg: _Segment) -> None:
        if seg is self._head or seg.refs or seg.deleting or seg.sealed_at is None:
            return
        seg.deleting = True
        self._segments.pop(seg.number, None)
        self._track(self._in_thread(self._unlink_all, [seg.path]), "segment deletion")

    def _create_big(self, queue_id: str) -> int:
        return self._create(f"{BIG}{queue_id}")

    def _remove_big(self, queue_id: str) -> None:
        self._big_files.discard(queue_id)
        self._track(self._in_thread(self._unlink_all, [self._path(f"{BIG}{queue_id}")]), "body removal")

    # -- writing messages ------------------------------------------------------

    def open_message(self, envelope: Mapping[str, Any], recipients: Sequence[str]) -> SpoolWriter:
        """
        Start a message for ``recipients`` (distinct strings).  The envelope
        must be JSON-serialisable; it is checked here, not at commit.  The
        spool keeps the dict it is given: do not change it afterwards.
        """
        self._require_ready()
        rcpts = tuple(recipients)
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        if len(set(rcpts)) != len(rcpts):
            raise ValueError("duplicate recipients")
        queue_id = self._new_id(self._clock.seconds())
        while queue_id in self._index:
            queue_id = self._new_id(self._clock.seconds())
        rest = rec.dumps({"e": envelope, "r": rcpts, "t": self._clock.seconds()})
        writer = SpoolWriter(self, queue_id, envelope, rcpts, rest)
        self._writers.add(writer)
        return writer

    def _commit_inline(self, writer: SpoolWriter, body: bytes) -> Deferred[str]:
        try:
            self._require_ready()
            meta = rec.message_meta(len(body), None, writer._meta_rest)
            record, body_offset = rec.message_record(rec.K_MSG_INLINE, writer.queue_id, meta, body)
            return self._add_message(writer, rec.K_MSG_INLINE, record, body_offset, None, fresh=body)
        except Exception:
            return fail()

    def _commit_file(self, writer: SpoolWriter, fd: int, crc: int) -> Deferred[str]:
        # The body must be durable before a record points at it: fsync it and
        # the directory entry first (large messages are rare; two syncs are fine).
        def sync_body() -> None:
            try:
                self._fsync(fd)
                self._fsync(self._dirfd)
            finally:
                os.close(fd)

        async def go() -> str:
            try:
                self._require_ready()
                await self._in_thread(sync_body)
                self._require_ready()
                meta = rec.message_meta(writer.size, crc, writer._meta_rest)
                record, body_offset = rec.message_record(rec.K_MSG_FILE, writer.queue_id, meta, b"")
                self._big_files.add(writer.queue_id)
                return await self._add_message(writer, rec.K_MSG_FILE, record, body_offset, crc)
            except BaseException:
                if writer.queue_id not in self._index:
                    self._remove_big(writer.queue_id)
                raise

        return Deferred.fromCoroutine(go())

    def _add_message(
        self,
        writer: SpoolWriter,
        kind: int,
        record: bytes,
        body_offset: int,
        crc: int | None,
        fresh: bytes | None = None,
    ) -> Deferred[str]:
        head = self._current_segment()
        offset = self._append(head, record)
        entry = _Entry(
            writer.queue_id,
            writer.envelope,
            writer.recipients,
            self._clock.seconds(),
            writer.size,
            kind,
            head,
            offset,
            len(record),
            body_offset,
            crc,
        )
        self._index[entry.queue_id] = entry
        head.add(entry.queue_id, entry.length)

        def durable(_: None) -> str:
            entry.visible = True
            self._commits += 1
            if fresh is not None and not entry.finished:
                self._keep_fresh(entry.queue_id, fresh)
            if self._listeners and not entry.finished:
                message = entry.snapshot()
                for listener in self._listeners:
                    try:
                        listener(message)
                    except Exception:
                        log.failure("spool listener {listener!r} failed", listener=listener)
            return entry.queue_id

        return self._committer.wait().addCallback(durable)

    # -- the queue's side ------------------------------------------------------

    def subscribe(self, listener: Callable[[SpooledMessage], object]) -> None:
        """
        Call ``listener`` with each newly committed message once it is
        durable (before its ``commit()`` Deferred fires), so the queue hears
        of new mail without polling.  It must not block; errors are logged.
        """
        self._listeners.append(listener)

    def _live(self, queue_id: str) -> _Entry:
        self._require_ready()
        entry = self._index.get(queue_id)
        if entry is None or not entry.visible:
            raise UnknownMessage(queue_id)
        return entry

    def get(self, queue_id: str) -> SpooledMessage | None:
        """The live message ``queue_id`` as it stands now, or None."""
        entry = self._index.get(queue_id)
        return entry.snapshot() if entry is not None and entry.visible else None

    def messages(self) -> list[SpooledMessage]:
        """Every live message, oldest first (from memory; no I/O)."""
        return sorted((e.snapshot() for e in self._index.values() if e.visible), key=lambda m: m.queue_id)

    def __len__(self) -> int:
        return sum(1 for e in self._index.values() if e.visible)

    def _keep_fresh(self, queue_id: str, body: bytes) -> None:
        """
        Keep ``body`` for its first read if it fits in the budget.  The queue
        reads in commit order, so under a backlog the oldest bodies kept are
        the next ones read: dropping them to make room would send every read
        to the disk (at 20 KB a message, 1.5 s of backlog did).  So a new body
        that does not fit is read from the segment later, and only bodies kept
        longer than ``fresh_age`` (held, or waiting for a slow destination)
        are dropped to make room.
        """
        size = len(body)
        now = self._clock.seconds()
        fresh = self._fresh
        while self._fresh_size + size > self._fresh_budget:
            if not fresh:
                return
            oldest = next(iter(fresh))
            kept, old = fresh[oldest]
            if now - kept < self._fresh_age:
                return
            del fresh[oldest]
            self._fresh_size -= len(old)
        fresh[queue_id] = (now, body)
        self._fresh_size += size

    def _forget_fresh(self, queue_id: str) -> bytes | None:
        kept = self._fresh.pop(queue_id, None)
        if kept is None:
            return None
        self._fresh_size -= len(kept[1])
        return kept[1]

    def read_message(self, queue_id: str) -> Deferred[bytes]:
        """
        The whole body: a just-committed one from memory (once), else read in
        a worker thread and checked against its CRC.  Meant for bodies up to
        the spill threshold; stream larger ones with ``open_body``.
        """
        try:
            entry = self._live(queue_id)
            fresh = self._forget_fresh(queue_id)
            if fresh is not None:
                return succeed(fresh)
            if entry.kind == rec.K_MSG_INLINE:
                fd = os.open(entry.segment.path, os.O_RDONLY | _O_CLOEXEC)
            else:
                fd = os.open(self._path(f"{BIG}{queue_id}"), os.O_RDONLY | _O_CLOEXEC)
        except Exception:
            return fail()
        kind, offset, length, body_offset, size, crc = (
            entry.kind,
            entry.offset,
            entry.length,
            entry.body_offset,
            entry.size,
            entry.body_crc,
        )

        def read() -> bytes:
            try:
                if kind == rec.K_MSG_INLINE:
                    record = _pread_exact(fd, length, offset)
                    rec.check_frame(record)
                    return record[body_offset:]
                body = _pread_exact(fd, size, 0)
                if zlib.crc32(body) != crc:
                    raise SpoolError(f"body of {queue_id} is damaged (CRC mismatch)")
                return body
            finally:
                os.close(fd)

        return self._in_thread(read)

    def open_body(self, queue_id: str) -> BodyReader:
        """A reader for pieces of the body (``reader.read(offset, n)``); close it when done."""
        entry = self._live(queue_id)
        if entry.kind == rec.K_MSG_INLINE:
            fd = os.open(entry.segment.path, os.O_RDONLY | _O_CLOEXEC)
            return BodyReader(self, fd, entry.offset + entry.body_offset, entry.size)
        fd = os.open(self._path(f"{BIG}{queue_id}"), os.O_RDONLY | _O_CLOEXEC)
        return BodyReader(self, fd, 0, entry.size)

    def record(self, queue_id: str, outcomes: Mapping[str, RecipientState]) -> Deferred[None]:
        """
        Durably record recipients' new states (group-committed with other
        writes).  Once every recipient is final the message is finished: it
        leaves the index at once and its space is reclaimed after the record
        is on disk.  A final state never changes (``ValueError``): that is
        what keeps a recipient from being delivered twice.  Fails with
        ``UnknownMessage`` if the message was deleted meanwhile.
        """
        try:
            entry = self._live(queue_id)
            states = list(entry.states)
            for rcpt, state in outcomes.items():
                if rcpt not in entry.recipients:
                    raise ValueError(f"{rcpt!r} is not a recipient of {queue_id}")
                i = entry.recipients.index(rcpt)
                if states[i].is_final and states[i] != state:
                    raise ValueError(f"{rcpt!r} of {queue_id} is already {states[i].status.name.lower()}")
                states[i] = state
            payload = {"q": queue_id, "o": {r: s.to_json() for r, s in outcomes.items()}}
            self._journal_append(rec.K_OUTCOME, payload)
        except Exception:
            return fail()
        entry.states = tuple(states)
        if entry.all_final():
            return self._finish(entry)
        self._maybe_checkpoint()
        return self._committer.wait()

    def hold(self, queue_id: str) -> Deferred[None]:
        """Keep the message but stop it from being scheduled until ``release``."""
        return self._flag(queue_id, rec.K_HOLD, True)

    def release(self, queue_id: str) -> Deferred[None]:
        """Undo ``hold``."""
        return self._flag(queue_id, rec.K_RELEASE, False)

    def _flag(self, queue_id: str, kind: int, held: bool) -> Deferred[None]:
        try:
            entry = self._live(queue_id)
            self._journal_append(kind, {"q": queue_id})
        except Exception:
            return fail()
        entry.held = held
        self._maybe_checkpoint()
        return self._committer.wait()

    def delete(self, queue_id: str) -> Deferred[None]:
        """Finish the message without delivering its remaining recipients (admin delete)."""
        try:
            entry = self._live(queue_id)
            self._journal_append(rec.K_DELETE, {"q": queue_id})
        except Exception:
            return fail()
        return self._finish(entry)

    def _finish(self, entry: _Entry) -> Deferred[None]:
        del self._index[entry.queue_id]
        self._forget_fresh(entry.queue_id)
        entry.finished = True
        self._maybe_checkpoint()

        def reclaim(_: None) -> None:
            seg = entry.segment
            seg.discard(entry.queue_id)
            if entry.kind == rec.K_MSG_FILE:
                self._remove_big(entry.queue_id)
            self._maybe_delete(seg)

        return self._committer.wait().addCallback(reclaim)

    def _journal_append(self, kind: int, obj: Any) -> None:
        journal = self._journal
        assert journal is not None
        self._append(journal, rec.frame(kind, rec.dumps(obj)))

    def _maybe_checkpoint(self) -> None:
        """
        Called after the in-memory state reflects the latest journal record,
        never between the two: the snapshot must include every record of the
        journal it replaces.
        """
        journal = self._journal
        if (
            journal is not None
            and journal.size >= max(self.journal_size, 2 * self._checkpoint_size)
            and not self._checkpointing
            and self._state == "ready"
        ):
            self._track(Deferred.fromCoroutine(self._rotate_journal()), "checkpoint")

    # -- checkpoints -----------------------------------------------------------

    async def _rotate_journal(self) -> None:
        """
        Start a new journal and write a checkpoint of the state at this
        instant, then drop the older journals: the journal stays proportional
        to the live messages, not to the history.
        """
        old = self._journal
        head = self._head
        assert old is not None and head is not None
        self._checkpointing = True
        try:
            number = old.number + 1
            self._journal = self._new_journal(number)
            self._sealed.append(old)
            await self._write_checkpoint(number, (head.number, head.size))
            await self._in_thread(self._unlink_all, [old.path, self._path(f"{CKPT}{old.number:08d}")])
        finally:
            self._checkpointing = False

    async def _write_checkpoint(self, number: int, watermark: tuple[int, int]) -> None:
        # A cheap snapshot in the reactor (state tuples are immutable); the
        # encoding and the writing happen in a thread.
        snapshot = [(e.queue_id, e.held, e.states) for e in self._index.values()]
        self._checkpoint_size = await self._in_thread(self._write_checkpoint_file, number, watermark, snapshot)

    def _write_checkpoint_file(
        self,
        number: int,
        watermark: tuple[int, int],
        snapshot: list[tuple[str, bool, tuple[RecipientState, ...]]],
    ) -> int:
        entries = [
            (qid, held, None if all(s == PENDING for s in states) else [s.to_json() for s in states])
            for qid, held, states in snapshot
        ]
        data = rec.checkpoint_bytes(number, watermark, entries)
        tmp = self._path(f"{TMP}{CKPT}{number:08d}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(f"{CKPT}{number:08d}"))
        self._fsync(self._dirfd)
        return len(data)

    # -- compaction ------------------------------------------------------------

    def _periodic(self) -> None:
        if self._state == "ready" and not self._compacting:
            self._track(self.compact(), "compaction")

    def compact(self, min_age: float | None = None) -> Deferred[int]:
        """
        Copy the live messages of sealed segments that are mostly dead (live
        bytes at most ``compact_ratio`` of the file) and older than
        ``min_age`` seconds (default ``compact_after``) to the current
        segment, then delete those segments.  Long-deferred messages thus do
        not pin whole segments; each copy is bounded by the space it frees.
        Fires with the number of messages moved.
        """
        if self._state != "ready" or self._compacting:
            return succeed(0)
        return Deferred.fromCoroutine(self._compact(self.compact_after if min_age is None else min_age))

    async def _compact(self, min_age: float) -> int:
        self._compacting = True
        moved = 0
        try:
            now = self._clock.seconds()
            candidates = [
                seg
                for seg in sorted(self._segments.values(), key=lambda s: s.number)
                if seg is not self._head
                and seg.sealed_at is not None
                and now - seg.sealed_at >= min_age
                and seg.refs
                and seg.live_bytes <= self.compact_ratio * seg.size
            ]
            for seg in candidates:
                moved += await self._evacuate(seg)
        finally:
            self._compacting = False
        return moved

    async def _evacuate(self, seg: _Segment) -> int:
        entries = [e for e in (self._index.get(q) for q in list(seg.refs)) if e is not None and e.segment is seg]
        moved = 0
        for i in range(0, len(entries), 256):
            batch = entries[i : i + 256]
            fd = os.open(seg.path, os.O_RDONLY | _O_CLOEXEC)
            spans = [(e.offset, e.length) for e in batch]

            def read(fd: int = fd, spans: list[tuple[int, int]] = spans) -> list[bytes]:
                try:
                    out = []
                    for offset, length in spans:
                        record = _pread_exact(fd, length, offset)
                        rec.check_frame(record)
                        out.append(record)
                    return out
                finally:
                    os.close(fd)

            blobs = await self._in_thread(read)
            if self._state != "ready":
                return moved
            copied = []
            for entry, record in zip(batch, blobs, strict=True):
                if entry.finished or entry.segment is not seg:
                    continue
                head = self._current_segment()
                entry.offset = self._append(head, record)
                entry.segment = head
                head.add(entry.queue_id, entry.length)
                copied.append(entry.queue_id)
            await self._committer.wait()
            for qid in copied:
                seg.discard(qid)
            moved += len(copied)
        self._maybe_delete(seg)
        return moved

    # -- statistics ------------------------------------------------------------

    def stats(self) -> SpoolStats:
        counts = {s.name.lower(): 0 for s in Status}
        held = body = n = 0
        for e in self._index.values():
            if not e.visible:
                continue
            n += 1
            held += e.held
            body += e.size
            for s in e.states:
                counts[s.status.name.lower()] += 1
        disk = sum(s.size for s in self._segments.values())
        disk += sum(e.size for e in self._index.values() if e.kind == rec.K_MSG_FILE)
        disk += self._journal.size if self._journal is not None else 0
        disk += self._checkpoint_size
        return SpoolStats(
            messages=n,
            held=held,
            recipients=counts,
            body_bytes=body,
            disk_bytes=disk,
            segments=len(self._segments),
            large_files=len(self._big_files),
            commits=self._commits,
            syncs=self._committer.rounds,
        )

    def disk_free_fraction(self) -> float:
        return disk_free_fraction(self.directory)


__all__ = ["BodyReader", "Spool", "SpoolWriter", "disk_free_fraction"]
