"""
``mailrelay stats`` and ``mailrelay events``, through ``mailrelay.cli.main.run``
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from mailrelay.cli import main, reports
from mailrelay.events.model import Event, EventType
from mailrelay.events.sink import EventSink
from mailrelay.storage.store import open_store
from tests.support.db import fresh_database_url
from tests.test_events_sink import DAY, ev, later

reactor: Any = global_reactor

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


def with_reports(build: Callable[[], argparse.ArgumentParser]) -> Callable[[], argparse.ArgumentParser]:
    """``build_parser`` plus the report verbs, until main.py registers them itself."""

    def build_parser() -> argparse.ArgumentParser:
        parser = build()
        nouns = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "stats" not in nouns.choices:
            reports.register(nouns)
        return parser

    return build_parser


class ReportsCLITestsMixin(_Base):
    engine: str

    def setUp(self) -> None:
        self.patch(main, "build_parser", with_reports(main.build_parser))
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.url = fresh_database_url(self, self.engine)
        self.config = self.dir / "mailrelay.toml"
        self.config.write_text(
            f'[server]\nhostname = "relay.test"\ndata_dir = "{self.dir}/data"\n[database]\nurl = "{self.url}"\n'
        )

    async def invoke(self, *argv: str, code: int = 0, json_output: bool = True) -> str:
        out, err = io.StringIO(), io.StringIO()
        flags = ["--json"] if json_output else []
        status = await main.run(["--config", str(self.config), *flags, *argv], reactor, io.StringIO(), out, err)
        self.assertEqual(status, code, f"{argv}: {out.getvalue()} {err.getvalue()}")
        return out.getvalue()

    async def cli(self, *argv: str, code: int = 0) -> Any:
        return json.loads(await self.invoke(*argv, code=code))

    async def emit(self, events: list[Event]) -> None:
        """Store ``events`` the way the relay does: through an EventSink on the same database."""
        store = await open_store(self.url, reactor, pool_size=1)
        sink = EventSink(store.pool, Clock(), reactor, os.path.abspath(self.mktemp()))
        await sink.start()
        for event in events:
            sink.emit(event)
        await sink.stop()
        await store.close()

    async def accounts(self) -> tuple[int, int, int]:
        shop = await self.cli("account", "create", "shop", "--no-password")
        sub = await self.cli("account", "create", "billing", "--parent", "shop", "--no-password")
        campaign = await self.cli("campaign", "create", "shop", "November", "--guid", "g-nov")
        return shop["id"], sub["id"], campaign["id"]

    async def test_stats(self) -> None:
        """stats gives totals, per campaign, tag, day, sub-account and campaign, and refuses bad input."""
        shop, sub, campaign = await self.accounts()
        await self.emit(
            [
                ev(EventType.QUEUED, shop, 0, campaign_id=campaign, tags=("promo",)),
                ev(EventType.QUEUED, shop, 1),
                ev(EventType.DELIVERED, shop, 2, campaign_id=campaign),
                ev(EventType.OPENED, shop, 3, campaign_id=campaign, detail={"first": True}),
                ev(EventType.OPENED, shop, 4, campaign_id=campaign, detail={"first": False}),
                ev(EventType.QUEUED, sub, 5),
                ev(EventType.BOUNCED, sub, 6, detail={"class": "soft"}),
            ]
        )
        day = ["--from", DAY, "--to", DAY]
        total = await self.cli("stats", "shop", *day)
        self.assertEqual((total["account"], total["from"], total["to"]), ("shop", DAY, DAY))
        self.assertEqual(
            {k: total["totals"][k] for k in ("sent", "delivered", "opens", "unique_opens", "soft_bounced")},
            {"sent": 3, "delivered": 1, "opens": 2, "unique_opens": 1, "soft_bounced": 1},
        )
        by_campaign = await self.cli("stats", "shop", "--campaign", "g-nov", *day)
        self.assertEqual((by_campaign["campaign"], by_campaign["totals"]["sent"]), ("g-nov", 1))
        tagged = await self.cli("stats", "shop", "--tag", "promo", *day)
        self.assertEqual(tagged["totals"]["sent"], 1)
        child = await self.cli("stats", "shop\\billing", *day)
        self.assertEqual((child["totals"]["sent"], child["totals"]["bounced"]), (1, 1))
        days = await self.cli("stats", "shop", "--by", "day", "--from", "2023-11-13", "--to", DAY)
        self.assertEqual([(d["day"], d["sent"]) for d in days["days"]], [("2023-11-13", 0), (DAY, 3)])
        subs = await self.cli("stats", "shop", "--by", "subaccount", *day)
        self.assertEqual([(g["subaccount"], g["sent"]) for g in subs["groups"]], [("shop\\billing", 1)])
        camps = await self.cli("stats", "shop", "--by", "campaign", *day)
        self.assertEqual(
            [(g["campaign"], g["name"], g["unique_opens"]) for g in camps["groups"]],
            [("g-nov", "November", 1)],
        )

        error = await self.cli("stats", "shop", "--campaign", "nope", code=1)
        self.assertIn("no campaign 'nope'", error["error"])
        error = await self.cli("stats", "shop", "--from", "2023-13-01", code=1)
        self.assertIn("YYYY-MM-DD", error["error"])
        error = await self.cli("stats", "shop", "--by", "tag", "--tag", "promo", code=1)
        self.assertIn("leave out --campaign and --tag", error["error"])
        await self.invoke("stats", "shop", "--by", "week", code=2)

        text = await self.invoke("stats", "shop", *day, json_output=False)
        self.assertIn("shop, 2023-11-14 to 2023-11-14 (UTC)", text)
        self.assertIn("METRIC", text)
        self.assertRegex(text, r"delivered\s+1\s+33\.3% of sent")

    async def test_events(self) -> None:
        """events lists the newest matching events oldest first, with type, time, recipient and id filters."""
        shop, _, _ = await self.accounts()
        now = time.time()
        old = Event(type=EventType.QUEUED, ts=now - 7200, account_id=shop, queue_id="Q0", recipient="old@x.test")
        recent = [
            Event(
                type=EventType.QUEUED,
                ts=now - 60,
                account_id=shop,
                queue_id="Q1",
                recipient="a@x.test",
                message_id="<m1@x>",
            ),
            Event(
                type=EventType.BOUNCED,
                ts=now - 50,
                account_id=shop,
                queue_id="Q1",
                recipient="a@x.test",
                message_id="<m1@x>",
                detail={"class": "hard", "reply": "550 5.1.1 unknown user"},
            ),
            Event(type=EventType.DELIVERED, ts=now - 40, account_id=shop, queue_id="Q2", recipient="b@x.test"),
        ]
        await self.emit([old, *recent])
        found = await self.cli("events", "shop", "--since", "1h")
        self.assertEqual(
            [(e["type"], e["queue_id"]) for e in found],
            [("queued", "Q1"), ("bounced", "Q1"), ("delivered", "Q2")],
        )
        self.assertEqual(found, sorted(found, key=lambda e: e["id"]))
        newest = await self.cli("events", "shop", "--limit", "2")
        self.assertEqual([e["queue_id"] for e in newest], ["Q1", "Q2"])
        bounced = await self.cli("events", "shop", "--type", "bounced,delivered", "--recipient", "a@x.test")
        self.assertEqual([e["detail"]["class"] for e in bounced], ["hard"])
        history = await self.cli("events", "shop", "--message-id", "<m1@x>")
        self.assertEqual([e["type"] for e in history], ["queued", "bounced"])
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 3600))
        self.assertEqual(len(await self.cli("events", "shop", "--until", iso)), 1)

        error = await self.cli("events", "shop", "--type", "bounce", code=1)
        self.assertIn("unknown event type 'bounce'", error["error"])
        error = await self.cli("events", "shop", "--since", "yesterday", code=1)
        self.assertIn("--since", error["error"])

        text = await self.invoke("events", "shop", "--queue-id", "Q1", json_output=False)
        lines = text.splitlines()
        self.assertTrue(lines[0].startswith("ID"))
        self.assertIn("class=hard reply=550 5.1.1 unknown user", lines[2])
        self.assertEqual(await self.invoke("events", "other-account", code=1, json_output=False), "")

    async def test_follow(self) -> None:
        """events --follow prints the newest events, then each new one once, as JSON lines."""
        shop, _, _ = await self.accounts()
        now = time.time()
        await self.emit([Event(type=EventType.QUEUED, ts=now, account_id=shop, recipient="first@x.test")])

        async def more() -> None:
            await deferLater(reactor, 0.3, lambda: None)
            await self.emit(
                [
                    Event(type=EventType.DELIVERED, ts=now + 1, account_id=shop, recipient="first@x.test"),
                    Event(type=EventType.QUEUED, ts=now + 2, account_id=shop, recipient="second@x.test"),
                ]
            )

        writer: Deferred[None] = later(more())
        output = await self.invoke("events", "shop", "--follow", "--follow-for", "1.2", "--poll-interval", "0.1")
        await writer
        lines = [json.loads(line) for line in output.splitlines()]
        self.assertEqual(
            [(e["type"], e["recipient"]) for e in lines],
            [("queued", "first@x.test"), ("delivered", "first@x.test"), ("queued", "second@x.test")],
        )


class SQLiteReportsCLITests(ReportsCLITestsMixin, TestCase):
    engine = "sqlite"


class PostgresReportsCLITests(ReportsCLITestsMixin, TestCase):
    engine = "postgresql"
