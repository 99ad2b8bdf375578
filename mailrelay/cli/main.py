"""
The ``mailrelay`` admin command: argument parsing, the run loop, output
and errors.  The verbs live in the modules named after their nouns.

Every verb prints a short human text, or with ``--json`` one JSON document
on stdout.  Bad input ends with one sentence on stderr (or ``{"error": ...}``
with ``--json``) and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any

import attrs
from twisted.internet.defer import Deferred

from mailrelay.config import Config, ConfigError, load_config
from mailrelay.storage.database import DatabaseUnavailable
from mailrelay.storage.errors import StorageError
from mailrelay.storage.migrations import SchemaTooNew
from mailrelay.storage.store import Store, open_store

CONFIG_ENV = "MAILRELAY_CONFIG"


class CLIError(Exception):
    """A sentence for the operator; exit status 1."""


@attrs.define
class Context:
    """What a verb gets: its arguments, the config, the store and the output."""

    args: argparse.Namespace
    config: Config
    store: Store
    reactor: Any
    stdin: IO[str]
    stdout: IO[str]

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    def emit(self, data: Any, text: str | Sequence[str]) -> None:
        """Print ``data`` as JSON with ``--json``, else ``text``."""
        if self.json:
            self.stdout.write(json.dumps(to_json(data), indent=2, sort_keys=True) + "\n")
        else:
            lines = [text] if isinstance(text, str) else list(text)
            self.stdout.write("\n".join(lines) + ("\n" if lines else ""))

    def in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Blocking work (a password hash, a key, a DNS look-up) on the reactor's thread pool."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    async def account(self, login: str) -> Any:
        return await self.store.accounts.get(login)


Verb = Callable[[Context], Awaitable[None]]


def to_json(value: Any) -> Any:
    """attrs records, sets and tuples as plain JSON values; secrets never leave."""
    if attrs.has(type(value)):
        fields = attrs.fields(type(value))
        return {f.name: to_json(getattr(value, f.name)) for f in fields if f.repr is not False}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(to_json(v) for v in value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    """A plain text table for human output."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def build_parser() -> argparse.ArgumentParser:
    from mailrelay.cli import accounts, content, domains, queue, reports, webhooks

    parser = argparse.ArgumentParser(
        prog="mailrelay",
        description="Administer a mailrelay SMTP relay: accounts, sending domains, credentials, lists, "
                    "campaigns and suppressions.",
    )
    parser.add_argument("--config", "-c", metavar="FILE",
                        help=f"configuration file (default: ${CONFIG_ENV}, else the embedded defaults)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    nouns = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)

    migrate = nouns.add_parser("migrate", help="apply database schema migrations")
    migrate.set_defaults(verb=_migrate, migrations=False)

    accounts.register(nouns)
    domains.register(nouns)
    content.register(nouns)
    reports.register(nouns)
    queue.register(nouns)
    webhooks.register(nouns)
    return parser


async def _migrate(ctx: Context) -> None:
    from mailrelay.storage.migrations import migrate, schema_version

    applied = await migrate(ctx.store.pool)
    version = await schema_version(ctx.store.pool)
    ctx.emit({"applied": [m.version for m in applied], "version": version},
             [f"applied {m.version:03d}_{m.name}" for m in applied] + [f"schema version {version}"])


async def run(argv: Sequence[str], reactor: Any, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
              stderr: IO[str] | None = None) -> int:
    """Run one command; returns the exit status.  Tests call this with their own reactor and streams."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse has printed the usage error
        return int(e.code or 0)
    try:
        config = load_config(args.config or os.environ.get(CONFIG_ENV) or None)
        try:
            store = await open_store(config.database.url, reactor, pool_size=1)
        except (DatabaseUnavailable, SchemaTooNew) as e:
            raise CLIError(str(e))
        try:
            await args.verb(Context(args, config, store, reactor, stdin, stdout))
        finally:
            await store.close()
    except (CLIError, ConfigError, StorageError) as e:
        if args.json:
            stdout.write(json.dumps({"error": str(e)}) + "\n")
        else:
            stderr.write(f"mailrelay: error: {e}\n")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    from twisted.internet import reactor, task

    arguments = list(sys.argv[1:] if argv is None else argv)

    def go(r: Any) -> Deferred[None]:
        async def body() -> None:
            code = await run(arguments, r)
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(body())

    task.react(go)
    del reactor
