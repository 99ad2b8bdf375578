"""
Tests for mailrelay.tlslayer's reading: a server TLS layer on a
StringTransport, a pyOpenSSL client in memory, records fed in chosen pieces.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import tlslayer
from mailrelay.tlslayer import DirectTLSFactory, DirectTLSProtocol
from tests.support.sink import make_tls
from tests.support.tls_counting import CountingConnection

TLS = make_tls("relay.test")


class Collector(Protocol):
    """Keeps what arrives and answers each piece with its length."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(b"got %d\r\n" % len(data))  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


class TwistedTLSFactory(TLSMemoryBIOFactory):
    """Twisted's unbatched layer as it is: the comparison."""

    protocol = TLSMemoryBIOProtocol


class Pair:
    """A server TLS layer of ``factory_class`` and a client ``SSL.Connection``, handshake done."""

    def __init__(self, factory_class: type[TLSMemoryBIOFactory] = DirectTLSFactory) -> None:
        self.app = Collector()
        factory = factory_class(TLS.server_options, False, Factory.forProtocol(lambda: self.app))
        self.layer: TLSMemoryBIOProtocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 50000))
        self.transport = StringTransport()
        self.layer.makeConnection(self.transport)
        context = SSL.Context(SSL.TLS_METHOD)
        self.client = SSL.Connection(context, None)
        self.client.set_connect_state()
        for _ in range(10):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            self.to_server(self.from_client())
            self.to_client()
            if self.layer._handshakeDone and self.client.get_protocol_version_name() == "TLSv1.3":
                break
        self.counter = CountingConnection(self.layer._tlsConnection)
        self.layer._tlsConnection = self.counter

    def from_client(self) -> bytes:
        try:
            return self.client.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""

    def to_server(self, wire: bytes, piece: int = 0) -> None:
        step = piece or len(wire) or 1
        for start in range(0, len(wire), step):
            self.layer.dataReceived(wire[start : start + step])

    def to_client(self) -> bytes:
        """What the server sent, decrypted by the client (handshake bytes give nothing)."""
        wire = self.transport.value()
        self.transport.clear()
        if wire:
            self.client.bio_write(wire)
        out = []
        while True:
            try:
                out.append(self.client.recv(1 << 16))
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
        return b"".join(out)

    def send(self, *records: bytes) -> bytes:
        """Encrypt each of ``records`` as its own record; the wire bytes."""
        for record in records:
            self.client.send(record)
        return self.from_client()


class ReceiveTests(SynchronousTestCase):
    def test_no_exceptions_after_the_handshake(self) -> None:
        """Each chunk is decrypted and answered without a WantReadError (Twisted's layer raises two per chunk)."""
        for factory_class, expected in ((TwistedTLSFactory, 10), (DirectTLSFactory, 0)):
            pair = Pair(factory_class)
            for n in range(5):
                pair.to_server(pair.send(b"MAIL FROM:<a%d@example.com>\r\n" % n))
                self.assertEqual(pair.to_client(), b"got 28\r\n")
            self.assertEqual(len(pair.app.received), 5)
            self.assertEqual(pair.counter.want_read, expected, factory_class)

    def test_record_in_pieces(self) -> None:
        """A record fed a few bytes at a time arrives once, whole, when its last byte does."""
        pair = Pair()
        body = b"x" * 3000 + b"\r\n"
        pair.to_server(pair.send(body), piece=7)
        self.assertEqual(b"".join(pair.app.received), body)
        self.assertEqual(pair.to_client(), b"got 3002\r\n")

    def test_several_records_in_one_chunk(self) -> None:
        """Every complete record of a chunk is delivered, and a partial one after them once it completes."""
        pair = Pair()
        wire = pair.send(b"one\r\n", b"two\r\n", b"three\r\n")
        more = pair.send(b"four\r\n")
        pair.to_server(wire + more[:10])
        self.assertEqual(pair.app.received, [b"one\r\n", b"two\r\n", b"three\r\n"])
        pair.to_server(more[10:])
        self.assertEqual(pair.app.received[-1], b"four\r\n")
        self.assertEqual(pair.to_client(), b"got 5\r\ngot 5\r\ngot 7\r\ngot 6\r\n")

    def test_client_closes_tls(self) -> None:
        """The client's close_notify is answered with the server's own and the connection closes."""
        pair = Pair()
        pair.client.shutdown()
        pair.to_server(pair.from_client())
        self.assertTrue(pair.transport.disconnecting)
        self.assertTrue(pair.layer._lostTLSConnection)
        self.assertNotEqual(pair.transport.value(), b"")  # the server's close_notify

    def test_garbage_after_the_handshake(self) -> None:
        """Bytes that are no TLS record end the connection, with the error for the application."""
        pair = Pair()
        pair.to_server(b"\x17\x03\x03\x00\x05hello")
        self.assertTrue(pair.transport.disconnecting)
        self.assertEqual(pair.app.received, [])

    def test_without_access_to_the_buffers(self) -> None:
        """A pyOpenSSL whose buffers cannot be read gets Twisted's loop, and the data still flows."""
        self.patch(tlslayer, "_mem_data", None)
        pair = Pair()
        self.assertIsInstance(pair.layer, DirectTLSProtocol)
        pair.to_server(pair.send(b"NOOP\r\n"))
        self.assertEqual(pair.app.received, [b"NOOP\r\n"])
        self.assertEqual(pair.to_client(), b"got 6\r\n")
        self.assertEqual(pair.counter.want_read, 2)
