"""
Tests for the queue tools: ``QueueControl`` (the operations), the AMP
protocol over the control socket (in memory, and once over a real UNIX
socket), and the ``mailrelay queue`` verbs in ``mailrelay.cli.queue``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.cli.main import CLIError, Context
from mailrelay.cli.queue import parse_age, register
from mailrelay.config import parse_config
from mailrelay.queue.control import (
    CHUNK,
    ControlError,
    ControlProtocol,
    ControlUnavailable,
    FetchChunk,
    ListMessages,
    QueueControl,
    ShowMessage,
    UnknownMessageError,
    _Chunks,
    call,
    listen,
)
from mailrelay.types import Reply
from tests.test_queue_support import DEFERRED, Harness, envelope


def deferring_harness() -> Harness:
    h = Harness()
    h.client.script = lambda rcpt: (DEFERRED, Reply(451, "4.7.1", f"<{rcpt}> try later"))
    h.start()
    return h


def run(d: Any) -> Any:
    return Deferred.fromCoroutine(d)


class QueueControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = deferring_harness()
        self.control = QueueControl(self.h.manager, self.h.clock)
        self.a = self.h.submit(["x@example.net", "y@example.org"])
        self.h.clock.advance(30)
        self.b = self.h.submit(["z@example.org"], env=envelope(account_id=8))

    def test_list_and_filters(self) -> None:
        """list shows every message with its state; account, destination, state and age filter it."""
        listing = self.control.listing()
        self.assertEqual([m["queue_id"] for m in listing["messages"]], [self.a, self.b])
        first = listing["messages"][0]
        self.assertEqual(
            (first["state"], first["pending"], first["recipients"], first["destinations"]),
            ("deferred", 2, 2, ["example.net", "example.org"]),
        )
        self.assertEqual(first["last_reply"], "451 4.7.1 <x@example.net> try later")
        self.assertEqual(self.control.listing(account=8)["total"], 1)
        self.assertEqual([m["queue_id"] for m in self.control.listing(destination="EXAMPLE.NET")["messages"]], [self.a])
        self.assertEqual(self.control.listing(min_age=20)["total"], 1)
        self.assertEqual(self.control.listing(max_age=20)["total"], 1)
        self.assertEqual(self.control.listing(state="held")["total"], 0)
        self.assertEqual(self.control.listing(limit=1)["total"], 2)
        self.assertEqual(len(self.control.listing(limit=1)["messages"]), 1)
        self.assertRaises(ControlError, self.control.listing, state="bogus")

    def test_show(self) -> None:
        """show gives the envelope and each recipient's state, next attempt, reply and last MX host."""
        shown = self.control.show(self.a.lower())
        self.assertEqual(shown["envelope"]["mail_from"], "hello@example.com")
        rcpts = {r["address"]: r for r in shown["recipients_detail"]}
        self.assertEqual(rcpts["x@example.net"]["status"], "deferred")
        self.assertEqual(rcpts["x@example.net"]["attempts"], 1)
        self.assertEqual(rcpts["x@example.net"]["mx_host"], "mx.example.net")
        self.assertEqual(rcpts["x@example.net"]["next_attempt"], shown["next_attempt"])
        self.assertRaises(UnknownMessageError, self.control.show, "NOSUCHID")

    def test_explain(self) -> None:
        """explain says when the next attempt is, what the recipients' last replies were, and when it expires."""
        reasons = " ".join(self.control.explain(self.a)["reasons"])
        self.assertIn("The next attempt is at", reasons)
        self.assertIn("<x@example.net> was deferred 1 time(s); last reply: 451 4.7.1", reasons)
        self.assertIn("returned to the sender", reasons)
        self.successResultOf(run(self.control.hold([self.a])))
        self.assertIn("on hold", self.control.explain(self.a)["reasons"][0])

    def test_explain_dead_destination(self) -> None:
        """explain names a destination that is down, until when, and its last failure."""
        h = Harness()
        h.start()
        control = QueueControl(h.manager, h.clock)
        qid = h.submit([f"refused-{i}@example.net" for i in range(6)])
        reasons = " ".join(control.explain(qid)["reasons"])
        self.assertIn("The destination example.net is considered down until", reasons)
        self.assertIn("Connection refused", reasons)

    def test_bulk_actions(self) -> None:
        """hold/release/retry/delete take ids, --all or --destination; --dry-run changes nothing."""
        dry = self.successResultOf(run(self.control.hold(all=True, dry_run=True)))
        self.assertEqual(dry["queue_ids"], [self.a, self.b])
        self.assertEqual(self.control.listing(state="held")["total"], 0)
        held = self.successResultOf(run(self.control.hold(destination="example.net")))
        self.assertEqual(held["queue_ids"], [self.a])
        self.assertEqual(self.control.listing(state="held")["total"], 1)
        retried = self.successResultOf(run(self.control.retry(all=True)))
        self.assertEqual(retried["queue_ids"], [self.b])  # held messages stay held
        released = self.successResultOf(run(self.control.release([self.a, "MISSING"])))
        self.assertEqual((released["queue_ids"], released["missing"]), ([self.a], ["MISSING"]))
        deleted = self.successResultOf(run(self.control.delete([self.b], silent=True)))
        self.assertEqual((deleted["queue_ids"], deleted["notices"]), ([self.b], {}))
        self.assertIsNone(self.h.spool.get(self.b))
        self.failureResultOf(run(self.control.retry()), ControlError)

    def test_retry_tries_now(self) -> None:
        """retry by id sends the message at once."""
        before = len(self.h.client.sent)
        self.successResultOf(run(self.control.retry([self.b])))
        self.h.settle()
        self.assertEqual(len(self.h.client.sent), before + 1)


class ProtocolTests(SynchronousTestCase):
    def connect(self, control: QueueControl) -> Any:
        chunks = _Chunks(control.clock)
        client, _server, pump = iosim.connectedServerAndClient(lambda: ControlProtocol(control, chunks), amp.AMP)

        def ask(command: Any, **kw: Any) -> Any:
            # The answer must find a handler attached before it arrives (AMP drops the connection otherwise).
            got: list[Any] = []
            client.callRemote(command, **kw).addBoth(got.append)
            pump.flush()
            return got[0]

        return ask

    def test_round_trip(self) -> None:
        """A command and its JSON answer cross AMP; an unknown id comes back as UnknownMessageError."""
        h = deferring_harness()
        qid = h.submit(["x@example.net"])
        ask = self.connect(QueueControl(h.manager, h.clock))
        answer = ask(ShowMessage, queue_id=qid)
        self.assertEqual((answer["chunks"], json.loads(answer["result"])["queue_id"]), (1, qid))
        failure = ask(ShowMessage, queue_id="NOPE")
        self.assertTrue(failure.check(UnknownMessageError))
        self.assertEqual(failure.getErrorMessage(), "no message NOPE in the queue")

    def test_large_answers_come_in_chunks(self) -> None:
        """A listing larger than one AMP value is split, and FetchChunk returns the rest in order."""
        h = deferring_harness()
        for i in range(400):
            h.spool.add(envelope(), [f"r{i}-{'x' * 40}@example.net"])
        ask = self.connect(QueueControl(h.manager, h.clock))
        first = ask(ListMessages, limit=0)
        self.assertGreater(first["chunks"], 1)
        parts = [first["result"]]
        for i in range(1, first["chunks"]):
            parts.append(ask(FetchChunk, token=first["token"], index=i)["result"])
        self.assertTrue(all(len(p) <= CHUNK for p in parts))
        self.assertEqual(json.loads(b"".join(parts))["total"], 400)
        self.assertTrue(ask(FetchChunk, token=first["token"], index=1).check(ControlError))  # fetched: forgotten


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailrelay")
    parser.add_argument("--json", action="store_true")
    register(parser.add_subparsers(dest="noun", required=True))
    return parser


class SocketTests(TestCase):
    """The control socket and the verbs, over a real UNIX socket on the global reactor."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mrq-"))  # short: UNIX socket paths are limited
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.config = parse_config({"server": {"hostname": "relay.test", "data_dir": str(self.dir)}}, "test", self.dir)
        self.path = self.dir / "control.sock"

    async def serve(self) -> tuple[Harness, str]:
        h = deferring_harness()
        qid = h.submit(["x@example.net"])
        port = await listen(reactor, self.path, QueueControl(h.manager, h.clock))  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        return h, qid

    async def cli(self, *argv: str) -> str:
        out = io.StringIO()
        args = _parser().parse_args(list(argv))
        await args.verb(Context(args, self.config, None, reactor, io.StringIO(), out))  # type: ignore[arg-type]
        return out.getvalue()

    async def test_socket_is_private(self) -> None:
        """The control socket is mode 0600 and answers the client."""
        _h, qid = await self.serve()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        answer = await call(reactor, self.path, "list")
        self.assertEqual([m["queue_id"] for m in answer["messages"]], [qid])

    async def test_verbs(self) -> None:
        """list, show, explain, hold, release, retry and delete through the command line, text and --json."""
        h, qid = await self.serve()
        text = await self.cli("queue", "list")
        self.assertIn("QUEUE ID", text)
        self.assertIn(qid, text)
        self.assertIn("1 message(s) match", text)
        shown = json.loads(await self.cli("--json", "queue", "show", qid))
        self.assertEqual(shown["queue_id"], qid)
        self.assertIn("x@example.net", await self.cli("queue", "show", qid))
        self.assertIn("next attempt", await self.cli("queue", "explain", qid))
        self.assertIn(f"held 1 message(s)\n  {qid}", await self.cli("queue", "hold", qid))
        self.assertEqual(json.loads(await self.cli("--json", "queue", "list", "--state", "held"))["total"], 1)
        self.assertIn("released 1", await self.cli("queue", "release", "--all"))
        self.assertIn("would have deleted 1", await self.cli("queue", "delete", "--all", "--dry-run"))
        self.assertIsNotNone(h.spool.get(qid))
        self.assertIn("deleted 1", await self.cli("queue", "delete", qid, "--silent"))
        self.assertIsNone(h.spool.get(qid))
        with self.assertRaises(CLIError) as e:
            await self.cli("queue", "show", qid)
        self.assertIn(f"no message {qid}", str(e.exception))
        with self.assertRaises(CLIError) as e:
            await self.cli("queue", "retry")
        self.assertEqual(str(e.exception), "name message ids, or use --all or --destination")

    async def test_not_running(self) -> None:
        """Without a daemon the verbs say so in one sentence, for a missing and for a stale socket."""
        with self.assertRaises(CLIError) as e:
            await self.cli("queue", "list")
        self.assertEqual(str(e.exception), f"mailrelay is not running (no control socket at {self.path})")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(self.path))
        stale.close()  # the file stays, nobody listens: what kill -9 leaves
        with self.assertRaises(ControlUnavailable) as e2:
            await call(reactor, self.path, "list")
        self.assertIn("mailrelay is not running (the control socket at", str(e2.exception))

    async def test_stale_socket_replaced(self) -> None:
        """A socket left by a killed daemon does not stop the next one from listening."""
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(self.path))
        stale.close()
        _h, qid = await self.serve()
        answer = await call(reactor, self.path, "show", queue_id=qid)
        self.assertEqual(answer["queue_id"], qid)


class AgeTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """Ages are seconds or have a unit; anything else is a clear error."""
        self.assertEqual([parse_age(x) for x in ("90", "30m", "2h", "1d", "1w")], [90, 1800, 7200, 86400, 604800])
        self.assertIsNone(parse_age(None))
        self.assertRaises(CLIError, parse_age, "soon")
