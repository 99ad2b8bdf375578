"""
Statistics per account, sub-account, campaign, tag and UTC day.

Asking must not scan events, so every stored batch also adds its counts to
``daily_counts`` (``account_id, day, dimension, metric -> value``) in the
same transaction (see ``EventSink``).  The increments are upserts that add
(``value = value + excluded.value``) and never read first, so several nodes
sharing one PostgreSQL add up correctly.

Dimensions of one event of account ``A`` (with parent ``P`` if ``A`` is a
sub-account):

- ``(A, '')``: the account total;
- ``(A, 'campaign:<campaign id>')`` and ``(A, 'tag:<tag>')`` per tag;
- ``(P, '')`` and ``(P, 'sub:<A>')``: a parent's total includes its
  sub-accounts, and ``sub:<id>`` breaks it down by sub-account.

Unique opens and clicks are the events whose ``detail["first"]`` is true:
the web tier sets it on the first open (click) of one message copy, so the
relay never has to remember who opened what.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from typing import Any

import attrs

from mailrelay.events.model import Event, EventType
from mailrelay.storage.counters import utc_day
from mailrelay.storage.database import DatabasePool

# The metric names stored in ``daily_counts`` (the quota's ``accepted`` is not one of them).
METRICS = (
    "sent",
    "delivered",
    "deferred",
    "bounced",
    "hard_bounced",
    "soft_bounced",
    "block_bounced",
    "suppressed",
    "sandboxed",
    "opens",
    "unique_opens",
    "clicks",
    "unique_clicks",
    "unsubscribes",
    "complaints",
)

_SIMPLE = {
    EventType.QUEUED: "sent",
    EventType.DELIVERED: "delivered",
    EventType.DEFERRED: "deferred",
    EventType.SUPPRESSED: "suppressed",
    EventType.SANDBOXED: "sandboxed",
    EventType.UNSUBSCRIBED: "unsubscribes",
    EventType.COMPLAINED: "complaints",
}
_BOUNCE_CLASSES = ("hard", "soft", "block")

# Breakdown kinds and the dimension prefix each reads.
KINDS = {"campaign": "campaign:", "tag": "tag:", "subaccount": "sub:"}

Key = tuple[int, str, str, str]  # account_id, day, dimension, metric


def metrics_of(event: Event) -> list[str]:
    """The metrics one event adds 1 to."""
    simple = _SIMPLE.get(event.type)
    if simple is not None:
        return [simple]
    if event.type is EventType.BOUNCED:
        cls = event.detail.get("class")
        return ["bounced", f"{cls}_bounced"] if cls in _BOUNCE_CLASSES else ["bounced"]
    if event.type is EventType.OPENED:
        return ["opens", "unique_opens"] if event.detail.get("first") else ["opens"]
    if event.type is EventType.CLICKED:
        return ["clicks", "unique_clicks"] if event.detail.get("first") else ["clicks"]
    return []


def dimensions_of(event: Event, parent_id: int | None) -> list[tuple[int, str]]:
    """The ``(account_id, dimension)`` rows one event counts in (the scheme in the module docstring)."""
    own = event.account_id
    found = [(own, "")]
    if event.campaign_id is not None:
        found.append((own, f"campaign:{event.campaign_id}"))
    found.extend((own, f"tag:{tag}") for tag in dict.fromkeys(event.tags))
    if parent_id is not None and parent_id != own:
        found.extend([(parent_id, ""), (parent_id, f"sub:{own}")])
    return found


def increments(events: Iterable[Event], parents: Mapping[int, int | None]) -> dict[Key, int]:
    """The merged ``daily_counts`` increments of a batch (one upsert row per key)."""
    merged: dict[Key, int] = {}
    for event in events:
        metrics = metrics_of(event)
        if not metrics:
            continue
        day = utc_day(event.ts)
        for account_id, dimension in dimensions_of(event, parents.get(event.account_id)):
            for metric in metrics:
                key = (account_id, day, dimension, metric)
                merged[key] = merged.get(key, 0) + 1
    return merged


@attrs.frozen
class Counts:
    """The statistics of one day (``day``) or of a whole range (``day`` is None)."""

    day: str | None = None
    sent: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    hard_bounced: int = 0
    soft_bounced: int = 0
    block_bounced: int = 0
    suppressed: int = 0
    sandboxed: int = 0
    opens: int = 0
    unique_opens: int = 0
    clicks: int = 0
    unique_clicks: int = 0
    unsubscribes: int = 0
    complaints: int = 0

    @classmethod
    def of(cls, values: Mapping[str, int], day: str | None = None) -> Counts:
        return cls(day=day, **{m: int(values.get(m, 0)) for m in METRICS})

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class StatsReport:
    """``totals`` over ``since``..``until`` (inclusive), and per day when asked."""

    account_id: int
    since: str
    until: str
    dimension: str
    totals: Counts
    days: tuple[Counts, ...] = ()


@attrs.frozen
class Breakdown:
    """One campaign, tag or sub-account (``key``: its id or name) and its totals."""

    key: str
    counts: Counts


def parse_day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a day (YYYY-MM-DD): {value!r}")


def _range(since_day: str, until_day: str) -> tuple[date, date]:
    since, until = parse_day(since_day), parse_day(until_day)
    if since > until:
        raise ValueError(f"the range starts after it ends: {since_day} > {until_day}")
    return since, until


_METRIC_LIST = ", ".join(f"'{m}'" for m in METRICS)


class Stats:
    """Reads the roll-ups: one indexed range read of ``daily_counts``, never the events."""

    def __init__(self, pool: DatabasePool) -> None:
        self._pool = pool

    async def stats(
        self,
        account_id: int,
        since_day: str,
        until_day: str,
        campaign_id: int | None = None,
        tag: str | None = None,
        subaccount_id: int | None = None,
        by_day: bool = False,
    ) -> StatsReport:
        """
        Totals of the account (including its sub-accounts), or of one of its
        campaigns, tags or sub-accounts; one filter at a time, since each is
        its own roll-up.  ``by_day`` adds every day of the range, zeros too.
        """
        since, until = _range(since_day, until_day)
        chosen = [
            d
            for d in (
                f"campaign:{campaign_id}" if campaign_id is not None else None,
                f"tag:{tag}" if tag is not None else None,
                f"sub:{subaccount_id}" if subaccount_id is not None else None,
            )
            if d is not None
        ]
        if len(chosen) > 1:
            raise ValueError("statistics filter by one of campaign, tag or sub-account at a time")
        dimension = chosen[0] if chosen else ""
        rows = await self._pool.execute(
            "stats",
            "SELECT day, metric, SUM(value) FROM daily_counts WHERE account_id = ? AND day >= ? AND day <= ?"
            f" AND dimension = ? AND metric IN ({_METRIC_LIST}) GROUP BY day, metric",
            (account_id, since.isoformat(), until.isoformat(), dimension),
        )
        totals: dict[str, int] = {}
        per_day: dict[str, dict[str, int]] = {}
        for day, metric, value in rows:
            totals[metric] = totals.get(metric, 0) + int(value)
            per_day.setdefault(day, {})[metric] = int(value)
        days: tuple[Counts, ...] = ()
        if by_day:
            span = (until - since).days + 1
            labels = [(since + timedelta(days=i)).isoformat() for i in range(span)]
            days = tuple(Counts.of(per_day.get(label, {}), day=label) for label in labels)
        return StatsReport(
            account_id=account_id,
            since=since.isoformat(),
            until=until.isoformat(),
            dimension=dimension,
            totals=Counts.of(totals),
            days=days,
        )

    async def breakdown(self, account_id: int, since_day: str, until_day: str, kind: str) -> list[Breakdown]:
        """Totals per campaign, tag or sub-account (``kind``), most sent first."""
        prefix = KINDS.get(kind)
        if prefix is None:
            raise ValueError(f"unknown breakdown {kind!r}: use one of {', '.join(KINDS)}")
        since, until = _range(since_day, until_day)
        rows = await self._pool.execute(
            "stats_breakdown",
            "SELECT dimension, metric, SUM(value) FROM daily_counts WHERE account_id = ? AND day >= ?"
            f" AND day <= ? AND dimension LIKE ? AND metric IN ({_METRIC_LIST}) GROUP BY dimension, metric",
            (account_id, since.isoformat(), until.isoformat(), prefix + "%"),
        )
        grouped: dict[str, dict[str, int]] = {}
        for dimension, metric, value in rows:
            if dimension.startswith(prefix):  # LIKE ignores case on SQLite
                grouped.setdefault(dimension[len(prefix) :], {})[metric] = int(value)
        found = [Breakdown(key, Counts.of(values)) for key, values in grouped.items()]
        found.sort(key=lambda b: (-b.counts.sent, b.key))
        return found
