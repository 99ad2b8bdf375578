"""``reusetcp:`` endpoints: several processes (here: several listeners) share one port."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.config import ConfigError, parse_config
from mailrelay.reuseport import ReusePortEndpoint


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class ReusePortTests(TestCase):
    async def test_two_listeners_share_a_port(self) -> None:
        """Two reusetcp listeners bind the same port (as two relay processes do) and both accept."""
        port = free_port()
        desc = f"reusetcp:{port}:interface=127.0.0.1"
        first = await serverFromString(reactor, desc).listen(Factory.forProtocol(Protocol))
        self.addCleanup(first.stopListening)
        second = await serverFromString(reactor, desc).listen(Factory.forProtocol(Protocol))
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, second.getHost().port)

    async def test_plain_tcp_conflict(self) -> None:
        """A port held by a listener without SO_REUSEPORT is refused with CannotListenError."""
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        self.addCleanup(blocker.close)
        endpoint = ReusePortEndpoint(reactor, blocker.getsockname()[1], "127.0.0.1")
        with self.assertRaises(CannotListenError):
            await endpoint.listen(Factory.forProtocol(Protocol))


class ReusePortConfigTests(SynchronousTestCase):
    def test_config_accepts_and_checks(self) -> None:
        """reusetcp: is a valid listener in the config; a malformed one names the key."""
        from pathlib import Path

        config = parse_config({"listeners": {"submission": ["reusetcp:587:interface=0.0.0.0"]}}, "m.toml", Path("/"))
        self.assertEqual(config.listeners.submission, ("reusetcp:587:interface=0.0.0.0",))
        with self.assertRaises(ConfigError) as ctx:
            parse_config({"listeners": {"submission": ["reusetcp:587:colour=blue"]}}, "m.toml", Path("/"))
        self.assertIn("listeners.submission[0]: not a valid endpoint", str(ctx.exception))
        self.assertIsInstance(serverFromString(MemoryReactor(), "reusetcp:25"), ReusePortEndpoint)
