"""``mailrelay stats|events ...``: what happened to an account's mail."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import deque
from datetime import UTC, date, datetime, timedelta
from typing import Any

from twisted.internet.task import deferLater

from mailrelay.cli.main import CLIError, Context, table
from mailrelay.events.queries import MAX_LIMIT, EventFilter, EventQueries, StoredEvent, parse_types
from mailrelay.events.stats import METRICS, Counts, Stats
from mailrelay.storage.counters import utc_day

# Text columns: (metric, header); rates are relative to "sent" or "delivered".
COLUMNS = (
    ("sent", "SENT"),
    ("delivered", "DELIVERED"),
    ("deferred", "DEFERRED"),
    ("bounced", "BOUNCED"),
    ("hard_bounced", "HARD"),
    ("soft_bounced", "SOFT"),
    ("block_bounced", "BLOCK"),
    ("suppressed", "SUPPRESSED"),
    ("sandboxed", "SANDBOX"),
    ("opens", "OPENS"),
    ("unique_opens", "UNIQ OPENS"),
    ("clicks", "CLICKS"),
    ("unique_clicks", "UNIQ CLICKS"),
    ("unsubscribes", "UNSUBS"),
    ("complaints", "COMPLAINTS"),
)
_RATE_OF = {
    "delivered": "sent",
    "bounced": "sent",
    "suppressed": "sent",
    "unique_opens": "delivered",
    "unique_clicks": "delivered",
    "unsubscribes": "delivered",
    "complaints": "delivered",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FOLLOW_WINDOW = 5  # polls: how far back --follow re-reads for batches that committed late


def register(nouns: Any) -> None:
    s = nouns.add_parser("stats", help="sent, delivered, bounced, opened, clicked... per account, campaign, tag, day")
    s.add_argument("account", help="account login (parent\\child for a sub-account)")
    s.add_argument("--campaign", metavar="GUID", help="only this campaign")
    s.add_argument("--tag", help="only messages with this tag")
    s.add_argument(
        "--from", dest="from_day", metavar="YYYY-MM-DD", help="first day, UTC (default: 29 days before --to)"
    )
    s.add_argument("--to", dest="to_day", metavar="YYYY-MM-DD", help="last day, inclusive (default: today, UTC)")
    s.add_argument(
        "--by",
        choices=("day", "campaign", "tag", "subaccount"),
        help="one row per day, or per campaign, tag or sub-account",
    )
    s.set_defaults(verb=show_stats)

    e = nouns.add_parser("events", help="an account's events, oldest first; --follow to watch new ones")
    e.add_argument("account", help="account login (parent\\child for a sub-account)")
    e.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="TYPE",
        help="queued, delivered, deferred, bounced, suppressed, sandboxed, opened, clicked, "
        "unsubscribed, complained (repeat or separate with commas)",
    )
    e.add_argument("--since", help="ISO date/time (UTC unless a zone is given) or a duration ago: 30m, 1h, 2d")
    e.add_argument("--until", help="like --since; events before it")
    e.add_argument("--recipient", help="exact recipient address")
    e.add_argument("--campaign", metavar="GUID")
    e.add_argument("--tag")
    e.add_argument("--queue-id", help="one message's history by its queue id")
    e.add_argument("--transmission-id", help="every copy of one transmission")
    e.add_argument("--message-id", help="one message's history by its Message-ID header")
    e.add_argument("--limit", type=int, default=50, help="how many of the newest matching events (default 50)")
    e.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing new events every second until interrupted (JSON lines with --json)",
    )
    e.add_argument("--follow-for", type=float, help=argparse.SUPPRESS)
    e.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    e.set_defaults(verb=show_events)


# -- stats ---------------------------------------------------------------------


def _day_range(ctx: Context) -> tuple[str, str]:
    try:
        until = (
            date.fromisoformat(ctx.args.to_day)
            if ctx.args.to_day
            else date.fromisoformat(utc_day(ctx.reactor.seconds()))
        )
        since = date.fromisoformat(ctx.args.from_day) if ctx.args.from_day else until - timedelta(days=29)
    except ValueError as e:
        raise CLIError(f"--from/--to take a day as YYYY-MM-DD ({e})")
    if since > until:
        raise CLIError(f"--from {since} is after --to {until}")
    return since.isoformat(), until.isoformat()


def _metrics(counts: Counts) -> dict[str, int]:
    return {m: getattr(counts, m) for m in METRICS}


def _rate(counts: Counts, metric: str) -> str:
    base = _RATE_OF.get(metric)
    total = getattr(counts, base) if base else 0
    return f"{100 * getattr(counts, metric) / total:.1f}% of {base}" if base and total else ""


async def show_stats(ctx: Context) -> None:
    args = ctx.args
    account = await ctx.account(args.account)
    since, until = _day_range(ctx)
    if args.by in ("campaign", "tag", "subaccount") and (args.campaign or args.tag):
        raise CLIError(f"--by {args.by} gives every {args.by}: leave out --campaign and --tag")
    if args.campaign and args.tag:
        raise CLIError("statistics are kept per campaign and per tag, not per pair: give one of them")
    stats = Stats(ctx.store.pool)
    head: dict[str, Any] = {"account": account.login, "from": since, "to": until}
    title = f"{account.login}, {since} to {until} (UTC)"
    if args.by in ("campaign", "tag", "subaccount"):
        await _show_breakdown(ctx, stats, account, head, title)
        return
    campaign_id = None
    if args.campaign:
        campaign_id = (await ctx.store.campaigns.get(account.id, args.campaign)).id
        head["campaign"] = args.campaign
        title += f", campaign {args.campaign}"
    if args.tag:
        head["tag"] = args.tag
        title += f", tag {args.tag!r}"
    report = await stats.stats(account.id, since, until, campaign_id=campaign_id, tag=args.tag, by_day=args.by == "day")
    data = {**head, "totals": _metrics(report.totals)}
    if args.by == "day":
        data["days"] = [{"day": d.day, **_metrics(d)} for d in report.days]
        rows = [[d.day, *(getattr(d, m) for m, _ in COLUMNS)] for d in report.days]
        rows.append(["TOTAL", *(getattr(report.totals, m) for m, _ in COLUMNS)])
        ctx.emit(data, [title, *table(rows, ["DAY", *(h for _, h in COLUMNS)])])
        return
    rows = [[h.lower(), getattr(report.totals, m), _rate(report.totals, m)] for m, h in COLUMNS]
    ctx.emit(data, [title, *table(rows, ["METRIC", "COUNT", "RATE"])])


async def _show_breakdown(ctx: Context, stats: Stats, account: Any, head: dict[str, Any], title: str) -> None:
    by = ctx.args.by
    groups = await stats.breakdown(account.id, head["from"], head["to"], by)
    names: dict[str, tuple[str, str]] = {}  # dimension key -> (key to show, name)
    if by == "campaign":
        names = {str(c.id): (c.guid, c.name) for c in await ctx.store.campaigns.list(account.id)}
    elif by == "subaccount":
        names = {str(a.id): (a.login, a.name) for a in await ctx.store.accounts.list(parent=account.login)}
    items = []
    for group in groups:
        key, name = names.get(group.key, (group.key, group.key))
        items.append({by: key, "name": name, **_metrics(group.counts)})
    data = {**head, "by": by, "groups": items}
    shown = [
        ("sent", "SENT"),
        ("delivered", "DELIVERED"),
        ("bounced", "BOUNCED"),
        ("unique_opens", "UNIQ OPENS"),
        ("unique_clicks", "UNIQ CLICKS"),
        ("unsubscribes", "UNSUBS"),
        ("complaints", "COMPLAINTS"),
    ]
    rows = [[item[by], *([item["name"]] if by != "tag" else []), *(item[m] for m, _ in shown)] for item in items]
    header = [by.upper(), *(["NAME"] if by != "tag" else []), *(h for _, h in shown)]
    ctx.emit(data, [title, *table(rows, header)] if rows else [title, f"no {by} statistics in this range"])


# -- events --------------------------------------------------------------------


def parse_when(value: str | None, now: float, option: str) -> float | None:
    """An ISO date/time (UTC when it has no zone) or a duration back from ``now`` (``90s``, ``1h``, ``2d``)."""
    if value is None:
        return None
    m = _DURATION.fullmatch(value.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise CLIError(f"{option}: not an ISO date/time nor a duration like 30m, 1h, 2d: {value!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _summary(detail: dict[str, Any], width: int = 80) -> str:
    text = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(detail.items()))
    return text if len(text) <= width else text[: width - 3] + "..."


def _fields(s: StoredEvent) -> list[str]:
    e = s.event
    return [
        str(s.id),
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.ts)),
        e.type.value,
        e.recipient or "-",
        e.queue_id or "-",
        _summary(e.detail),
    ]


_HEADER = ["ID", "TIME (UTC)", "TYPE", "RECIPIENT", "QUEUE ID", "DETAIL"]


async def show_events(ctx: Context) -> None:
    args = ctx.args
    account = await ctx.account(args.account)
    if not 1 <= args.limit <= MAX_LIMIT:
        raise CLIError(f"--limit must be between 1 and {MAX_LIMIT}")
    now = ctx.reactor.seconds()
    try:
        types = parse_types(args.type)
    except ValueError as e:
        raise CLIError(str(e))
    campaign_id = (await ctx.store.campaigns.get(account.id, args.campaign)).id if args.campaign else None
    where = EventFilter(
        account_id=account.id,
        types=types,
        recipient=args.recipient,
        campaign_id=campaign_id,
        tag=args.tag,
        since=parse_when(args.since, now, "--since"),
        until=parse_when(args.until, now, "--until"),
        queue_id=args.queue_id,
        transmission_id=args.transmission_id,
        message_id=args.message_id,
    )
    queries = EventQueries(ctx.store.pool)
    newest: list[StoredEvent] = []
    cursor: int | None = None
    while len(newest) < args.limit:
        page = await queries.find(where, cursor=cursor, limit=args.limit - len(newest), newest_first=True)
        newest.extend(page.events)
        if page.cursor is None:
            break
        cursor = page.cursor
    found = newest[::-1]
    if not args.follow:
        ctx.emit([s.to_json() for s in found], table([_fields(s) for s in found], _HEADER) if found else "no events")
        return
    if not ctx.json:
        ctx.stdout.write("  ".join(_HEADER) + "\n")
    _print(ctx, found)
    await _follow(ctx, queries, where, found[-1].id if found else 0, {s.id for s in found})


def _print(ctx: Context, found: list[StoredEvent]) -> None:
    for s in found:
        line = json.dumps(s.to_json(), sort_keys=True) if ctx.json else "  ".join(_fields(s))
        ctx.stdout.write(line + "\n")
    ctx.stdout.flush()


async def _follow(ctx: Context, queries: EventQueries, where: EventFilter, floor: int, seen: set[int]) -> None:
    """
    Poll for events after ``floor``.  Each poll re-reads the ids of the last
    few polls, because on PostgreSQL a batch holding lower ids can commit
    after one with higher ids; ``seen`` keeps those from printing twice.
    """
    interval = max(0.05, ctx.args.poll_interval)
    deadline = None if ctx.args.follow_for is None else ctx.reactor.seconds() + ctx.args.follow_for
    tops: deque[int] = deque(maxlen=_FOLLOW_WINDOW)
    while deadline is None or ctx.reactor.seconds() < deadline:
        await deferLater(ctx.reactor, interval, lambda: None)
        cursor: int | None = floor
        fresh: list[StoredEvent] = []
        while cursor is not None:
            page = await queries.find(where, cursor=cursor, limit=1000)
            fresh.extend(s for s in page.events if s.id not in seen)
            cursor = page.cursor
        _print(ctx, fresh)
        seen.update(s.id for s in fresh)
        tops.append(max(seen, default=floor))
        if len(tops) == tops.maxlen:
            floor = max(floor, tops[0])
            seen = {i for i in seen if i > floor}
