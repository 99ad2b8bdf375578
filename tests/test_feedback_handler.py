"""The feedback handler: reports that came back become events and suppressions."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.events.model import EventType
from mailrelay.feedback.handler import FeedbackHandler
from tests.test_feedback import SECRET, envelope_rcpt, load


@attrs.frozen
class Info:
    account_id: int
    queue_id: str
    address: str
    message_id: str | None = "<m1@example.com>"
    transmission_id: str | None = None
    campaign_id: int | None = 3
    tags: tuple[str, ...] = ("welcome",)


class FakeLookup:
    def __init__(self, known: dict[tuple[str, int], Info]) -> None:
        self.known = known

    async def recipient(self, queue_id: str, index: int) -> Info | None:
        return self.known.get((queue_id, index))


class FakeSuppressions:
    def __init__(self) -> None:
        self.added: list[tuple[Any, ...]] = []

    async def add(self, account_id: int, address: str, reason: str, scope: str = "account",
                  detail: str | None = None, expires_at: float | None = None) -> None:
        self.added.append((account_id, address, reason, expires_at))


class FakeSink:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


class FeedbackHandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.lookup = FakeLookup({
            ("5f3a9c1e7b2d4a60", 0): Info(7, "5f3a9c1e7b2d4a60", "alice@example.org"),
            ("8c23d4e5f6071829", 5): Info(7, "8c23d4e5f6071829", "carol@example.net"),
        })
        self.suppressions = FakeSuppressions()
        self.sink = FakeSink()
        self.kept: list[str] = []
        self.handler = FeedbackHandler(self.lookup, self.suppressions, self.sink, SECRET, self.clock,
                                       keep=lambda qid, env, data: self.kept.append(qid))

    def feed(self, name: str) -> None:
        data = load(name)
        self.successResultOf(self.handler("IN1", {"inbound_rcpts": [envelope_rcpt(data)]}, data))

    def test_hard_bounce(self) -> None:
        """A DSN for a dead mailbox: a hard `bounced` event about the original message, and a suppression."""
        self.feed("postfix-dsn.eml")
        [event] = self.sink.events
        self.assertEqual((event.type, event.account_id, event.queue_id, event.recipient),
                         (EventType.BOUNCED, 7, "5f3a9c1e7b2d4a60", "alice@example.org"))
        self.assertEqual(event.detail["class"], "hard")
        self.assertEqual((event.campaign_id, event.tags), (3, ("welcome",)))
        self.assertEqual(self.suppressions.added,
                         [(7, "alice@example.org", "hard_bounce", 1_000_000 + 180 * 86400.0)])

    def test_complaint(self) -> None:
        """An ARF abuse report: a `complained` event and a complaint suppression without expiry."""
        self.feed("aol-arf.eml")
        [event] = self.sink.events
        self.assertEqual((event.type, event.recipient), (EventType.COMPLAINED, "carol@example.net"))
        self.assertEqual(self.suppressions.added, [(7, "carol@example.net", "complaint", None)])

    def test_unattributed_kept(self) -> None:
        """A report about no message of ours (or garbage) is kept and counted, with no event."""
        self.feed("garbage.eml")
        self.assertEqual((self.sink.events, self.kept), ([], ["IN1"]))
        self.assertEqual(self.handler.counts["unattributed"], 1)

    def test_autoreply_ignored(self) -> None:
        """An auto-reply is neither an event nor kept."""
        self.feed("vacation.eml")
        self.assertEqual((self.sink.events, self.suppressions.added), ([], []))
