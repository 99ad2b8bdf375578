"""
The differences between SQLite and PostgreSQL, in one place.

SQL elsewhere in mailrelay is written once, with ``?`` placeholders and the
``ON CONFLICT`` / ``RETURNING`` forms both engines understand; the engine
rewrites placeholders and fills the type tokens of schema files
(``@ID@``, ``@BOOL@``, ...).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import attrs


class UnknownDatabaseURL(ValueError):
    """The database URL's scheme is not one mailrelay speaks."""


@attrs.frozen
class DatabaseURL:
    engine: str  # "sqlite" | "postgresql"
    path: str = ""  # sqlite
    dsn: str = ""  # postgresql, as libpq understands it

    def redacted(self) -> str:
        """The URL for messages and logs, without any password."""
        if self.engine == "sqlite":
            return f"sqlite:///{self.path}"
        return re.sub(r"password=\S+", "password=***", self.dsn)


def parse_database_url(url: str) -> DatabaseURL:
    """``sqlite:///path`` (or ``sqlite:///:memory:``) or ``postgresql://user@host:port/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UnknownDatabaseURL(f"not a database URL: {url!r} (use sqlite:///path or postgresql://...)")
    scheme = scheme.lower()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        if rest.startswith("//"):
            path = rest[1:]
        if not path:
            raise UnknownDatabaseURL("sqlite URL without a path: use sqlite:///relative/path or sqlite:////abs")
        return DatabaseURL(engine="sqlite", path=path)
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        fields = []
        if parts.hostname:
            fields.append(f"host={parts.hostname}")
        if parts.port:
            fields.append(f"port={parts.port}")
        if parts.username:
            fields.append(f"user={unquote(parts.username)}")
        if parts.password:
            fields.append(f"password={unquote(parts.password)}")
        dbname = parts.path.lstrip("/")
        if dbname:
            fields.append(f"dbname={unquote(dbname)}")
        for item in filter(None, parts.query.split("&")):
            k, _, v = item.partition("=")
            fields.append(f"{unquote(k)}={unquote(v)}")
        return DatabaseURL(engine="postgresql", dsn=" ".join(fields))
    raise UnknownDatabaseURL(
        f"unknown database URL scheme {scheme!r}: use sqlite:///path or postgresql://user@host/db"
    )


class Engine:
    """What differs between the engines."""

    name = ""
    tokens: dict[str, str] = {}
    #: A statement that makes every other transaction running it with the same
    #: key (one ``?``) wait until this one ends; None where the engine lets one
    #: transaction write at a time anyway (SQLite).
    xact_lock: str | None = None

    def convert(self, sql: str) -> str:
        return sql

    def schema(self, sql: str) -> str:
        for token, value in self.tokens.items():
            sql = sql.replace(token, value)
        return sql


class SQLiteEngine(Engine):
    name = "sqlite"
    tokens = {
        "@ID@": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "@BIGINT@": "INTEGER",
        "@BOOL@": "INTEGER",
        "@REAL@": "REAL",
        "@BLOB@": "BLOB",
        "@TRUE@": "1",
        "@FALSE@": "0",
    }


class PostgresEngine(Engine):
    name = "postgresql"
    xact_lock = "SELECT pg_advisory_xact_lock(?)"
    tokens = {
        "@ID@": "BIGSERIAL PRIMARY KEY",
        "@BIGINT@": "BIGINT",
        "@BOOL@": "BOOLEAN",
        "@REAL@": "DOUBLE PRECISION",
        "@BLOB@": "BYTEA",
        "@TRUE@": "TRUE",
        "@FALSE@": "FALSE",
    }

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def convert(self, sql: str) -> str:
        converted = self._cache.get(sql)
        if converted is None:
            converted = _QMARK.sub(_to_format, sql.replace("%", "%%"))
            self._cache[sql] = converted
        return converted


# A ``?`` outside single-quoted string literals.
_QMARK = re.compile(r"'(?:[^']|'')*'|\?")


def _to_format(m: re.Match[str]) -> str:
    return "%s" if m.group(0) == "?" else m.group(0)
