"""
Versioned schema migrations.

Files in ``schema/`` are named ``NNN_description.sql`` (both engines), or
``NNN_description.sqlite.sql`` / ``NNN_description.postgresql.sql`` where
the engines differ.  Each applied version is recorded in
``schema_migrations``; a database with a version this binary does not know
is refused, so an old mailrelay never writes into a newer schema.
"""

from __future__ import annotations

import re
import time
from importlib import resources

import attrs

from mailrelay.storage.database import DatabasePool, Transaction

_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+?)(?:\.(sqlite|postgresql))?\.sql$")


class SchemaTooNew(Exception):
    """The database was migrated by a newer mailrelay."""


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def available(engine: str) -> list[Migration]:
    """The migrations shipped with this binary for ``engine``, in order."""
    found: dict[int, Migration] = {}
    specific: set[int] = set()
    for entry in resources.files("mailrelay.storage").joinpath("schema").iterdir():
        m = _NAME.match(entry.name)
        if not m:
            continue
        version, name, only = int(m.group(1)), m.group(2), m.group(3)
        if only and only != engine:
            continue
        if version in specific and not only:
            continue
        found[version] = Migration(version, name, entry.read_text(encoding="utf-8"))
        if only:
            specific.add(version)
    return [found[v] for v in sorted(found)]


def latest_version() -> int:
    versions = [m.version for m in available("sqlite")]
    return max(versions) if versions else 0


def split_statements(sql: str) -> list[str]:
    """Statements of a schema file: split at ``;`` ending a line, comments dropped."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.M) if s.strip()]


async def _current(txn: Transaction) -> list[int]:
    await txn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at "
        + txn.engine.schema("@REAL@")
        + " NOT NULL)"
    )
    rows = await txn.execute("SELECT version FROM schema_migrations ORDER BY version")
    return [int(r[0]) for r in rows]


async def schema_version(pool: DatabasePool) -> int:
    """The highest applied version (0 for an empty database)."""

    async def read(txn: Transaction) -> int:
        versions = await _current(txn)
        return max(versions) if versions else 0

    return await pool.interaction("schema_version", read)


async def migrate(pool: DatabasePool, target: int | None = None) -> list[Migration]:
    """
    Apply every missing migration (up to version ``target`` if given), each
    in its own transaction; returns what was applied.  Several nodes may
    start at once on one PostgreSQL: an advisory lock makes the others wait
    and then find nothing to do.
    """
    engine = pool.engine
    known = available(engine.name)
    newest = known[-1].version if known else 0
    if target is not None:
        known = [m for m in known if m.version <= target]
    applied: list[Migration] = []

    async def step(txn: Transaction) -> Migration | None:
        if engine.xact_lock:
            await txn.execute(engine.xact_lock, (7212345,))
        done = set(await _current(txn))
        if done and max(done) > newest:
            raise SchemaTooNew(
                f"the database has schema version {max(done)}, newer than this mailrelay understands "
                f"(up to {newest}); upgrade mailrelay"
            )
        for migration in known:
            if migration.version not in done:
                for statement in split_statements(engine.schema(migration.sql)):
                    await txn.execute(statement)
                await txn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                return migration
        return None

    while True:
        migration = await pool.interaction("migrate", step)
        if migration is None:
            return applied
        applied.append(migration)


async def check_version(pool: DatabasePool) -> int:
    """Refuse (``SchemaTooNew``) a database newer than this binary; return its version."""
    version = await schema_version(pool)
    newest = latest_version()
    if version > newest:
        raise SchemaTooNew(
            f"the database has schema version {version}, newer than this mailrelay understands "
            f"(up to {newest}); upgrade mailrelay"
        )
    return version
