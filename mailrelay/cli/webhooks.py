"""``mailrelay webhook ...``: an account's webhook endpoints and their delivery attempts."""

from __future__ import annotations

import time
from typing import Any

from mailrelay.cli.main import Context, table
from mailrelay.storage.webhooks import Webhooks


def register(nouns: Any) -> None:
    hook = nouns.add_parser("webhook", help="webhook endpoints (managed through the API) and their deliveries")
    verbs = hook.add_subparsers(dest="verb_name", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="an account's webhook endpoints")
    ls.add_argument("account")
    ls.set_defaults(verb=list_webhooks)
    at = verbs.add_parser("attempts", help="the latest delivery attempts of one endpoint")
    at.add_argument("account")
    at.add_argument("id", type=int)
    at.add_argument("--limit", type=int, default=50)
    at.set_defaults(verb=list_attempts)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


async def list_webhooks(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    found = await Webhooks(ctx.store.pool, ctx.reactor).list(account.id)
    rows = [(w.id, w.url, " ".join(sorted(w.event_types)) or "all", "failing" if w.failing else "ok", w.cursor)
            for w in found]
    ctx.emit(found, table(rows, ["ID", "URL", "EVENTS", "STATE", "DELIVERED THROUGH EVENT"]))


async def list_attempts(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    webhooks = Webhooks(ctx.store.pool, ctx.reactor)
    await webhooks.get(account.id, ctx.args.id)  # a clear "not found" for another account's endpoint
    found = await webhooks.attempts(account.id, ctx.args.id, limit=max(1, min(ctx.args.limit, 1000)))
    rows = [(_when(a.ts), a.status if a.status is not None else "-", a.events, a.error or "") for a in found]
    ctx.emit(found, table(rows, ["TIME (UTC)", "HTTP STATUS", "EVENTS", "ERROR"]))
