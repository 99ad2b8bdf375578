"""
``mailrelay queue list|show|explain|retry|hold|release|delete``: the mail
queue of the running relay.

The daemon owns its spool, so these verbs ask it over the control socket
(``<data_dir>/control.sock``, Twisted AMP; see ``mailrelay.queue.control``)
instead of opening the spool themselves.  When no daemon answers they say
so in one sentence.
"""

from __future__ import annotations

import re
import time
from typing import Any

from mailrelay.cli.main import CLIError, Context, table
from mailrelay.queue.control import STATES, ControlError, ControlUnavailable, call, socket_path

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def register(nouns: Any) -> None:
    q = nouns.add_parser(
        "queue", help="the running relay's mail queue: list, show, explain, retry, hold, release, delete"
    )
    verbs = q.add_subparsers(dest="verb_name", metavar="VERB", required=True)

    ls = verbs.add_parser("list", help="queued messages, oldest first")
    ls.add_argument("--account", help="only this account's messages (login or id)")
    ls.add_argument("--destination", help="only messages with recipients still pending at this domain")
    ls.add_argument(
        "--state",
        choices=STATES,
        help="active (being delivered), incoming (never tried), deferred (tried, will be retried), held",
    )
    ls.add_argument("--older-than", metavar="AGE", help="only messages queued longer ago than AGE (30m, 2h, 1d)")
    ls.add_argument("--newer-than", metavar="AGE", help="only messages queued less than AGE ago")
    ls.add_argument("--limit", type=int, default=1000, help="at most this many (0: all; default 1000)")
    ls.set_defaults(verb=list_queue)

    for name, text, verb in (
        ("show", "one message: envelope, recipients and their state, last replies", show),
        ("explain", "why a message is still queued", explain),
    ):
        p = verbs.add_parser(name, help=text)
        p.add_argument("queue_id")
        p.set_defaults(verb=verb)

    for name, text in (
        ("retry", "try now, whatever the backoff (held messages stay held)"),
        ("hold", "keep in the queue without trying them until released"),
        ("release", "let held messages be tried again"),
        ("delete", "remove from the queue; the sender gets a notice unless --silent"),
    ):
        p = verbs.add_parser(name, help=text)
        p.add_argument("queue_ids", nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every queued message")
        p.add_argument("--destination", help="every message with recipients pending at this domain")
        p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
        if name == "delete":
            p.add_argument("--silent", action="store_true", help="no notice to the sender")
        p.set_defaults(verb=bulk, action=name)


def parse_age(text: str | None) -> float | None:
    """``90``, ``30m``, ``2h``, ``1d``, ``1w`` -> seconds."""
    if text is None:
        return None
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None:
        raise CLIError(f"not a duration: {text!r} (use e.g. 30m, 2h, 1d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


async def _call(ctx: Context, verb: str, **arguments: Any) -> Any:
    path = socket_path(ctx.config.server.data_dir)
    try:
        return await call(ctx.reactor, path, verb, **arguments)
    except (ControlUnavailable, ControlError) as e:
        raise CLIError(str(e))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


async def _account_id(ctx: Context, given: str | None) -> int | None:
    if given is None:
        return None
    if given.isdigit():
        return int(given)
    return int((await ctx.account(given)).id)


async def list_queue(ctx: Context) -> None:
    a = ctx.args
    data = await _call(
        ctx,
        "list",
        account=await _account_id(ctx, a.account),
        destination=a.destination,
        state=a.state,
        min_age=parse_age(a.older_than),
        max_age=parse_age(a.newer_than),
        limit=a.limit,
    )
    rows = [
        (
            m["queue_id"],
            m["state"],
            _age(m["age"]),
            m["size"],
            m["sender"] or "<>",
            f"{m['pending']}/{m['recipients']}",
            _when(m["next_attempt"]) if m["state"] != "held" else "-",
            ",".join(m["destinations"]),
        )
        for m in data["messages"]
    ]
    text = table(rows, ["QUEUE ID", "STATE", "AGE", "SIZE", "SENDER", "PENDING", "NEXT ATTEMPT", "DESTINATIONS"])
    q = data["queue"]
    more = data["total"] - len(data["messages"])
    text.append(
        f"{data['total']} message(s) match"
        + (f", {more} not shown (use --limit 0)" if more > 0 else "")
        + f"; {q['messages']} queued, {q['active']} active, {q['deliveries']} delivery(ies) under way"
    )
    ctx.emit(data, text)


async def show(ctx: Context) -> None:
    m = await _call(ctx, "show", queue_id=ctx.args.queue_id)
    env = m["envelope"]
    text = [
        f"queue id:     {m['queue_id']} ({m['state']}{', held' if m['held'] else ''})",
        f"received:     {_when(env['received_at'] or m['created'])} ({_age(m['age'])} ago), {m['size']} bytes",
        f"sender:       <{m['sender']}>   From: {env['from'] or '-'}",
        f"account:      {env['account'] or '-'} (id {env['account_id']})",
        f"subject:      {env['subject'] or '-'}",
        f"message-id:   {env['message_id'] or '-'}",
        f"next attempt: {_when(m['next_attempt'])}   expires: {_when(m['expires'])}",
    ]
    rows = [
        (r["address"], r["status"], r["attempts"], _when(r["next_attempt"]), r["destination"], r["last_reply"] or "")
        for r in m["recipients_detail"]
    ]
    text += ["", *table(rows, ["RECIPIENT", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "DESTINATION", "LAST REPLY"])]
    ctx.emit(m, text)


async def explain(ctx: Context) -> None:
    data = await _call(ctx, "explain", queue_id=ctx.args.queue_id)
    ctx.emit(data, [f"{data['queue_id']} ({data['state']}):", *(f"- {r}" for r in data["reasons"])])


async def bulk(ctx: Context) -> None:
    a = ctx.args
    if not a.queue_ids and not a.all and not a.destination:
        raise CLIError("name message ids, or use --all or --destination")
    arguments: dict[str, Any] = {
        "queue_ids": list(a.queue_ids),
        "all": bool(a.all),
        "destination": a.destination,
        "dry_run": bool(a.dry_run),
    }
    if a.action == "delete":
        arguments["silent"] = bool(a.silent)
    data = await _call(ctx, a.action, **arguments)
    done = data["queue_ids"]
    verb = {"retry": "retried", "hold": "held", "release": "released", "delete": "deleted"}[a.action]
    lines = [f"{'would have ' if data['dry_run'] else ''}{verb} {len(done)} message(s)"]
    lines += [f"  {qid}" for qid in done]
    if data.get("missing"):
        lines.append("not in the queue: " + " ".join(data["missing"]))
    ctx.emit(data, lines)
