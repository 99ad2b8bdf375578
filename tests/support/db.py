"""
Fresh databases for the storage tests, on both engines.

PostgreSQL comes from ``MAILRELAY_TEST_POSTGRES`` (a URL such as
``postgresql://postgres@127.0.0.1:5432/postgres``); each test gets its own
database, dropped afterwards.  When the variable is missing the PostgreSQL
tests fail under CI (``CI`` set) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.storage.engines import parse_database_url
from mailrelay.storage.store import Store, open_store

ENV = "MAILRELAY_TEST_POSTGRES"


def postgres_admin_url() -> str:
    url = os.environ.get(ENV)
    if not url:
        if os.environ.get("CI"):
            raise AssertionError(f"{ENV} is not set: the PostgreSQL storage tests cannot run")
        raise SkipTest(f"{ENV} is not set (PostgreSQL tests run in CI)")
    return url


def _admin(url: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(parse_database_url(url).dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def fresh_database_url(case: TestCase, engine: str) -> str:
    """A URL of an empty database of ``engine``, removed when ``case`` ends."""
    if engine == "sqlite":
        path = os.path.abspath(case.mktemp())
        os.makedirs(path)
        return f"sqlite:///{path}/test.sqlite3"
    admin = postgres_admin_url()
    name = "mailrelay_test_" + uuid.uuid4().hex[:12]
    _admin(admin, f"CREATE DATABASE {name}")
    case.addCleanup(_admin, admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    base, _, _ = admin.rpartition("/")
    return f"{base}/{name}"


async def fresh_store(case: TestCase, engine: str) -> Store:
    url = fresh_database_url(case, engine)
    store = await open_store(url, reactor, pool_size=2)

    async def close() -> None:
        await store.close()

    case.addCleanup(lambda: _ensure(close()))
    return store


def _ensure(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)
