"""
A synchronous database check for start-up, before the reactor runs.

twistd builds the service before it starts the reactor; checking here lets
a wrong URL, an unreachable server or a too-new schema end the process
with one sentence instead of a traceback from inside the event loop.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailrelay.storage.database import DatabaseUnavailable
from mailrelay.storage.engines import parse_database_url
from mailrelay.storage.migrations import SchemaTooNew, latest_version


def preflight(url: str, timeout: float = 10.0) -> int:
    """
    Connect once, read the schema version and refuse a newer one.  Returns
    the version (0 for a new database).
    """
    parsed = parse_database_url(url)
    query = "SELECT MAX(version) FROM schema_migrations"
    version = 0
    if parsed.engine == "sqlite":
        if parsed.path != ":memory:":
            try:
                Path(parsed.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatabaseUnavailable(f"cannot create the directory of {parsed.path}: {e.strerror}")
        try:
            conn = sqlite3.connect(parsed.path, timeout=timeout)
            try:
                has = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone()
                if has:
                    version = conn.execute(query).fetchone()[0] or 0
            finally:
                conn.close()
        except sqlite3.Error as e:
            raise DatabaseUnavailable(f"cannot open the SQLite database {parsed.path}: {e}")
    else:
        import psycopg2

        try:
            conn = psycopg2.connect(parsed.dsn, connect_timeout=int(timeout))
        except psycopg2.Error as e:
            text = str(e).strip()
            reason = text.splitlines()[0] if text else type(e).__name__
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({parsed.redacted()}): {reason}")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('schema_migrations')")
                row = cur.fetchone()
                if row and row[0]:
                    cur.execute(query)
                    version = (cur.fetchone() or (0,))[0] or 0
        finally:
            conn.close()
    newest = latest_version()
    if version > newest:
        raise SchemaTooNew(
            f"the database has schema version {version}, newer than this mailrelay understands "
            f"(up to {newest}); upgrade mailrelay"
        )
    return int(version)
