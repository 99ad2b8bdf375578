"""
The on-disk buffer that keeps events while the database is unreachable.

One append-only JSON-lines file per process (``events.jsonl``); each line
is one batch, ``{"batch": id, "events": [...]}``, exactly as it would have
been written to the database.  Lines are replayed oldest first; the read
position is kept in ``events.offset`` (not fsynced: after a crash a batch
may be read twice, and the database drops the second copy by its batch id).
When everything is replayed the file is truncated to zero.

Every method does blocking I/O and runs in a worker thread, one call at a
time (``EventSink`` serialises them), so the object needs no locks.  A
whole batch is one ``write`` followed by one ``fsync``: outages are rare,
and a batch costs one fsync, not one per event.  A process holds an
exclusive ``flock`` on the directory's ``lock`` file, so two processes
never share (and interleave) one buffer.
"""

from __future__ import annotations

import fcntl
import os

FILE = "events.jsonl"
OFFSET = "events.offset"
LOCK = "lock"
REJECTED = "rejected.jsonl"

_CHUNK = 64 * 1024


class EventBufferError(Exception):
    """The buffer directory cannot be used; ``str()`` says why."""


class OutageBuffer:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self.size = 0
        self.offset = 0
        self.truncated = 0  # bytes of a torn last line dropped at open

    @property
    def pending(self) -> bool:
        """Whether some batches wait to be replayed."""
        return self.offset < self.size

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def open(self) -> None:
        """Lock the directory, drop a torn last line, and find where replay resumes."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            lock_fd = os.open(self._path(LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise EventBufferError(f"cannot use the event buffer directory {self.directory}: {e.strerror}")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise EventBufferError(f"the event buffer {self.directory} is in use by another process")
        self._lock_fd = lock_fd
        created = not os.path.exists(self._path(FILE))
        fd = os.open(self._path(FILE), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd = fd
        if created:
            _fsync_dir(self.directory)
        size = os.fstat(fd).st_size
        end = _last_line_end(fd, size)
        if end != size:
            os.ftruncate(fd, end)
            os.fsync(fd)
            self.truncated = size - end
        self.size = end
        self.offset = self._read_offset()

    def _read_offset(self) -> int:
        try:
            with open(self._path(OFFSET), encoding="ascii") as f:
                offset = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0
        if not 0 <= offset <= self.size:
            return 0
        if offset and os.pread(self._fd_or_fail(), 1, offset - 1) != b"\n":
            return 0  # not at a line boundary: start again, duplicates are dropped
        return offset

    def _fd_or_fail(self) -> int:
        if self._fd is None:
            raise EventBufferError("the event buffer is not open")
        return self._fd

    def append(self, line: bytes) -> None:
        """Append one batch line (ending in a newline) and make it durable."""
        fd = self._fd_or_fail()
        view = memoryview(line)
        written = 0
        try:
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        except OSError:
            # Leave no partial line behind: the caller keeps the batch in memory.
            os.ftruncate(fd, self.size)
            raise
        self.size += len(line)

    def read_next(self) -> tuple[bytes, int] | None:
        """The next batch line to replay and the offset after it, or None."""
        fd = self._fd_or_fail()
        parts: list[bytes] = []
        position = self.offset
        while position < self.size:
            chunk = os.pread(fd, min(_CHUNK, self.size - position), position)
            if not chunk:
                break
            newline = chunk.find(b"\n")
            if newline >= 0:
                parts.append(chunk[: newline + 1])
                return b"".join(parts), position + newline + 1
            parts.append(chunk)
            position += len(chunk)
        return None

    def advance(self, offset: int) -> None:
        """Everything before ``offset`` is stored; truncate once all of it is."""
        fd = self._fd_or_fail()
        if offset >= self.size:
            os.ftruncate(fd, 0)
            os.fsync(fd)
            self.size = self.offset = 0
            try:
                os.unlink(self._path(OFFSET))
            except FileNotFoundError:
                pass
            return
        self.offset = offset
        tmp = self._path(OFFSET + ".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(offset))
        os.replace(tmp, self._path(OFFSET))

    def reject(self, line: bytes) -> None:
        """Keep a line the database refuses (for the operator) in ``rejected.jsonl``."""
        fd = os.open(self._path(REJECTED), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line if line.endswith(b"\n") else line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None


def _last_line_end(fd: int, size: int) -> int:
    """The size of the file up to and including its last newline."""
    position = size
    while position > 0:
        start = max(0, position - _CHUNK)
        chunk = os.pread(fd, position - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
