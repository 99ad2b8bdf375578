"""
Eager TCP connections (``mailrelay.eagertcp``) on the real reactor and loopback sockets: a write reaches the
kernel before the reactor turns, order and ``loseConnection`` hold when the kernel takes only part, and the
same goes for TLS records after STARTTLS.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.eagertcp import EagerClient, EagerServer, EagerTCPClientEndpoint, eager_hostname_endpoint, eager_port
from mailrelay.tlslayer import write_through
from tests.support.sink import make_tls


class Peer(Protocol):
    """Keeps what arrives; ``made`` fires on connect, ``closed`` on disconnect, ``until(n)`` at n bytes."""

    def __init__(self) -> None:
        self.made: Deferred[Peer] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.data = bytearray()
        self._wanted: tuple[int, Deferred[bytes]] | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self._wanted is not None and len(self.data) >= self._wanted[0]:
            d, self._wanted = self._wanted[1], None
            d.callback(bytes(self.data))

    def until(self, n: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._wanted = (n, d)
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class EagerTCPTests(TestCase):
    async def listen(self) -> tuple[Any, list[Peer]]:
        accepted: list[Peer] = []

        def build() -> Peer:
            peer = Peer()
            accepted.append(peer)
            return peer

        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory.forProtocol(build))
        self.addCleanup(port.stopListening)
        self.assertTrue(eager_port(port))
        return port, accepted

    async def test_server_write_reaches_the_kernel_at_once(self) -> None:
        """A write with nothing buffered is in the peer's socket before the reactor turns; Nagle is off."""
        port, accepted = await self.listen()
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        while not accepted:
            await deferLater(0.01)
        server = await accepted[0].made
        self.addCleanup(server.transport.abortConnection)  # type: ignore[union-attr]
        transport: Any = server.transport
        self.assertIsInstance(transport, EagerServer)
        transport.write(b"220 hello\r\n")
        self.assertEqual(transport._tempDataLen, 0)
        self.assertEqual(client.recv(100), b"220 hello\r\n")  # no reactor turn in between
        self.assertEqual(transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    async def test_order_and_close_when_the_kernel_takes_part(self) -> None:
        """What the kernel does not take is buffered; later writes go behind it; loseConnection waits for it."""
        port, accepted = await self.listen()
        client = await connectProtocol(EagerTCPClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Peer())
        server = await accepted[0].made
        transport: Any = server.transport
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers take at once
        transport.write(big)
        self.assertGreater(transport._tempDataLen, 0)
        transport.writeSequence([b"and ", b"the end"])
        transport.loseConnection()
        data = await client.until(len(big) + 11)
        self.assertEqual(data, big + b"and the end")
        await client.closed

    async def test_client_endpoint_connection_is_eager(self) -> None:
        """EagerTCPClientEndpoint's connection sends at once too."""
        port, accepted = await self.listen()
        client = await connectProtocol(EagerTCPClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Peer())
        transport: Any = client.transport
        self.addCleanup(transport.abortConnection)
        self.assertIsInstance(transport, EagerClient)
        transport.write(b"EHLO me\r\n")
        self.assertEqual(transport._tempDataLen, 0)
        server = await accepted[0].made
        self.assertEqual(await server.until(9), b"EHLO me\r\n")

    async def test_hostname_endpoint_connection_is_eager(self) -> None:
        """A host given by name (a smarthost) is resolved by the system and its connection sends at once too."""
        port, accepted = await self.listen()
        endpoint = eager_hostname_endpoint(reactor, "localhost", port.getHost().port, timeout=5)
        client = await connectProtocol(endpoint, Peer())
        transport: Any = client.transport
        self.addCleanup(transport.abortConnection)
        self.assertIsInstance(transport, EagerClient)
        self.assertEqual(transport.getPeer().host, "127.0.0.1")
        transport.write(b"EHLO me\r\n")
        self.assertEqual(transport._tempDataLen, 0)
        server = await accepted[0].made
        self.assertEqual(await server.until(9), b"EHLO me\r\n")

    async def test_tls_records_after_starttls_go_out_at_once(self) -> None:
        """After STARTTLS, the TLS layer's records take the eager path as well, in both directions."""
        tls = make_tls("relay.test")
        port, accepted = await self.listen()
        client = await connectProtocol(EagerTCPClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Peer())
        server = await accepted[0].made
        server_transport: Any = server.transport
        client_transport: Any = client.transport
        self.addCleanup(client_transport.abortConnection)
        server_transport.startTLS(tls.server_options)
        write_through(server_transport)
        client_transport.startTLS(optionsForClientTLS("relay.test", trustRoot=tls.trust_root))
        client_transport.write(b"hello over TLS")
        self.assertEqual(await server.until(14), b"hello over TLS")
        server_transport.write(b"250 ok")
        self.assertEqual(server_transport._tempDataLen, 0)  # the record went to the kernel, not the buffer
        self.assertEqual(await client.until(6), b"250 ok")


class EagerTCPFallbackTests(SynchronousTestCase):
    def test_memory_reactor_gets_a_plain_connect(self) -> None:
        """On a test's MemoryReactor the endpoint is Twisted's own: connectTCP with the same arguments."""
        memory = MemoryReactor()
        EagerTCPClientEndpoint(memory, "2001:db8::25", 25, timeout=7, bindAddress=("2001:db8::7", 0)).connect(
            Factory.forProtocol(Protocol)
        )
        host, port, _, timeout, bind = memory.tcpClients[0]
        self.assertEqual((host, port, timeout, bind), ("2001:db8::25", 25, 7, ("2001:db8::7", 0)))

    def test_memory_reactor_gets_twisted_hostname_endpoint(self) -> None:
        """On a test's MemoryReactor a name gets Twisted's HostnameEndpoint on that reactor, unchanged."""
        memory = MemoryReactor()
        endpoint = eager_hostname_endpoint(memory, "relay.example", 587, timeout=7)
        self.assertIsInstance(endpoint, HostnameEndpoint)
        self.assertIs(endpoint._reactor, memory)  # type: ignore[attr-defined]

    def test_other_ports_are_left_alone(self) -> None:
        """Only a TCP port with Twisted's server transport is changed."""

        class Other:
            transport = object

        self.assertFalse(eager_port(Other()))
        self.assertFalse(eager_port(MemoryReactor().listenTCP(0, Factory.forProtocol(Protocol))))


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds)
