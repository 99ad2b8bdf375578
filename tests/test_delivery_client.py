"""
Tests for mailrelay.delivery.client, the outbound ESMTP client.

Wire-level tests drive ``SMTPClientProtocol`` over a ``StringTransport``;
conversation tests pump it against the test sink in memory (``MemoryPipe``,
real TLS with trustme certificates); ``DeliveryClient`` tests see outbound
connections on a ``MemoryReactorClock``.  Only ``SinkSocketTests`` open
sockets (loopback), to test the sink itself.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.delivery.client import (
    ClientConfig,
    ConnectionLevelError,
    ConnectionPool,
    DeliveryClient,
    DotStuffer,
    ReplyParser,
    SMTPClientProtocol,
    SMTPProtocolError,
    TransactionOutcome,
    _Flow,
    _StaleConnection,
    encode_body,
    parse_ehlo,
    results_for_error,
)
from mailrelay.delivery.model import (
    Credentials,
    DeliveryResult,
    DeliveryStatus,
    Destination,
    MXHost,
    OutboundMessage,
    Timeouts,
    TLSPolicy,
)
from mailrelay.delivery.mx import smarthost_destination
from mailrelay.eagertcp import EagerClient
from mailrelay.types import Reply
from tests.support.sink import (
    MemoryPipe,
    Sink,
    connect_pending,
    make_tls,
    refuse_pending,
    start_sink,
)
from tests.support.tls_counting import CountingConnection

DELIVERED = DeliveryStatus.DELIVERED
DEFERRED = DeliveryStatus.DEFERRED
FAILED = DeliveryStatus.FAILED

HOST = MXHost("mx.example.com", 10, ("192.0.2.1",))
MX1 = MXHost("mx1.example.com", 10, ("192.0.2.1",))
MX2 = MXHost("mx2.example.com", 20, ("192.0.2.2",))
DEST = Destination("example.com", (MX1, MX2))
EXTENSIONS = ("PIPELINING", "SIZE 1000000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")


def oracle(body: bytes) -> bytes:
    """DATA content computed line by line, the slow obvious way."""
    norm = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if not norm:
        return b".\r\n"
    lines = norm.split(b"\r\n")
    if norm.endswith(b"\r\n"):
        lines = lines[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def unstuff(data: bytes) -> tuple[bytes, bytes]:
    """What a receiving server reads: the message up to the first end of data, and what follows it."""
    out: list[bytes] = []
    pos = 0
    while True:
        end = data.index(b"\r\n", pos) + 2
        line = data[pos:end]
        pos = end
        if line == b".\r\n":
            return b"".join(out), data[pos:]
        out.append(line[1:] if line.startswith(b".") else line)


def message(
    *rcpts: str, body: bytes = b"Subject: test\r\n\r\nhello\r\n", sender: str = "s@relay.test"
) -> OutboundMessage:
    return OutboundMessage.from_bytes(sender, rcpts or ("a@example.com",), body)


class RecordingTransport(StringTransport):
    """A StringTransport that keeps each write apart (to see what went in one write)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=None)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def take(self) -> bytes:
        value = self.value()
        self.clear()
        self.writes = []
        return value


def ehlo_reply(*extensions: str) -> bytes:
    lines = ["mx.example.com Hello relay.test", *extensions]
    return b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode() for i, line in enumerate(lines))


# ---------------------------------------------------------------------------
# Pure parts.
# ---------------------------------------------------------------------------

TRICKY = b".leading dot\r\n..two dots\n.\r\nmiddle\r.\ntext with \r\n.\r\n inside\r\n.\r\n."


class OutboundMessageTests(SynchronousTestCase):
    def test_with_recipients(self) -> None:
        """A copy for fewer recipients; the same message when all of them remain."""
        m = message("a@example.com", "b@example.com")
        self.assertIs(m.with_recipients(["a@example.com", "b@example.com"]), m)
        fewer = m.with_recipients(["b@example.com"])
        self.assertEqual((fewer.recipients, fewer.body), (("b@example.com",), m.body))

    def test_smtputf8_from_header_section_only(self) -> None:
        """
        SMTPUTF8 is needed for UTF-8 in the header section, wherever it ends
        (a CRLF or a bare-LF empty line, whichever comes first); UTF-8 in the
        body alone needs only 8BITMIME.
        """
        utf8 = "Ü".encode()
        for data, smtputf8 in (
            (b"Subject: " + utf8 + b"\r\n\r\nbody\r\n", True),
            (b"Subject: x\r\n\r\n" + utf8 + b"\r\n", False),
            (b"Subject: x\n\n" + utf8 + b"\r\n\r\n", False),
            (b"Subject: x\r\n\r\nbody\n\n" + utf8, False),
            (b"Subject: x\r\nX: " + utf8, True),
        ):
            message = OutboundMessage.from_bytes("a@example.com", ["b@example.com"], data)
            self.assertEqual((message.smtputf8, message.eight_bit), (smtputf8, True), data)


class DotStufferTests(SynchronousTestCase):
    def test_crlf_kept(self) -> None:
        """CRLF line endings pass unchanged and the terminator is added."""
        self.assertEqual(encode_body([b"a\r\nb\r\n"]), b"a\r\nb\r\n.\r\n")

    def test_lone_lf_and_cr(self) -> None:
        """A lone LF or CR becomes CRLF; a missing final line ending is added."""
        self.assertEqual(encode_body([b"a\nb\rc"]), b"a\r\nb\r\nc\r\n.\r\n")

    def test_empty_body(self) -> None:
        """An empty body is just the terminator."""
        self.assertEqual(encode_body([]), b".\r\n")
        self.assertEqual(encode_body([b"", b""]), b".\r\n")

    def test_leading_dots_stuffed(self) -> None:
        """Every line starting with a dot gets one more, including the first and a lone dot."""
        self.assertEqual(encode_body([b".a\r\n.\r\nb\r\n..c"]), b"..a\r\n..\r\nb\r\n...c\r\n.\r\n")

    def test_never_cr_cr_lf(self) -> None:
        """Regression (twisted.mail): CRLF split after the CR never turns into CR CR LF."""
        out = encode_body([b"line one\r", b"\nline two\r", b"\n"])
        self.assertEqual(out, b"line one\r\nline two\r\n.\r\n")
        self.assertNotIn(b"\r\r\n", out)

    def test_every_split_point(self) -> None:
        """Regression (twisted.mail): every one- and two-way split of a tricky body gives the same bytes."""
        expected = oracle(TRICKY)
        n = len(TRICKY)
        for i in range(n + 1):
            self.assertEqual(encode_body([TRICKY[:i], TRICKY[i:]]), expected, i)
            for j in range(i, n + 1):
                self.assertEqual(encode_body([TRICKY[:i], TRICKY[i:j], TRICKY[j:]]), expected, (i, j))
        self.assertEqual(encode_body([bytes([b]) for b in TRICKY]), expected)

    def test_leading_dot_at_16k_boundary(self) -> None:
        """Regression (twisted.mail): a line starting with a dot right at a 16 KiB chunk boundary keeps its dot."""
        first = b"x" * (16 * 1024 - 2) + b"\r\n"
        body = first + b".hidden dot\r\nend\r\n"
        chunks = [body[i : i + 16 * 1024] for i in range(0, len(body), 16 * 1024)]
        self.assertEqual(chunks[1][:1], b".")
        out = encode_body(chunks)
        content, rest = unstuff(out)
        self.assertEqual((content, rest), (body, b""))

    def test_lone_dot_at_boundary_does_not_end_data(self) -> None:
        """Regression (twisted.mail): a lone dot line at a chunk boundary cannot end DATA and smuggle a message."""
        first = b"x" * (16 * 1024 - 2) + b"\r\n"
        smuggled = b".\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nspoof\r\n.\r\n"
        for split in (len(first) - 1, len(first), len(first) + 1, len(first) + 2):
            body = first + smuggled + b"tail\r\n"
            out = encode_body([body[:split], body[split:]])
            content, rest = unstuff(out)
            self.assertEqual(rest, b"", split)
            self.assertEqual(content, body, split)

    def test_stateful_finish(self) -> None:
        """``finish`` after a trailing CR ends the line once."""
        stuffer = DotStuffer()
        self.assertEqual(stuffer.feed(b"a\r"), b"a")
        self.assertEqual(stuffer.finish(), b"\r\n.\r\n")

    @settings(max_examples=300, deadline=None)
    @given(
        body=st.binary(max_size=60).map(lambda b: bytes(b".\r\na"[x % 4] for x in b)),
        cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=5),
    )
    def test_property_any_chunking(self, body: bytes, cuts: list[int]) -> None:
        """For any body of dots, CRs, LFs and text and any chunking: the oracle's bytes, one end of data."""
        points = sorted({min(c, len(body)) for c in cuts})
        chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
        out = encode_body(chunks)
        self.assertEqual(out, oracle(body))
        content, rest = unstuff(out)
        self.assertEqual(rest, b"")
        self.assertEqual(
            content,
            re.sub(rb"\r\n|\r|\n", b"\r\n", body) + (b"" if not body or re.search(rb"[\r\n]\Z", body) else b"\r\n"),
        )


class ReplyParserTests(SynchronousTestCase):
    def test_single_and_multiline(self) -> None:
        """Replies are split, multi-line ones joined, the enhanced code taken off every line."""
        parser = ReplyParser()
        replies = parser.feed(b"250 2.1.0 Ok\r\n550-5.1.1 No such\r\n550 5.1.1 user here\r\n")
        self.assertEqual(replies, [Reply(250, "2.1.0", "Ok"), Reply(550, "5.1.1", ("No such", "user here"))])

    def test_any_chunking_and_bare_lf(self) -> None:
        """A reply split anywhere, or with bare LF endings, parses the same."""
        data = b"250-2.0.0 first\r\n250 2.0.0 second\n"
        for i in range(len(data) + 1):
            parser = ReplyParser()
            self.assertEqual(parser.feed(data[:i]) + parser.feed(data[i:]), [Reply(250, "2.0.0", ("first", "second"))])

    def test_code_only_and_mismatched_status(self) -> None:
        """A bare code parses; a status of another class than the code stays text."""
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250\r\n"), [Reply(250, "", "")])
        self.assertEqual(parser.feed(b"550 2.0.0 odd\r\n"), [Reply(550, "", "2.0.0 odd")])

    def test_malformed(self) -> None:
        """Junk, a code change inside a multi-line reply, and endless lines are protocol errors."""
        self.assertRaises(SMTPProtocolError, ReplyParser().feed, b"hello\r\n")
        self.assertRaises(SMTPProtocolError, ReplyParser().feed, b"250-a\r\n251 b\r\n")
        self.assertRaises(SMTPProtocolError, ReplyParser(max_line=100).feed, b"2" * 200)
        self.assertRaises(SMTPProtocolError, ReplyParser(max_lines=3).feed, b"250-a\r\n" * 5)

    def test_parse_ehlo(self) -> None:
        """EHLO keywords are upper-cased with their parameters; old AUTH= lines merge into AUTH."""
        parser = ReplyParser()
        (reply,) = parser.feed(ehlo_reply("pipelining", "SIZE 35882577", "AUTH=LOGIN", "AUTH PLAIN"))
        ext = parse_ehlo(reply)
        self.assertEqual(ext["PIPELINING"], "")
        self.assertEqual(ext["SIZE"], "35882577")
        self.assertEqual(set(ext["AUTH"].split()), {"LOGIN", "PLAIN"})


# ---------------------------------------------------------------------------
# The protocol on a StringTransport.
# ---------------------------------------------------------------------------


class ProtocolTestMixin:
    clock: Clock

    def connect(
        self,
        tls: TLSPolicy | None = None,
        credentials: Credentials | None = None,
        **config: Any,
    ) -> tuple[SMTPClientProtocol, RecordingTransport]:
        self.clock = Clock()
        cfg = ClientConfig("relay.test", **config)
        proto = SMTPClientProtocol(self.clock, cfg, HOST, "192.0.2.1", tls or TLSPolicy("none"), credentials)
        transport = RecordingTransport()
        proto.makeConnection(transport)
        return proto, transport

    def ready(self, *extensions: str, **config: Any) -> tuple[SMTPClientProtocol, RecordingTransport]:
        proto, transport = self.connect(**config)
        d = proto.handshake()
        proto.dataReceived(b"220 mx.example.com ESMTP\r\n")
        assert transport.take() == b"EHLO relay.test\r\n"
        proto.dataReceived(ehlo_reply(*extensions))
        assert d.called
        return proto, transport


class ProtocolTests(ProtocolTestMixin, SynchronousTestCase):
    def test_pipelined_in_one_write(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA go in one write; replies are matched in order."""
        proto, transport = self.ready(*EXTENSIONS)
        d = proto.send(message("a@example.com", "b@example.com", "c@example.com"))
        self.assertEqual(
            transport.writes,
            [
                b"MAIL FROM:<s@relay.test> SIZE=24\r\n"
                b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
            ],
        )
        transport.take()
        proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n250 2.1.5 Ok\r\n354 Go\r\n")
        self.assertEqual(transport.take(), b"Subject: test\r\n\r\nhello\r\n.\r\n")
        proto.dataReceived(b"250 2.0.0 Ok: queued as ABC\r\n")
        outcome: TransactionOutcome = self.successResultOf(d)
        self.assertEqual(
            [(r.recipient, r.status, r.reply.code) for r in outcome.results],
            [("a@example.com", DELIVERED, 250), ("b@example.com", FAILED, 550), ("c@example.com", DELIVERED, 250)],
        )
        self.assertEqual(outcome.results[0].reply, Reply(250, "2.0.0", "Ok: queued as ABC"))
        self.assertEqual((outcome.results[0].mx_host, outcome.results[0].ip), ("mx.example.com", "192.0.2.1"))
        self.assertTrue(outcome.reusable)

    def test_without_pipelining_one_at_a_time(self) -> None:
        """Without PIPELINING every command waits for the previous reply."""
        proto, transport = self.ready("8BITMIME")
        d = proto.send(message("a@example.com", "b@example.com"))
        self.assertEqual(transport.take(), b"MAIL FROM:<s@relay.test>\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(transport.take(), b"RCPT TO:<a@example.com>\r\n")
        proto.dataReceived(b"451 4.7.1 Greylisted\r\n")
        self.assertEqual(transport.take(), b"RCPT TO:<b@example.com>\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(transport.take(), b"DATA\r\n")
        proto.dataReceived(b"354 Go\r\n")
        transport.take()
        proto.dataReceived(b"250 Ok\r\n")
        results = self.successResultOf(d).results
        self.assertEqual([r.status for r in results], [DEFERRED, DELIVERED])
        self.assertEqual(results[0].reply, Reply(451, "4.7.1", "Greylisted"))

    def test_no_data_without_accepted_recipient(self) -> None:
        """Without PIPELINING, DATA is not sent when every RCPT was refused; the next transaction starts with RSET."""
        proto, transport = self.ready()
        d = proto.send(message("a@example.com"))
        proto.dataReceived(b"250 Ok\r\n")
        transport.take()
        proto.dataReceived(b"550 5.1.1 Unknown\r\n")
        self.assertEqual(transport.take(), b"")
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.results[0].status, FAILED)
        self.assertTrue(outcome.reusable)
        proto.send(message("b@example.com"))
        self.assertEqual(transport.take(), b"RSET\r\n")

    def test_pipelined_data_refused_body_not_sent(self) -> None:
        """Pipelined: all RCPTs refused, DATA answered 554; the body is never written; RSET is pipelined next time."""
        proto, transport = self.ready("PIPELINING")
        d = proto.send(message("a@example.com"))
        transport.take()
        proto.dataReceived(b"250 Ok\r\n550 5.1.1 Unknown\r\n554 5.5.1 No valid recipients\r\n")
        self.assertEqual(transport.take(), b"")
        self.assertEqual(self.successResultOf(d).results[0].reply.code, 550)
        proto.send(message("b@example.com"))
        self.assertTrue(transport.take().startswith(b"RSET\r\nMAIL FROM:"))

    def test_pipelined_354_without_recipients(self) -> None:
        """A server that says 354 with no accepted recipient gets an empty message, never the body."""
        proto, transport = self.ready("PIPELINING")
        d = proto.send(message("a@example.com"))
        transport.take()
        proto.dataReceived(b"250 Ok\r\n550 5.1.1 Unknown\r\n354 Go\r\n")
        self.assertEqual(transport.take(), b".\r\n")
        proto.dataReceived(b"554 No recipients\r\n")
        self.assertEqual(self.successResultOf(d).results[0].status, FAILED)

    def test_mail_refused(self) -> None:
        """A refused MAIL FROM gives its reply to every recipient."""
        proto, _transport = self.ready("PIPELINING")
        d = proto.send(message("a@example.com", "b@example.com"))
        proto.dataReceived(
            b"553 5.7.1 Sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 need RCPT\r\n"
        )
        results = self.successResultOf(d).results
        self.assertEqual({r.reply for r in results}, {Reply(553, "5.7.1", "Sender rejected")})
        self.assertEqual({r.status for r in results}, {FAILED})

    def test_final_reply_applies_to_accepted(self) -> None:
        """The reply after the final dot applies to the accepted recipients only."""
        proto, _transport = self.ready("PIPELINING")
        d = proto.send(message("a@example.com", "b@example.com"))
        proto.dataReceived(b"250 Ok\r\n550 5.1.1 No\r\n250 Ok\r\n354 Go\r\n452 4.3.1 Out of storage\r\n")
        results = self.successResultOf(d).results
        self.assertEqual([(r.status, r.reply.code) for r in results], [(FAILED, 550), (DEFERRED, 452)])

    def test_mail_parameters(self) -> None:
        """SIZE, BODY=8BITMIME and SMTPUTF8 are given when offered and needed."""
        proto, transport = self.ready(*EXTENSIONS)
        proto.send(message("ü@example.com", body="Subject: café\r\n\r\nbody\r\n".encode()))
        first = transport.take().split(b"\r\n")[0]
        self.assertEqual(first, b"MAIL FROM:<s@relay.test> SIZE=24 BODY=8BITMIME SMTPUTF8")

    def test_eight_bit_without_8bitmime(self) -> None:
        """An 8-bit body goes to a server without 8BITMIME as it is, without BODY= (documented choice)."""
        proto, transport = self.ready("PIPELINING")
        proto.send(message(body="x: y\r\n\r\ncaf\xc3\xa9\r\n".encode("latin-1")))
        self.assertEqual(transport.take().split(b"\r\n")[0], b"MAIL FROM:<s@relay.test>")

    def test_smtputf8_not_offered(self) -> None:
        """A message that needs SMTPUTF8 fails with 550 5.6.7 at a server without it, nothing sent."""
        proto, transport = self.ready("PIPELINING", "8BITMIME")
        outcome = self.successResultOf(proto.send(message("ü@example.com", "a@example.com")))
        self.assertEqual({(r.reply.code, r.reply.status) for r in outcome.results}, {(550, "5.6.7")})
        self.assertEqual(transport.take(), b"")
        self.assertTrue(outcome.reusable)

    def test_size_limit(self) -> None:
        """A message over the server's SIZE limit fails with 552 5.3.4 before MAIL."""
        proto, transport = self.ready("SIZE 10")
        outcome = self.successResultOf(proto.send(message()))
        self.assertEqual((outcome.results[0].reply.code, outcome.results[0].status), (552, FAILED))
        self.assertEqual(transport.take(), b"")

    def test_command_injection_refused(self) -> None:
        """An address with CR/LF or angle brackets is refused, never written."""
        proto, transport = self.ready("PIPELINING")
        d = proto.send(message("a@example.com\r\nRSET", "b@example.com"))
        self.assertEqual(transport.take().count(b"RCPT"), 1)
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        results = self.successResultOf(d).results
        self.assertEqual([(r.status, r.reply.status) for r in results], [(FAILED, "5.1.3"), (DELIVERED, "")])
        outcome = self.successResultOf(proto.send(message(sender="x>@y")))
        self.assertEqual(outcome.results[0].reply.status, "5.1.7")

    def test_helo_fallback(self) -> None:
        """EHLO refused with 5xx: HELO, and no extension is used."""
        proto, transport = self.connect()
        d = proto.handshake()
        proto.dataReceived(b"220 old server\r\n")
        transport.take()
        proto.dataReceived(b"502 5.5.2 What?\r\n")
        self.assertEqual(transport.take(), b"HELO relay.test\r\n")
        proto.dataReceived(b"250 old server\r\n")
        self.successResultOf(d)
        self.assertFalse(proto.esmtp)
        self.assertEqual(proto.extensions, {})

    def test_greeting_421(self) -> None:
        """A 421 greeting is a connection-level failure carrying the server's reply."""
        proto, transport = self.connect()
        d = proto.handshake()
        proto.dataReceived(b"421 4.3.2 Too busy\r\n")
        error = self.failureResultOf(d, ConnectionLevelError).value
        self.assertEqual(error.reply, Reply(421, "4.3.2", "Too busy"))
        self.assertTrue(transport.disconnecting)

    def test_malformed_reply(self) -> None:
        """A reply that is not SMTP aborts the connection with a 4.5.0 connection-level failure."""
        proto, transport = self.connect()
        d = proto.handshake()
        proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertEqual(self.failureResultOf(d, ConnectionLevelError).value.reply.status, "4.5.0")

    def test_421_during_transaction(self) -> None:
        """421 to RCPT: refused recipients stay failed, the rest are deferred for the next host."""
        proto, _transport = self.ready()
        d = proto.send(message("fail@example.com", "b@example.com"))
        proto.dataReceived(b"250 Ok\r\n550 5.1.1 No\r\n421 4.7.0 Try again later\r\n")
        outcome = self.successResultOf(d)
        self.assertTrue(outcome.retry_next)
        self.assertFalse(outcome.reusable)
        self.assertEqual([r.status for r in outcome.results], [FAILED, DEFERRED])
        self.assertEqual(outcome.results[1].reply.code, 421)

    def test_lost_after_final_dot(self) -> None:
        """Connection lost waiting for the final reply: deferred, and not sent to another host at once."""
        proto, _transport = self.ready("PIPELINING")
        d = proto.send(message())
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        proto.connectionLost(Failure(ierror.ConnectionLost()))
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.results[0].status, DEFERRED)
        self.assertFalse(outcome.retry_next)
        self.assertIn("end of data", str(outcome.results[0].reply))

    def test_lost_before_data(self) -> None:
        """Connection lost before DATA: deferred with 4.4.2, and another host may be tried."""
        proto, _transport = self.ready("PIPELINING")
        d = proto.send(message())
        proto.dataReceived(b"250 Ok\r\n")
        proto.connectionLost(Failure(ierror.ConnectionLost()))
        outcome = self.successResultOf(d)
        self.assertTrue(outcome.retry_next)
        self.assertEqual(outcome.results[0].reply.status, "4.4.2")

    def test_stale_reused_connection(self) -> None:
        """A reused connection that dies before its first reply asks for a fresh connection."""
        proto, _transport = self.ready("PIPELINING")
        d = proto.send(message())
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.successResultOf(d)
        d = proto.send(message())
        proto.connectionLost(Failure(ierror.ConnectionLost()))
        self.failureResultOf(d, _StaleConnection)

    def test_reuse_for_two_messages(self) -> None:
        """After a completed transaction the connection takes another message without RSET."""
        proto, transport = self.ready("PIPELINING")
        for n in range(2):
            d = proto.send(message(f"r{n}@example.com"))
            self.assertTrue(transport.take().startswith(b"MAIL FROM:"))
            proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
            transport.take()
            proto.dataReceived(f"250 Ok: queued as {n}\r\n".encode())
            self.assertEqual(self.successResultOf(d).results[0].status, DELIVERED)
        self.assertEqual(proto.transactions, 2)

    def test_quit(self) -> None:
        """quit sends QUIT, waits for the reply, then closes."""
        proto, transport = self.ready()
        d = proto.quit()
        self.assertEqual(transport.take(), b"QUIT\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"221 Bye\r\n")
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)

    def test_async_body_source(self) -> None:
        """
        An async chunk source is written one chunk behind, dot-stuffed across chunks; the last chunk goes
        out with the final dot in one write.
        """
        gate: Deferred[None] = Deferred()
        calls = []

        async def source() -> AsyncIterator[bytes]:
            calls.append(1)
            yield b"first line\r\n"
            await gate
            yield b".second\r\n"

        proto, transport = self.ready("PIPELINING")
        msg = OutboundMessage("s@relay.test", ("a@example.com",), body=source)
        d = proto.send(msg)
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        transport.take()
        self.assertEqual(transport.value(), b"")  # the first chunk waits for the second
        gate.callback(None)
        self.assertEqual(transport.writes[-2:], [b"first line\r\n", b"..second\r\n.\r\n"])
        self.assertEqual(transport.take(), b"first line\r\n..second\r\n.\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(self.successResultOf(d).results[0].status, DELIVERED)
        self.assertEqual(calls, [1])

    def test_unreadable_body(self) -> None:
        """A body source that fails mid-message aborts the connection (no half message) and defers."""

        def body() -> Any:
            yield b"first\r\n"
            raise OSError("spool file vanished")

        proto, transport = self.ready("PIPELINING")
        d = proto.send(OutboundMessage("s@relay.test", ("a@example.com",), body=body))
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        outcome = self.successResultOf(d)
        self.assertTrue(transport.disconnected)  # StringTransport.abortConnection sets this
        self.assertNotIn(b"\r\n.\r\n", transport.value())
        self.assertEqual((outcome.results[0].status, outcome.results[0].reply.status), (DEFERRED, "4.3.0"))
        self.assertFalse(outcome.retry_next)
        self.flushLoggedErrors()

    def test_chunked_body_at_16k(self) -> None:
        """Regression (twisted.mail): with 16 KiB chunks, a dot line on the boundary is stuffed, CRLF not doubled."""
        first = b"x" * (16 * 1024 - 1) + b"\r"
        body = first + b"\n.\r\n.dot\r\n"
        proto, transport = self.ready("PIPELINING", chunk_size=16 * 1024)
        proto.send(message(body=body))
        transport.take()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        wire = transport.take()
        self.assertEqual(wire, oracle(body))
        self.assertNotIn(b"\r\r\n", wire)

    def test_flow_control(self) -> None:
        """The body waits while the transport is paused and goes on, one chunk at a time, when it resumes."""
        proto, _ = self.ready("PIPELINING", chunk_size=1000)

        class Pausing(RecordingTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                if self.producer is not None:
                    self.producer.pauseProducing()

        pausing = Pausing()
        proto.transport = pausing
        d = proto.send(message(body=b"c" * 2500))
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        self.assertEqual(len(pausing.writes), 2)  # the commands, then one body chunk
        producer = pausing.producer
        assert producer is not None
        producer.resumeProducing()
        self.assertEqual(len(pausing.writes), 3)
        producer.resumeProducing()
        self.assertEqual(len(pausing.writes), 4)
        producer.resumeProducing()
        self.assertTrue(pausing.value().endswith(b"c\r\n.\r\n"))
        self.assertIsNone(pausing.producer)
        self.assertNoResult(d)
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(self.successResultOf(d).results[0].status, DELIVERED)

    def test_data_block_timeout(self) -> None:
        """A transport that stays paused longer than the data block timeout defers everyone."""
        proto, _ = self.ready("PIPELINING", chunk_size=100, timeouts=Timeouts(data_block=7))

        class Stuck(RecordingTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                if self.producer is not None:
                    self.producer.pauseProducing()

        stuck = Stuck()
        proto.transport = stuck
        d = proto.send(message(body=b"x" * 1000))
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
        self.clock.advance(6.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertTrue(stuck.disconnecting)
        proto.connectionLost(Failure(ierror.ConnectionLost()))
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.results[0].status, DEFERRED)
        self.assertIn("data block", str(outcome.results[0].reply))


class TimeoutTests(ProtocolTestMixin, SynchronousTestCase):
    """Each wait has its RFC 5321 §4.5.3.2 timeout, configurable; a timeout defers everyone pending."""

    T = Timeouts(greeting=11, ehlo=12, mail=13, rcpt=14, data_init=15, data_end=16)

    def check(self, d: Deferred[Any], seconds: float, transport: RecordingTransport) -> None:
        self.clock.advance(seconds - 0.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_greeting(self) -> None:
        """No greeting within the greeting timeout: a 4.4.2 connection-level failure."""
        proto, transport = self.connect(timeouts=self.T)
        d = proto.handshake()
        self.check(d, 11, transport)
        error = self.failureResultOf(d, ConnectionLevelError).value
        self.assertEqual(error.reply.status, "4.4.2")
        self.assertIn("greeting", str(error.reply))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ehlo(self) -> None:
        """No EHLO reply within its timeout fails the handshake."""
        proto, transport = self.connect(timeouts=self.T)
        d = proto.handshake()
        proto.dataReceived(b"220 hi\r\n")
        self.check(d, 12, transport)
        self.assertIn("EHLO", str(self.failureResultOf(d, ConnectionLevelError).value.reply))

    def stage(self, replies: bytes, seconds: float, name: str) -> None:
        proto, transport = self.ready(timeouts=self.T)
        d = proto.send(message("a@example.com", "b@example.com"))
        proto.dataReceived(replies)
        self.check(d, seconds, transport)
        outcome = self.successResultOf(d)
        self.assertEqual({r.status for r in outcome.results}, {DEFERRED})
        self.assertIn(name, str(outcome.results[0].reply))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mail(self) -> None:
        """MAIL FROM reply timeout."""
        self.stage(b"", 13, "MAIL FROM")

    def test_rcpt(self) -> None:
        """RCPT TO reply timeout."""
        self.stage(b"250 Ok\r\n250 Ok\r\n", 14, "RCPT TO")

    def test_data_init(self) -> None:
        """DATA reply timeout."""
        self.stage(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n", 15, "DATA")

    def test_data_end(self) -> None:
        """Final reply timeout after the dot."""
        self.stage(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 Go\r\n", 16, "end of data")

    def test_one_timer_per_connection(self) -> None:
        """
        A connection keeps one read timer from message to message.  Idle in
        between, it is not timed out; the next wait counts from its own command.
        """
        proto, transport = self.ready("PIPELINING", timeouts=self.T)
        d = proto.send(message("a@example.com"))
        [timer] = self.clock.getDelayedCalls()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.assertEqual(self.successResultOf(d).results[0].status, DELIVERED)
        self.assertEqual(self.clock.getDelayedCalls(), [timer])  # moved on, not replaced
        self.clock.advance(100)  # longer than every timeout, with nothing awaited
        self.assertFalse(transport.disconnecting)
        d = proto.send(message("b@example.com"))
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.check(d, 15, transport)
        self.assertIn("DATA", str(self.successResultOf(d).results[0].reply))


# ---------------------------------------------------------------------------
# Conversations with the sink, in memory, with real TLS.
# ---------------------------------------------------------------------------


class SinkConversationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.tls = make_tls("mx.example.com")

    def converse(
        self, sink: Sink, policy: TLSPolicy, credentials: Credentials | None = None, **config: Any
    ) -> tuple[SMTPClientProtocol, MemoryPipe, Deferred[None]]:
        cfg = ClientConfig("relay.test", **config)
        proto = SMTPClientProtocol(self.clock, cfg, HOST, "192.0.2.1", policy, credentials)
        pipe = MemoryPipe(proto, sink.factory.buildProtocol(None))
        d = proto.handshake()
        pipe.flush()
        return proto, pipe, d

    def send(self, proto: SMTPClientProtocol, pipe: MemoryPipe, msg: OutboundMessage) -> TransactionOutcome:
        d = proto.send(msg)
        pipe.flush()
        outcome: TransactionOutcome = self.successResultOf(d)
        return outcome

    def test_starttls_upgrade(self) -> None:
        """STARTTLS offered: the client upgrades, says EHLO again, and the message travels encrypted."""
        sink = Sink(tls=self.tls.server_options)
        proto, pipe, d = self.converse(sink, TLSPolicy("may"))
        self.successResultOf(d)
        self.assertTrue(proto.tls_active)
        self.assertEqual(sink.commands[:3], ["EHLO relay.test", "STARTTLS", "EHLO relay.test"])
        outcome = self.send(proto, pipe, message())
        self.assertTrue(outcome.results[0].tls)
        self.assertTrue(sink.messages[0].tls)

    def test_starttls_verified(self) -> None:
        """Verify mode accepts a certificate for the host's name from the trusted CA."""
        sink = Sink(tls=self.tls.server_options)
        proto, _, d = self.converse(sink, TLSPolicy("verify", trust_root=self.tls.trust_root))
        self.successResultOf(d)
        self.assertTrue(proto.tls_active)

    def test_starttls_untrusted_certificate(self) -> None:
        """Verify mode with an unknown CA fails the handshake: 4.7.5, no MAIL FROM in plaintext."""
        sink = Sink(tls=self.tls.server_options)
        other = make_tls("mx.example.com")
        _, _, d = self.converse(sink, TLSPolicy("verify", trust_root=other.trust_root))
        error = self.failureResultOf(d, ConnectionLevelError).value
        self.assertEqual(error.reply.status, "4.7.5")
        self.assertTrue(error.retry_next)
        self.assertNotIn("EHLO relay.test", sink.commands[2:])

    def test_starttls_handshake_failure(self) -> None:
        """A server that answers 220 and then no TLS: 4.7.5 failure, never plaintext on this host."""
        sink = Sink(tls=self.tls.server_options)
        sink.starttls_garbage = True
        _, _, d = self.converse(sink, TLSPolicy("may"))
        error = self.failureResultOf(d, ConnectionLevelError).value
        self.assertEqual((error.reply.code, error.reply.status), (451, "4.7.5"))
        self.assertIn("TLS handshake", str(error.reply))
        self.assertEqual(sink.commands, ["EHLO relay.test", "STARTTLS"])

    def test_starttls_refused(self) -> None:
        """STARTTLS offered then refused (454) is a connection-level 4.7.5 failure too."""
        sink = Sink(tls=self.tls.server_options)
        sink.starttls_reply = Reply(454, "4.7.0", "TLS not available due to temporary reason")
        _, _, d = self.converse(sink, TLSPolicy("may"))
        self.assertEqual(self.failureResultOf(d, ConnectionLevelError).value.reply.status, "4.7.5")

    def test_starttls_response_injection(self) -> None:
        """Plaintext sent after 220 (a man in the middle) is discarded, never read as the TLS EHLO reply."""
        sink = Sink(tls=self.tls.server_options)
        sink.starttls_inject = b"250-evil.example\r\n250 AUTH PLAIN\r\n"
        proto, pipe, d = self.converse(sink, TLSPolicy("may"))
        self.successResultOf(d)
        self.assertNotIn("AUTH", proto.extensions)
        self.assertIn("PIPELINING", proto.extensions)
        self.assertEqual(self.send(proto, pipe, message()).results[0].status, DELIVERED)

    def test_tls_required_not_offered(self) -> None:
        """encrypt level and no STARTTLS: 4.7.4 failure before any MAIL FROM."""
        sink = Sink()
        _, _, d = self.converse(sink, TLSPolicy("encrypt"))
        self.assertEqual(self.failureResultOf(d, ConnectionLevelError).value.reply.status, "4.7.4")
        self.assertNotIn("MAIL", " ".join(sink.commands))

    def test_tls_none(self) -> None:
        """Level none never says STARTTLS."""
        sink = Sink(tls=self.tls.server_options)
        proto, _, d = self.converse(sink, TLSPolicy("none"))
        self.successResultOf(d)
        self.assertNotIn("STARTTLS", sink.commands)
        self.assertFalse(proto.tls_active)

    def test_auth_plain_over_tls(self) -> None:
        """Credentials go with AUTH PLAIN, only after TLS."""
        sink = Sink(tls=self.tls.server_options, auth={"user": "secret"})
        _, _pipe, d = self.converse(sink, TLSPolicy("may"), Credentials("user", "secret"))
        self.successResultOf(d)
        self.assertEqual(sink.auth_attempts, [("PLAIN", "user", "secret", True)])

    def test_auth_login(self) -> None:
        """Only LOGIN offered: AUTH LOGIN."""
        sink = Sink(tls=self.tls.server_options, auth={"user": "secret"})
        sink.auth_mechanisms = "LOGIN"
        proto, pipe, d = self.converse(sink, TLSPolicy("may"), Credentials("user", "secret"))
        self.successResultOf(d)
        self.assertEqual(sink.auth_attempts, [("LOGIN", "user", "secret", True)])
        self.send(proto, pipe, message())
        self.assertEqual(sink.messages[0].auth, "user")

    def test_no_auth_in_plaintext(self) -> None:
        """Regression (twisted.mail): no TLS, no credentials on the wire; a connection-level 4.7.0 failure."""
        sink = Sink(auth={"user": "secret"})
        _, _, d = self.converse(sink, TLSPolicy("may"), Credentials("user", "secret"))
        error = self.failureResultOf(d, ConnectionLevelError).value
        self.assertIn("without TLS", str(error.reply))
        self.assertEqual(sink.auth_attempts, [])
        self.assertNotIn("AUTH", " ".join(sink.commands))

    def test_plaintext_auth_when_allowed(self) -> None:
        """allow_plaintext_auth lets credentials go without TLS."""
        sink = Sink(auth={"user": "secret"})
        _, _, d = self.converse(sink, TLSPolicy("may"), Credentials("user", "secret"), allow_plaintext_auth=True)
        self.successResultOf(d)
        self.assertEqual(sink.auth_attempts, [("PLAIN", "user", "secret", False)])

    def test_auth_failure(self) -> None:
        """Wrong credentials: a connection-level failure naming the server's 535."""
        sink = Sink(tls=self.tls.server_options, auth={"user": "secret"})
        _, _, d = self.converse(sink, TLSPolicy("may"), Credentials("user", "wrong"))
        error = self.failureResultOf(d, ConnectionLevelError).value
        self.assertIn("535", str(error.reply))

    def test_pipelined_batch_at_server(self) -> None:
        """The sink receives MAIL, both RCPTs and DATA in one read; without PIPELINING one per read."""
        sink = Sink()
        proto, pipe, _ = self.converse(sink, TLSPolicy("none"))
        self.send(proto, pipe, message("a@example.com", "b@example.com"))
        self.assertEqual(len(sink.command_batches[-1]), 4)
        plain = Sink(pipelining=False)
        proto, pipe, _d = self.converse(plain, TLSPolicy("none"))
        self.send(proto, pipe, message("a@example.com", "b@example.com"))
        self.assertEqual({len(b) for b in plain.command_batches}, {1})

    def test_lone_dot_smuggling_through_sink(self) -> None:
        """Regression (twisted.mail): a smuggled second message at a chunk boundary arrives as body text."""
        first = b"x" * (16 * 1024 - 2) + b"\n"
        body = first + b".\nMAIL FROM:<evil@example.net>\nRCPT TO:<victim@example.com>\nDATA\nspoof\n.\nend\n"
        sink = Sink()
        proto, pipe, _ = self.converse(sink, TLSPolicy("none"), chunk_size=16 * 1024)
        self.send(proto, pipe, message(body=body))
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(sink.messages[0].data, body.replace(b"\n", b"\r\n"))
        self.assertNotIn("MAIL FROM:<evil@example.net>", sink.commands)

    def test_large_body_flow_control_over_tls(self) -> None:
        """A 2 MiB body over TLS never has more than about two chunks buffered in the transport."""
        sink = Sink(tls=self.tls.server_options)
        cfg = ClientConfig("relay.test", chunk_size=16 * 1024)
        proto = SMTPClientProtocol(self.clock, cfg, HOST, "192.0.2.1", TLSPolicy("may"))
        pipe = MemoryPipe(proto, sink.factory.buildProtocol(None), high_water=32 * 1024)
        self.successResultOf(self._handshake(proto, pipe))
        body = b"line of text that is not short at all\r\n" * 55000
        outcome = self.send(proto, pipe, message(body=body))
        self.assertEqual(outcome.results[0].status, DELIVERED)
        self.assertEqual(sink.messages[0].data, body)
        self.assertLess(pipe.client.max_buffered, 128 * 1024)

    def _handshake(self, proto: SMTPClientProtocol, pipe: MemoryPipe) -> Deferred[None]:
        d = proto.handshake()
        pipe.flush()
        return d


# ---------------------------------------------------------------------------
# DeliveryClient: hosts in order, the pool.
# ---------------------------------------------------------------------------


class DeliveryClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.tls = make_tls("mx1.example.com", "mx2.example.com")

    def client(self, **config: Any) -> DeliveryClient:
        config.setdefault("tls", TLSPolicy("may"))
        return DeliveryClient(self.reactor, ClientConfig("relay.test", **config), clock=self.reactor)

    def connect(self, sink: Sink) -> MemoryPipe:
        pipe, _ = connect_pending(self.reactor, sink.factory)
        pipe.flush()
        return pipe

    def test_delivered(self) -> None:
        """One host, one message: delivered, with host, IP and TLS in the result."""
        sink = Sink(tls=self.tls.server_options)
        d = self.client().deliver(DEST, message("a@example.com", "fail-b@example.com"))
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.1", 25))
        self.connect(sink)
        results = self.successResultOf(d)
        self.assertEqual(
            [(r.recipient, r.status, r.mx_host, r.ip, r.tls) for r in results],
            [
                ("a@example.com", DELIVERED, "mx1.example.com", "192.0.2.1", True),
                ("fail-b@example.com", FAILED, "mx1.example.com", "192.0.2.1", True),
            ],
        )

    def test_next_mx_on_refused(self) -> None:
        """Connection refused by the first MX: the second is tried."""
        sink = Sink()
        d = self.client().deliver(DEST, message())
        refuse_pending(self.reactor)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.2", 25))
        self.connect(sink)
        (result,) = self.successResultOf(d)
        self.assertEqual((result.status, result.mx_host), (DELIVERED, "mx2.example.com"))

    def test_all_hosts_refused(self) -> None:
        """Every host refuses: deferred with a synthetic 451 4.4.1 naming the last host."""
        d = self.client().deliver(DEST, message("a@example.com", "b@example.com"))
        refuse_pending(self.reactor)
        refuse_pending(self.reactor)
        results = self.successResultOf(d)
        self.assertEqual({r.status for r in results}, {DEFERRED})
        self.assertEqual(results[0].reply, Reply(451, "4.4.1", "Connection refused by mx2.example.com[192.0.2.2]"))

    def test_connect_timeout(self) -> None:
        """A connect timeout is a 4.4.1 deferral that moves on to the next host."""
        d = self.client().deliver(Destination("example.com", (MX1,)), message())
        refuse_pending(self.reactor, ierror.TimeoutError())
        (result,) = self.successResultOf(d)
        self.assertEqual(result.reply, Reply(451, "4.4.1", "Connection timed out to mx1.example.com[192.0.2.1]"))

    def test_next_mx_on_421_greeting(self) -> None:
        """A 421 greeting: the next MX gets the message."""
        busy, good = Sink(), Sink()
        busy.greeting = Reply(421, "4.3.2", "Too busy")
        d = self.client().deliver(DEST, message())
        self.connect(busy)
        self.connect(good)
        (result,) = self.successResultOf(d)
        self.assertEqual((result.status, result.mx_host), (DELIVERED, "mx2.example.com"))
        self.assertEqual(len(good.messages), 1)

    def test_next_mx_on_tls_failure(self) -> None:
        """A failed STARTTLS handshake on MX1 sends the message over TLS to MX2; MX1 never sees MAIL FROM."""
        broken, good = Sink(tls=self.tls.server_options), Sink(tls=self.tls.server_options)
        broken.starttls_garbage = True
        d = self.client().deliver(DEST, message())
        self.connect(broken)
        self.connect(good)
        (result,) = self.successResultOf(d)
        self.assertEqual((result.status, result.mx_host, result.tls), (DELIVERED, "mx2.example.com", True))
        self.assertFalse(any(c.startswith("MAIL") for c in broken.commands))
        self.assertEqual(broken.messages, [])

    def test_tls_failure_everywhere(self) -> None:
        """TLS failing on every MX defers with 4.7.5; nothing is sent in plaintext."""
        sinks = [Sink(tls=self.tls.server_options) for _ in range(2)]
        for s in sinks:
            s.starttls_garbage = True
        d = self.client().deliver(DEST, message())
        for s in sinks:
            self.connect(s)
        (result,) = self.successResultOf(d)
        self.assertEqual((result.status, result.reply.status), (DEFERRED, "4.7.5"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_no_next_mx_on_rcpt_5xx_or_4xx(self) -> None:
        """RCPT refusals (5xx and 4xx) are final for this attempt: MX2 is not tried."""
        sink = Sink()
        d = self.client().deliver(DEST, message("fail-a@example.com", "defer-b@example.com", "c@example.com"))
        self.connect(sink)
        results = self.successResultOf(d)
        self.assertEqual([r.status for r in results], [FAILED, DEFERRED, DELIVERED])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_421_mid_transaction_next_mx(self) -> None:
        """421 at RCPT on MX1: the recipients not refused go to MX2."""
        first, second = Sink(), Sink()
        d = self.client().deliver(DEST, message("fail-a@example.com", "close-b@example.com"))
        self.connect(first)
        self.connect(second)
        results = self.successResultOf(d)
        self.assertEqual((results[0].status, results[0].mx_host), (FAILED, "mx1.example.com"))
        self.assertEqual(results[1].mx_host, "mx2.example.com")

    def test_defer_then_deliver(self) -> None:
        """A recipient deferred twice (sink ``defer2-``) is delivered on the third attempt."""
        sink = Sink()
        client = self.client()
        statuses = []
        pipe = None
        for _ in range(3):
            d = client.deliver(Destination("example.com", (MX1,)), message("defer2-a@example.com"))
            if pipe is None:
                pipe = self.connect(sink)
            pipe.flush()
            statuses.append(self.successResultOf(d)[0].status)
        self.assertEqual(statuses, [DEFERRED, DEFERRED, DELIVERED])
        self.assertEqual(sink.connections, 1)

    def test_reuse_and_idle_close(self) -> None:
        """Two messages share one connection; after the idle time the pool says QUIT and closes it."""
        sink = Sink(tls=self.tls.server_options)
        client = self.client()
        d1 = client.deliver(DEST, message("a@example.com"))
        pipe = self.connect(sink)
        self.successResultOf(d1)
        self.assertEqual(len(client.pool), 1)
        d2 = client.deliver(DEST, message("b@example.com"))
        pipe.flush()
        self.assertEqual(self.successResultOf(d2)[0].status, DELIVERED)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual([m.connection for m in sink.messages], [1, 1])
        self.assertEqual(sink.commands.count("STARTTLS"), 1)
        self.reactor.advance(5)
        pipe.flush()
        self.assertEqual(sink.quits, 1)
        self.assertEqual(len(client.pool), 0)
        self.assertTrue(pipe.client.closed)

    def test_reuse_hooks_the_connection_once(self) -> None:
        """
        A connection carrying many messages is hooked to the pool once: the
        pool's hang-up callbacks do not grow with each message it carried.
        """
        sink = Sink()
        client = self.client()
        d = client.deliver(DEST, message("a@example.com"))
        pipe = self.connect(sink)
        self.successResultOf(d)
        for i in range(20):
            d = client.deliver(DEST, message(f"m{i}@example.com"))
            pipe.flush()
            self.assertEqual(self.successResultOf(d)[0].status, DELIVERED)
        self.assertEqual(sink.connections, 1)
        [[conn]] = client.pool._idle.values()
        self.assertEqual(len(conn._lost_callbacks), 1)
        pipe.server.loseConnection()
        pipe.flush()
        self.assertEqual(len(client.pool), 0)
        self.assertEqual(client.pool._watched, set())
        self.assertEqual(client.pool._timers, {})

    def test_one_idle_timer_per_connection(self) -> None:
        """
        A connection put back after each message keeps one idle timer, moved
        on each time: idle time counts from the last message, not the first.
        """
        sink = Sink()
        client = self.client()
        d = client.deliver(DEST, message("a@example.com"))
        pipe = self.connect(sink)
        self.successResultOf(d)
        [timer] = client.pool._timers.values()
        for i in range(3):
            self.reactor.advance(4)  # each time within the 5 s idle timeout
            d = client.deliver(DEST, message(f"m{i}@example.com"))
            pipe.flush()
            self.assertEqual(self.successResultOf(d)[0].status, DELIVERED)
            self.assertEqual(list(client.pool._timers.values()), [timer])
        self.reactor.advance(4.9)
        pipe.flush()
        self.assertEqual((sink.quits, len(client.pool)), (0, 1))
        self.reactor.advance(0.2)
        pipe.flush()
        self.assertEqual((sink.quits, len(client.pool)), (1, 0))

    def test_idle_timer_while_in_use(self) -> None:
        """The idle timer going off while its connection carries a message does not close it."""

        class Conn:
            alive = True
            quits = 0

            def quit(self) -> None:
                self.quits += 1

            def on_lost(self, callback: Any) -> None:
                pass

        clock = Clock()
        pool = ConnectionPool(clock, idle_timeout=5.0)
        key: Any = ("mx1.example.com", None, 25, TLSPolicy("none"), None)
        conn: Any = Conn()
        pool.put(key, conn)
        self.assertIs(pool.take(key), conn)
        clock.advance(6)  # the timer goes off during a long transaction
        self.assertEqual((conn.quits, pool._timers), (0, {}))
        pool.put(key, conn)  # back in the pool: a new timer from now
        clock.advance(4.9)
        self.assertEqual(conn.quits, 0)
        clock.advance(0.2)
        self.assertEqual((conn.quits, len(pool)), (1, 0))

    def test_reuse_after_rejection_sends_rset(self) -> None:
        """A transaction that ended without DATA is followed by RSET on the reused connection."""
        sink = Sink()
        client = self.client()
        d1 = client.deliver(DEST, message("fail-a@example.com"))
        pipe = self.connect(sink)
        self.successResultOf(d1)
        d2 = client.deliver(DEST, message("b@example.com"))
        pipe.flush()
        self.assertEqual(self.successResultOf(d2)[0].status, DELIVERED)
        self.assertEqual(sink.command_batches[-1][:2], ["RSET", "MAIL FROM:<s@relay.test> SIZE=24"])

    def test_server_closes_idle_connection(self) -> None:
        """A pooled connection the server closes leaves the pool; the next message opens a new one."""
        sink = Sink()
        client = self.client()
        d1 = client.deliver(DEST, message())
        pipe = self.connect(sink)
        self.successResultOf(d1)
        pipe.server.loseConnection()
        pipe.flush()
        self.assertEqual(len(client.pool), 0)
        client.deliver(DEST, message())
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_stale_pooled_connection_replaced(self) -> None:
        """A pooled connection found dead at the first command is replaced by a fresh one, not a deferral."""
        sink = Sink()
        client = self.client()
        d1 = client.deliver(DEST, message())
        pipe = self.connect(sink)
        self.successResultOf(d1)
        pipe.server.loseConnection()  # closed, but the client has not noticed yet
        d2 = client.deliver(DEST, message("b@example.com"))
        pipe.flush()
        self.assertNoResult(d2)
        self.connect(sink)
        self.assertEqual(self.successResultOf(d2)[0].status, DELIVERED)

    def test_budget_stops_further_hosts(self) -> None:
        """Past the attempt budget no further host is tried."""
        silent = Sink()
        silent.silent = True
        client = self.client(attempt_budget=100, timeouts=Timeouts(greeting=300))
        d = client.deliver(DEST, message())
        self.connect(silent)
        self.reactor.advance(300)
        (result,) = self.successResultOf(d)
        self.assertEqual(result.reply.status, "4.4.2")
        self.assertIn("greeting", str(result.reply))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_max_connection_attempts(self) -> None:
        """At most max_connection_attempts addresses are tried."""
        many = Destination("example.com", (MXHost("mx", 10, tuple(f"192.0.2.{i}" for i in range(1, 9))),))
        d = self.client(max_connection_attempts=3).deliver(many, message())
        for _ in range(3):
            refuse_pending(self.reactor)
        self.assertEqual(self.successResultOf(d)[0].status, DEFERRED)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_connect_arguments(self) -> None:
        """The connect timeout and source address are passed; IPv6 addresses use the IPv6 source."""
        client = self.client(source_ipv4="198.51.100.7", source_ipv6="2001:db8::7", timeouts=Timeouts(connect=12))
        client.deliver(DEST, message())
        host, port, _, timeout, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout, bind), ("192.0.2.1", 25, 12, ("198.51.100.7", 0)))
        v6 = client._endpoint(MXHost("mx6", 10, ("2001:db8::25",)), "2001:db8::25")
        v6.connect(Factory.forProtocol(Protocol))
        host, port, _, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout, bind), ("2001:db8::25", 25, 12, ("2001:db8::7", 0)))
        self.assertIsInstance(client._endpoint(MXHost("relay.example.com"), None), HostnameEndpoint)

    def test_smarthost_with_auth_and_verify(self) -> None:
        """A smarthost destination brings its own TLS policy and credentials."""
        sink = Sink(tls=self.tls.server_options, auth={"u": "p"})
        dest = smarthost_destination(
            "192.0.2.9:587",
            tls=TLSPolicy("verify", verify_hostname="mx1.example.com", trust_root=self.tls.trust_root),
            credentials=Credentials("u", "p"),
        )
        d = self.client().deliver(dest, message())
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.9", 587))
        self.connect(sink)
        self.assertEqual(self.successResultOf(d)[0].status, DELIVERED)
        self.assertEqual(sink.messages[0].auth, "u")

    def test_duplicates_and_order(self) -> None:
        """Results come in the message's recipient order; a duplicate recipient is sent once."""
        sink = Sink()
        d = self.client().deliver(DEST, message("b@example.com", "a@example.com", "b@example.com"))
        self.connect(sink)
        results = self.successResultOf(d)
        self.assertEqual([r.recipient for r in results], ["b@example.com", "a@example.com", "b@example.com"])
        self.assertEqual(sink.messages[0].rcpt_to, ["b@example.com", "a@example.com"])

    def test_body_read_again_for_next_host(self) -> None:
        """A body factory is called once per host tried, so a failed host does not consume it."""
        calls = []

        def body() -> list[bytes]:
            calls.append(1)
            return [b"Subject: x\r\n\r\n", b".dot\r\n"]

        first, second = Sink(), Sink()
        first.data_reply = Reply(421, "4.3.0", "Lost my mind")
        d = self.client().deliver(DEST, OutboundMessage("s@relay.test", ("a@example.com",), body=body))
        self.connect(first)
        self.connect(second)
        self.assertEqual(self.successResultOf(d)[0].status, DELIVERED)
        self.assertEqual(second.messages[0].data, b"Subject: x\r\n\r\n.dot\r\n")
        self.assertEqual(len(calls), 2)

    def test_close_all(self) -> None:
        """close() says QUIT to every pooled connection."""
        sink = Sink()
        client = self.client()
        d = client.deliver(DEST, message())
        pipe = self.connect(sink)
        self.successResultOf(d)
        done = client.close()
        pipe.flush()
        self.successResultOf(done)
        self.assertEqual(sink.quits, 1)

    def test_results_for_error(self) -> None:
        """A resolver error becomes one result per recipient: failed if permanent, deferred if not."""
        failed = results_for_error(["a@x"], Reply(556, "5.1.10", "null MX"))
        deferred = results_for_error(["a@x"], Reply(451, "4.4.3", "SERVFAIL"))
        self.assertEqual(failed, [DeliveryResult("a@x", FAILED, Reply(556, "5.1.10", "null MX"))])
        self.assertEqual(deferred[0].status, DEFERRED)


# ---------------------------------------------------------------------------
# The sink itself.
# ---------------------------------------------------------------------------


class SinkProtocolTests(SynchronousTestCase):
    def test_scripted_replies(self) -> None:
        """Local parts script the sink: fail-, full-, defer2- (twice, then accepted), close-."""
        sink = Sink()
        proto = sink.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO t\r\nMAIL FROM:<s@x>\r\n")
        for rcpt in (b"fail-a@x", b"full-a@x", b"defer2-a@x", b"defer2-a@x", b"defer2-a@x"):
            proto.dataReceived(b"RCPT TO:<" + rcpt + b">\r\n")
        replies = [line[:3] for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual(replies, [b"220", b"250", b"250", b"550", b"552", b"451", b"451", b"250"])
        proto.dataReceived(b"RCPT TO:<close-a@x>\r\n")
        self.assertTrue(
            transport.value().endswith(b"421 4.3.2 Service shutting down, closing transmission channel\r\n")
        )
        self.assertTrue(transport.disconnecting)

    def test_records_exact_bytes(self) -> None:
        """The sink keeps both the raw DATA bytes and the unstuffed message."""
        sink = Sink()
        proto = sink.factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"EHLO t\r\nMAIL FROM:<s@x> SIZE=9\r\nRCPT TO:<a@x>\r\nDATA\r\n..dot\r\nb\r\n.\r\n")
        (msg,) = sink.messages
        self.assertEqual((msg.raw, msg.data, msg.params), (b"..dot\r\nb\r\n.\r\n", b".dot\r\nb\r\n", ["SIZE=9"]))

    def test_connection_level_behaviours(self) -> None:
        """A 421 greeting closes; drop_on_connect closes without a word."""
        sink = Sink()
        sink.greeting = Reply(421, "4.3.2", "busy")
        t = StringTransport()
        sink.factory.buildProtocol(None).makeConnection(t)
        self.assertEqual((t.value(), t.disconnecting), (b"421 4.3.2 busy\r\n", True))
        sink = Sink()
        sink.drop_on_connect = True
        t = StringTransport()
        sink.factory.buildProtocol(None).makeConnection(t)
        self.assertEqual((t.value(), t.disconnecting), (b"", True))


class SinkSocketTests(TestCase):
    """The sink on loopback, with real clients: smtplib and mailrelay's own client over real TLS."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.tls = make_tls("127.0.0.1")
        self.sink = start_sink(reactor, tls=self.tls.server_options)
        self.addCleanup(self.sink.stop)

    async def test_smtplib(self) -> None:
        """smtplib sends through the sink with STARTTLS; the sink records envelope and bytes."""
        assert self.sink.port is not None
        port = self.sink.port

        def send() -> Any:
            import ssl

            context = ssl.create_default_context()
            self.tls.ca.configure_trust(context)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("client.test")
                s.starttls(context=context)
                return s.sendmail("s@x.test", ["a@example.com", "fail-b@example.com"], b"Subject: hi\r\n\r\n.x\r\n")

        refused = await deferToThread(send)
        self.assertEqual(list(refused), ["fail-b@example.com"])
        (msg,) = self.sink.messages
        self.assertEqual((msg.rcpt_to, msg.data, msg.tls), (["a@example.com"], b"Subject: hi\r\n\r\n.x\r\n", True))

    async def test_mailrelay_client(self) -> None:
        """DeliveryClient delivers to the sink over real sockets and TLS, and reuses the connection."""
        assert self.sink.port is not None
        client = DeliveryClient(self.reactor, ClientConfig("relay.test", tls=TLSPolicy("may")))
        self.addCleanup(client.close)
        dest = Destination("example.com", (MXHost("localhost", 0, ("127.0.0.1",), self.sink.port),))
        first = await client.deliver(dest, message("a@example.com"))
        second = await client.deliver(dest, message("b@example.com"))
        self.assertEqual([first[0].status, second[0].status], [DELIVERED, DELIVERED])
        self.assertTrue(first[0].tls)
        self.assertEqual([m.connection for m in self.sink.messages], [1, 1])

    async def test_tls_reads_without_exceptions(self) -> None:
        """
        After STARTTLS the client's TLS layer reads as ``tlslayer.receive``
        does: a whole message's replies raise no ``WantReadError``.
        """
        assert self.sink.port is not None
        client = DeliveryClient(self.reactor, ClientConfig("relay.test", tls=TLSPolicy("may")))
        self.addCleanup(client.close)
        dest = Destination("example.com", (MXHost("localhost", 0, ("127.0.0.1",), self.sink.port),))
        first = await client.deliver(dest, message("a@example.com"))
        ((_, pooled),) = client.pool._idle.items()  # type: ignore[attr-defined]
        layer = pooled[0].transport.protocol
        self.assertIsInstance(layer, TLSMemoryBIOProtocol)
        counter = CountingConnection(layer._tlsConnection)
        layer._tlsConnection = counter
        second = await client.deliver(dest, message("b@example.com", "c@example.com"))
        self.assertEqual([r.status for r in first + second], [DELIVERED] * 3)
        self.assertEqual([m.connection for m in self.sink.messages], [1, 1])
        self.assertEqual(counter.want_read, 0)

    async def test_large_body_over_tls(self) -> None:
        """A body of many chunks crosses real TLS intact, the kernel's buffers pushing back on the writes."""
        assert self.sink.port is not None
        client = DeliveryClient(self.reactor, ClientConfig("relay.test", tls=TLSPolicy("may")))
        self.addCleanup(client.close)
        dest = Destination("example.com", (MXHost("localhost", 0, ("127.0.0.1",), self.sink.port),))
        body = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(60_000))
        pauses: list[bool] = []
        pause = _Flow.pauseProducing
        self.patch(_Flow, "pauseProducing", lambda flow: (pauses.append(True), pause(flow)))
        (result,) = await client.deliver(dest, message("a@example.com", body=body))
        self.assertEqual((result.status, result.tls), (DELIVERED, True))
        self.assertEqual(self.sink.messages[0].data, body)
        self.assertTrue(pauses)

    async def test_smarthost_by_name(self) -> None:
        """A smarthost given by name is resolved when connecting; its connection is eager and reused."""
        assert self.sink.port is not None
        client = DeliveryClient(self.reactor, ClientConfig("relay.test", tls=TLSPolicy("may")))
        self.addCleanup(client.close)
        dest = smarthost_destination(f"localhost:{self.sink.port}", "example.com")
        first = await client.deliver(dest, message("a@example.com"))
        second = await client.deliver(dest, message("b@example.com"))
        self.assertEqual([first[0].status, second[0].status], [DELIVERED, DELIVERED])
        self.assertEqual([m.connection for m in self.sink.messages], [1, 1])
        ((_, pooled),) = client.pool._idle.items()  # type: ignore[attr-defined]
        self.assertIsInstance(pooled[0].transport, EagerClient)
