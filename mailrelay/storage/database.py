"""
One asynchronous database interface over two engines.

Transactions are ``async`` functions of a ``Transaction``; each
``await txn.execute(...)`` is a round trip.  On PostgreSQL they run through
txpostgres on a pool of non-blocking connections; on SQLite every statement
runs on one dedicated thread (sqlite3 blocks) and transactions are
serialised by a lock, which is what SQLite does anyway.  Callers never see
which engine they have, apart from ``pool.engine.name``.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailrelay.storage.engines import (
    DatabaseURL,
    Engine,
    PostgresEngine,
    SQLiteEngine,
    parse_database_url,
)

T = TypeVar("T")
Row = tuple[Any, ...]

log = Logger()


class DatabaseUnavailable(Exception):
    """The database cannot be reached or opened; ``str()`` says why, without secrets."""


class Transaction(abc.ABC):
    """The statements of one transaction (``?`` placeholders everywhere)."""

    engine: Engine

    @abc.abstractmethod
    async def execute(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; the rows it returns (empty for DML without RETURNING)."""

    @abc.abstractmethod
    async def update(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    async def insert(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run an ``INSERT`` and return the new row's ``id``."""
        rows = await self.execute(sql + " RETURNING id", args)
        return int(rows[0][0])

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """
        One multi-row ``INSERT``: ``sql`` ends in ``VALUES`` and each row
        adds a ``(?, ...)`` group, so a batch costs one round trip.
        """
        if not rows:
            return
        width = len(rows[0])
        group = "(" + ", ".join("?" * width) + ")"
        # SQLite limits bound parameters (32766 in modern builds); stay well under.
        step = max(1, 30000 // max(width, 1))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            flat = [value for row in chunk for value in row]
            await self.execute(sql + " " + ", ".join([group] * len(chunk)), flat)


class DatabasePool(abc.ABC):
    """A started pool of connections to one database."""

    engine: Engine
    url: DatabaseURL

    @abc.abstractmethod
    def start(self) -> Deferred[None]:
        """Connect; fails with ``DatabaseUnavailable``."""

    @abc.abstractmethod
    def close(self) -> Deferred[None]:
        """Disconnect once running work is done."""

    @abc.abstractmethod
    def interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> Deferred[T]:
        """Run ``fn`` in one transaction, committed when it returns, rolled back if it raises."""

    def execute(self, desc: str, sql: str, args: Sequence[Any] = ()) -> Deferred[list[Row]]:
        """One statement in its own transaction."""

        async def run(txn: Transaction) -> list[Row]:
            return await txn.execute(sql, args)

        return self.interaction(desc, run)


# ---------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------


class _SQLiteTransaction(Transaction):
    """
    Statements straight on the connection: the whole transaction function
    runs on the database thread (``SQLitePool.interaction``), so each
    ``await`` completes at once and a transaction costs one thread hop.
    """

    def __init__(self, engine: Engine, conn: sqlite3.Connection) -> None:
        self.engine = engine
        self._conn = conn

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return _sqlite_execute(self._conn, sql, args)

    async def update(self, sql: str, args: Sequence[Any] = ()) -> int:
        return _sqlite_update(self._conn, sql, args)


class SQLiteTransactionError(Exception):
    """A transaction function awaited something other than its transaction (it must not, on SQLite)."""


def _run_to_end(awaitable: Awaitable[T]) -> T:
    """The result of a coroutine that never suspends (only awaits an ``_SQLiteTransaction``)."""
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise SQLiteTransactionError("a transaction function waited for something other than the database")


def _sqlite_execute(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Row]:
    return conn.execute(sql, tuple(args)).fetchall()


def _sqlite_update(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> int:
    return conn.execute(sql, tuple(args)).rowcount


class SQLitePool(DatabasePool):
    """The embedded default: one connection on one thread, WAL journal."""

    def __init__(self, url: DatabaseURL, reactor: Any) -> None:
        self.url = url
        self.engine = SQLiteEngine()
        self._reactor = reactor
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name="mailrelay-sqlite")
        # Plain SELECTs run on a second connection and thread: in WAL mode readers never wait
        # behind the writer's transactions (event batches), so lookups stay fast under load.
        self._reader_threads = ThreadPool(minthreads=1, maxthreads=1, name="mailrelay-sqlite-read")
        self._lock = DeferredLock()
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        def call() -> T:
            assert self._conn is not None, "database pool is not started"
            return fn(self._conn, *args)

        return deferToThreadPool(self._reactor, self._threads, call)

    def start(self) -> Deferred[None]:
        self._threads.start()
        path = self.url.path

        def connect() -> None:
            if path != ":memory:":
                parent = Path(path).parent
                parent.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as e:
                raise DatabaseUnavailable(f"cannot open the SQLite database {path}: {e}")
            self._conn = conn

        def connect_reader(_: object) -> Deferred[None]:
            if path == ":memory:":
                return Deferred.fromCoroutine(_nothing())  # one private database: reads use the writer

            def open_reader() -> None:
                reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
                reader.execute("PRAGMA busy_timeout=30000")
                self._reader = reader

            self._reader_threads.start()
            return deferToThreadPool(self._reactor, self._reader_threads, open_reader)

        d = deferToThreadPool(self._reactor, self._threads, connect)
        d.addCallback(connect_reader)

        def failed(f: Any) -> Any:
            self._threads.stop()
            if self._reader_threads.started:
                self._reader_threads.stop()
            return f

        return d.addErrback(failed)

    def execute(self, desc: str, sql: str, args: Sequence[Any] = ()) -> Deferred[list[Row]]:
        if self._reader is None or not _is_select(sql):
            return super().execute(desc, sql, args)
        reader = self._reader
        return deferToThreadPool(self._reactor, self._reader_threads, _sqlite_execute, reader, sql, args)

    def close(self) -> Deferred[None]:
        async def shut() -> None:
            await self._lock.acquire()
            try:
                if self._conn is not None:
                    conn, self._conn = self._conn, None
                    await deferToThreadPool(self._reactor, self._threads, conn.close)
                if self._reader is not None:
                    reader, self._reader = self._reader, None
                    await deferToThreadPool(self._reactor, self._reader_threads, reader.close)
            finally:
                self._lock.release()
                self._threads.stop()
                if self._reader_threads.started:
                    self._reader_threads.stop()

        return Deferred.fromCoroutine(shut())

    def _transaction(self, conn: sqlite3.Connection, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        """On the database thread: BEGIN, the whole of ``fn``, COMMIT (or ROLLBACK if it raises)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = _run_to_end(fn(_SQLiteTransaction(self.engine, conn)))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> Deferred[T]:
        async def run() -> T:
            await self._lock.acquire()
            try:
                return await self._run(self._transaction, fn)
            finally:
                self._lock.release()

        return Deferred.fromCoroutine(run())


# ---------------------------------------------------------------------------
# PostgreSQL through txpostgres
# ---------------------------------------------------------------------------


class _PostgresTransaction(Transaction):
    def __init__(self, engine: PostgresEngine, cursor: Any) -> None:
        self.engine = engine
        self._cursor = cursor

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        await self._cursor.execute(self.engine.convert(sql), tuple(args))
        if self._cursor.description is None:
            return []
        return [tuple(row) for row in self._cursor.fetchall()]

    async def update(self, sql: str, args: Sequence[Any] = ()) -> int:
        await self._cursor.execute(self.engine.convert(sql), tuple(args))
        return int(self._cursor.rowcount)


class PostgresPool(DatabasePool):
    """A txpostgres connection pool; non-blocking libpq connections on the reactor."""

    def __init__(self, url: DatabaseURL, reactor: Any, size: int = 5) -> None:
        from txpostgres import txpostgres

        self.url = url
        self.engine = PostgresEngine()
        self._engine_pg = self.engine
        # txpostgres reads the reactor from a class attribute before __init__ runs.
        pool_class = type("MailrelayConnectionPool", (txpostgres.ConnectionPool,), {"reactor": reactor})
        self._pool = pool_class(None, url.dsn, min=size)

    def start(self) -> Deferred[None]:
        import psycopg2

        d: Deferred[Any] = self._pool.start()

        def failed(f: Any) -> Any:
            from twisted.internet.defer import FirstError

            error = f.value.subFailure.value if isinstance(f.value, FirstError) else f.value
            if not isinstance(error, psycopg2.Error | OSError):
                return f
            self._pool.close()
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({self.url.redacted()}): {reason}")

        d.addCallbacks(lambda _: None, failed)
        return d

    def close(self) -> Deferred[None]:
        self._pool.close()
        return Deferred.fromCoroutine(_nothing())

    def execute(self, desc: str, sql: str, args: Sequence[Any] = ()) -> Deferred[list[Row]]:
        if not _is_select(sql):
            return super().execute(desc, sql, args)
        # One round trip instead of BEGIN, the query and COMMIT.
        d: Deferred[Any] = self._pool.runQuery(self._engine_pg.convert(sql), tuple(args))
        return d.addCallback(lambda rows: [tuple(r) for r in rows or []])

    def interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> Deferred[T]:
        engine = self._engine_pg

        def run(cursor: Any) -> Deferred[T]:
            return Deferred.fromCoroutine(_call(fn, _PostgresTransaction(engine, cursor)))

        return self._pool.runInteraction(run)  # type: ignore[no-any-return]


def _is_select(sql: str) -> bool:
    """A statement that only reads (and so needs no transaction of its own)."""
    head = sql.lstrip()[:6].upper()
    return head == "SELECT" and "RETURNING" not in sql.upper()


async def _call(fn: Callable[[Transaction], Awaitable[T]], txn: Transaction) -> T:
    return await fn(txn)


async def _nothing() -> None:
    return None


def make_pool(url: str, reactor: IReactorCore | IReactorThreads | Any, size: int = 5) -> DatabasePool:
    """The pool for a ``sqlite:///`` or ``postgresql://`` URL (not started)."""
    parsed = parse_database_url(url)
    if parsed.engine == "sqlite":
        return SQLitePool(parsed, reactor)
    return PostgresPool(parsed, reactor, size=size)
