"""Tests for mailrelay.delivery.mx: MX resolution over a fake network, then the loopback test DNS server."""

from __future__ import annotations

import random
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailrelay.delivery.model import (
    Credentials,
    Destination,
    MXHost,
    PermanentDestinationError,
    TemporaryDestinationError,
    TLSPolicy,
)
from mailrelay.delivery.mx import (
    MXResolver,
    SmarthostResolver,
    _UDPQuery,
    parse_hostport,
    smarthost_destination,
    system_nameservers,
)
from tests.support.dns_server import Zone, answer, start_dns_server

NS = ("192.0.2.53", 53)
NS2 = ("192.0.2.54", 53)


class _UDPPort:
    def __init__(self, reactor: FakeDNSReactor, protocol: Any) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.listening = True

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.reactor.udp_queries.append((dns.message.from_wire(data), addr))
        if addr in self.reactor.dead:
            return
        reply = answer(self.reactor.zone, data)
        if reply is not None:
            self.reactor.pending.append((self, reply, addr))
            if self.reactor.auto:
                self.reactor.deliver()

    def stopListening(self) -> None:
        self.listening = False
        self.reactor.open_ports -= 1

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", 5353)


class _TCPTransport(StringTransport):
    def __init__(self, reactor: FakeDNSReactor, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.reactor = reactor
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        super().write(data)
        wire = data[2:]
        reply = answer(self.reactor.zone, wire, tcp=True)
        if reply is not None:
            self.protocol.dataReceived(len(reply).to_bytes(2, "big") + reply)


@implementer(IReactorUDP)
class FakeDNSReactor(MemoryReactorClock):
    """UDP and TCP to name servers answered from a zone dict by the test server's own logic."""

    def __init__(self, zone: Zone) -> None:
        super().__init__()
        self.zone = zone
        self.udp_queries: list[tuple[dns.message.Message, tuple[str, int]]] = []
        self.tcp_connects: list[tuple[str, int]] = []
        self.dead: set[tuple[str, int]] = set()
        self.pending: list[tuple[_UDPPort, bytes, tuple[str, int]]] = []
        self.auto = True
        self.open_ports = 0

    def deliver(self) -> None:
        pending, self.pending = self.pending, []
        for port, reply, addr in pending:
            if port.listening:
                port.protocol.datagramReceived(reply, addr)

    def listenUDP(  # type: ignore[override]
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> _UDPPort:
        udp = _UDPPort(self, protocol)
        self.open_ports += 1
        protocol.makeConnection(udp)
        return udp

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        self.tcp_connects.append((host, port))
        peer = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(peer)
        transport = _TCPTransport(self, peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return None

    def qnames(self) -> list[tuple[str, str]]:
        return [
            (m.question[0].name.to_text(omit_final_dot=True), dns.rdatatype.to_text(m.question[0].rdtype))
            for m, _ in self.udp_queries
        ]


class _Reverse(random.Random):
    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        x.reverse()


ZONE: Zone = {
    "example.com": {"MX": [(20, "mx2.example.com"), (10, "mx1.example.com")], "TXT": ["v=spf1 -all"]},
    "mx1.example.com": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"], "TTL": 60},
    "mx2.example.com": {"A": ["192.0.2.2"]},
    "equal.example": {"MX": [(10, "a.equal.example"), (10, "b.equal.example"), (10, "c.equal.example")]},
    "a.equal.example": {"A": ["192.0.2.11"]},
    "b.equal.example": {"A": ["192.0.2.12"]},
    "c.equal.example": {"A": ["192.0.2.13"]},
    "implicit.example": {"A": ["192.0.2.20"], "AAAA": ["2001:db8::20"]},
    "nullmx.example": {"MX": [(0, ".")]},
    "broken.example": "SERVFAIL",
    "slow.example": "TIMEOUT",
    "alias.example": {"CNAME": "example.com"},
    "noaddr.example": {"MX": [(10, "ghost.noaddr.example"), (20, "mx1.example.com")]},
    "allghost.example": {"MX": [(10, "ghost.noaddr.example")]},
    "halfbroken.example": {"MX": [(10, "broken.example")]},
    "big.example": {"MX": [(10, "mx1.example.com")], "TRUNCATE": True},
    "zero.example": {"MX": [(10, "mx2.example.com")], "TTL": 0},
    "long.example": {"MX": [(10, "mx2.example.com")], "TTL": 10**7},
    "empty.example": {"TXT": ["nothing else"]},
}


class MXResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeDNSReactor(dict(ZONE))
        self.resolver = MXResolver(self.reactor, [NS], self.reactor, timeout=2.0, rng=random.Random(1))

    def resolve(self, domain: str) -> Destination:
        result: Destination = self.successResultOf(self.resolver.resolve(domain))
        return result

    def resolve_error(self, domain: str, kind: type[Exception]) -> Any:
        return self.failureResultOf(self.resolver.resolve(domain), kind).value

    def test_preference_order(self) -> None:
        """Hosts come lowest preference first, each with its IPv4 then IPv6 addresses, on port 25."""
        dest = self.resolve("example.com")
        self.assertEqual(dest.kind, "mx")
        self.assertEqual(
            dest.hosts,
            (
                MXHost("mx1.example.com", 10, ("192.0.2.1", "2001:db8::1"), 25),
                MXHost("mx2.example.com", 20, ("192.0.2.2",), 25),
            ),
        )

    def test_equal_preference_shuffled_by_rng(self) -> None:
        """Hosts of equal preference are shuffled with the injected RNG."""
        resolver = MXResolver(self.reactor, [NS], self.reactor, rng=_Reverse())
        dest = self.successResultOf(resolver.resolve("equal.example"))
        self.assertEqual([h.name for h in dest.hosts], ["c.equal.example", "b.equal.example", "a.equal.example"])
        orders = set()
        for seed in range(20):
            r = MXResolver(self.reactor, [NS], self.reactor, rng=random.Random(seed))
            orders.add(tuple(h.name for h in self.successResultOf(r.resolve("equal.example")).hosts))
        self.assertGreater(len(orders), 1)

    def test_implicit_mx(self) -> None:
        """No MX records: the domain's own A and AAAA addresses are the host (RFC 5321 §5.1)."""
        dest = self.resolve("implicit.example")
        self.assertEqual(dest.kind, "implicit")
        self.assertEqual(dest.hosts, (MXHost("implicit.example", 0, ("192.0.2.20", "2001:db8::20")),))

    def test_no_mx_no_address(self) -> None:
        """A domain with neither MX nor address records is a permanent failure."""
        error = self.resolve_error("empty.example", PermanentDestinationError)
        self.assertEqual((error.reply.code, error.reply.status), (550, "5.1.2"))

    def test_null_mx(self) -> None:
        """A single "0 ." MX is a permanent 556 5.1.10 failure (RFC 7505), with no address lookups."""
        error = self.resolve_error("nullmx.example", PermanentDestinationError)
        self.assertEqual((error.reply.code, error.reply.status), (556, "5.1.10"))
        self.assertTrue(error.permanent)
        self.assertEqual(self.reactor.qnames(), [("nullmx.example", "MX")])

    def test_nxdomain(self) -> None:
        """NXDOMAIN is a permanent 550 5.1.2 failure."""
        error = self.resolve_error("nowhere.example", PermanentDestinationError)
        self.assertEqual((error.reply.code, error.reply.status), (550, "5.1.2"))
        self.assertIn("nowhere.example", str(error.reply))

    def test_servfail_is_temporary(self) -> None:
        """SERVFAIL is a temporary 451 4.4.3 failure."""
        error = self.resolve_error("broken.example", TemporaryDestinationError)
        self.assertEqual((error.reply.code, error.reply.status), (451, "4.4.3"))
        self.assertFalse(error.permanent)
        self.assertIn("SERVFAIL", str(error.reply))

    def test_timeout_is_temporary(self) -> None:
        """No answer: retried ``attempts`` times, each after ``timeout``, then a temporary failure."""
        d = self.resolver.resolve("slow.example")
        self.assertNoResult(d)
        self.reactor.advance(2.0)
        self.assertNoResult(d)
        self.assertEqual(len(self.reactor.udp_queries), 2)
        self.reactor.advance(2.0)
        error = self.failureResultOf(d, TemporaryDestinationError).value
        self.assertIn("timed out", str(error.reply))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.open_ports, 0)

    def test_next_nameserver(self) -> None:
        """A name server that does not answer is skipped for the next one."""
        self.reactor.dead.add(NS)
        resolver = MXResolver(self.reactor, [NS, NS2], self.reactor, timeout=1.0)
        d = resolver.resolve("mx2.example.com")
        self.reactor.advance(1.0)  # MX: first server silent, second answers (no MX)
        self.reactor.advance(1.0)  # A and AAAA: the same
        dest = self.successResultOf(d)
        self.assertEqual(dest.hosts[0].addresses, ("192.0.2.2",))
        self.assertEqual(self.reactor.udp_queries[0][1], NS)
        self.assertEqual(self.reactor.udp_queries[1][1], NS2)

    def test_cache_honours_ttl(self) -> None:
        """Answers are cached per record set for their TTL: only expired sets are asked again."""
        self.resolve("example.com")
        sent = len(self.reactor.udp_queries)
        self.resolve("example.com")
        self.assertEqual(len(self.reactor.udp_queries), sent)
        self.reactor.advance(61)  # mx1's records (TTL 60) expire, the MX set (300) does not
        self.resolve("example.com")
        again = self.reactor.qnames()[sent:]
        self.assertIn(("mx1.example.com", "A"), again)
        self.assertNotIn(("example.com", "MX"), again)
        self.assertNotIn(("mx2.example.com", "A"), again)
        self.reactor.advance(300)
        self.resolve("example.com")
        self.assertIn(("example.com", "MX"), self.reactor.qnames()[sent + 2 :])

    def test_ttl_clamped(self) -> None:
        """TTL 0 is cached for min_ttl; a huge TTL for at most max_ttl."""
        resolver = MXResolver(self.reactor, [NS], self.reactor, min_ttl=5, max_ttl=100)
        self.successResultOf(resolver.resolve("zero.example"))
        self.successResultOf(resolver.resolve("long.example"))
        sent = len(self.reactor.udp_queries)
        self.reactor.advance(4)
        self.successResultOf(resolver.resolve("zero.example"))
        self.assertEqual(len(self.reactor.udp_queries), sent)
        self.reactor.advance(2)
        self.successResultOf(resolver.resolve("zero.example"))
        self.assertIn(("zero.example", "MX"), self.reactor.qnames()[sent:])
        sent = len(self.reactor.udp_queries)
        self.reactor.advance(100)
        self.successResultOf(resolver.resolve("long.example"))
        self.assertIn(("long.example", "MX"), self.reactor.qnames()[sent:])

    def test_negative_cache_is_short(self) -> None:
        """NXDOMAIN is cached for the SOA minimum (30 s here), then asked again."""
        self.resolve_error("nowhere.example", PermanentDestinationError)
        self.resolve_error("nowhere.example", PermanentDestinationError)
        self.assertEqual(len(self.reactor.udp_queries), 1)
        self.reactor.advance(31)
        self.resolve_error("nowhere.example", PermanentDestinationError)
        self.assertEqual(len(self.reactor.udp_queries), 2)

    def test_failures_not_cached(self) -> None:
        """A SERVFAIL is asked again on the next resolve."""
        self.resolve_error("broken.example", TemporaryDestinationError)
        sent = len(self.reactor.udp_queries)
        self.resolve_error("broken.example", TemporaryDestinationError)
        self.assertGreater(len(self.reactor.udp_queries), sent)

    def test_concurrent_lookups_share_a_query(self) -> None:
        """Two resolves of one domain in flight send one query per record set."""
        self.reactor.auto = False
        d1 = self.resolver.resolve("mx2.example.com")
        d2 = self.resolver.resolve("mx2.example.com")
        self.assertEqual(len(self.reactor.udp_queries), 1)
        self.reactor.deliver()
        self.reactor.deliver()
        self.reactor.deliver()
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))

    def test_truncated_answer_retried_over_tcp(self) -> None:
        """A UDP answer with TC set is asked again over TCP, and the TCP answer is used."""
        dest = self.resolve("big.example")
        self.assertEqual(self.reactor.tcp_connects, [NS])
        self.assertEqual(dest.hosts[0].name, "mx1.example.com")

    def test_cname_followed(self) -> None:
        """An MX answer reached through a CNAME is used."""
        dest = self.resolve("alias.example")
        self.assertEqual([h.name for h in dest.hosts], ["mx1.example.com", "mx2.example.com"])

    def test_host_without_address_skipped(self) -> None:
        """An MX host whose name does not resolve is left out; the others stay."""
        dest = self.resolve("noaddr.example")
        self.assertEqual([h.name for h in dest.hosts], ["mx1.example.com"])

    def test_no_host_with_address(self) -> None:
        """If no MX host has an address: permanent 5.4.4; temporary when a lookup failed temporarily."""
        error = self.resolve_error("allghost.example", PermanentDestinationError)
        self.assertEqual(error.reply.status, "5.4.4")
        self.resolve_error("halfbroken.example", TemporaryDestinationError)

    def test_domain_literal(self) -> None:
        """A domain literal goes to its address, without DNS."""
        dest = self.resolve("[192.0.2.9]")
        self.assertEqual((dest.kind, dest.hosts[0].addresses), ("literal", ("192.0.2.9",)))
        dest = self.resolve("[IPv6:2001:db8::9]")
        self.assertEqual(dest.hosts[0].addresses, ("2001:db8::9",))
        self.assertEqual(self.reactor.udp_queries, [])

    def test_port_override(self) -> None:
        """``port`` replaces 25 on every host (tests point MX delivery at a sink)."""
        resolver = MXResolver(self.reactor, [NS], self.reactor, port=2525)
        dest = self.successResultOf(resolver.resolve("example.com"))
        self.assertEqual({h.port for h in dest.hosts}, {2525})

    def test_ipv6_off(self) -> None:
        """With ipv6=False no AAAA is asked and no IPv6 address is given."""
        resolver = MXResolver(self.reactor, [NS], self.reactor, ipv6=False)
        dest = self.successResultOf(resolver.resolve("example.com"))
        self.assertEqual(dest.hosts[0].addresses, ("192.0.2.1",))
        self.assertNotIn("AAAA", [t for _, t in self.reactor.qnames()])

    def test_bad_domain(self) -> None:
        """A name DNS cannot hold is a permanent failure without a query."""
        self.resolve_error("a" * 70 + ".example", PermanentDestinationError)
        self.assertEqual(self.reactor.udp_queries, [])


class UDPQueryTests(SynchronousTestCase):
    def test_spoofed_answers_ignored(self) -> None:
        """Only a matching answer from the queried server fires: other sources and other ids are dropped."""
        query = dns.message.make_query("example.com", "MX")
        from twisted.internet.defer import Deferred

        done: Deferred[Any] = Deferred()
        proto = _UDPQuery(query, NS, done)
        good = answer(ZONE, query.to_wire())
        assert good is not None
        proto.datagramReceived(good, ("198.51.100.1", 53))
        other = dns.message.make_query("example.com", "MX")
        other.id = (query.id + 1) % 65536
        bad_id = answer(ZONE, other.to_wire())
        assert bad_id is not None
        proto.datagramReceived(bad_id, NS)
        proto.datagramReceived(b"garbage", NS)
        self.assertNoResult(done)
        proto.datagramReceived(good, NS)
        self.assertEqual(self.successResultOf(done).id, query.id)


class SmarthostTests(SynchronousTestCase):
    def test_parse_hostport(self) -> None:
        """host, host:port and [IPv6]:port are understood; nonsense is refused."""
        self.assertEqual(parse_hostport("Relay.Example.com:587"), ("relay.example.com", 587))
        self.assertEqual(parse_hostport("relay.example.com"), ("relay.example.com", 25))
        self.assertEqual(parse_hostport("[2001:db8::1]:2525"), ("2001:db8::1", 2525))
        for bad in ("", "host:x", "host:0", "host:70000"):
            self.assertRaises(ValueError, parse_hostport, bad)

    def test_smarthost_destination(self) -> None:
        """A smarthost is a Destination of one host with its TLS policy and credentials; IPs need no DNS."""
        creds = Credentials("user", "secret")
        dest = smarthost_destination("192.0.2.7:587", tls=TLSPolicy("verify"), credentials=creds)
        self.assertEqual(dest.kind, "smarthost")
        self.assertEqual(dest.hosts, (MXHost("192.0.2.7", 0, ("192.0.2.7",), 587),))
        self.assertEqual(dest.credentials, creds)
        self.assertNotIn("secret", repr(dest))
        named = smarthost_destination("relay.example.com:2525")
        self.assertEqual(named.hosts[0].addresses, ())

    def test_smarthost_resolver(self) -> None:
        """SmarthostResolver answers every domain with the smarthost."""
        resolver = SmarthostResolver(smarthost_destination("relay.example.com"))
        dest = self.successResultOf(resolver.resolve("Example.ORG."))
        self.assertEqual((dest.domain, dest.hosts[0].name), ("example.org", "relay.example.com"))
        self.assertIs(self.successResultOf(resolver.resolve("Example.ORG.")), dest)  # made once per domain
        other = self.successResultOf(resolver.resolve("example.net"))
        self.assertEqual((other.domain, other.hosts), ("example.net", dest.hosts))

    def test_system_nameservers(self) -> None:
        """Name servers come from resolv.conf as (address, port) pairs."""
        servers = system_nameservers()
        self.assertTrue(servers)
        self.assertTrue(all(isinstance(h, str) and isinstance(p, int) for h, p in servers))


class DNSServerTests(TestCase):
    """The support DNS server itself, on loopback sockets."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.zone: Zone = dict(ZONE)
        self.zone["mx1.example.com"] = {"A": ["127.0.0.1"], "AAAA": ["::1"]}
        self.port, stop = start_dns_server(reactor, self.zone)
        self.addCleanup(stop)

    async def test_resolve_over_loopback(self) -> None:
        """MXResolver resolves MX, null MX and NXDOMAIN against the server over real UDP."""
        resolver = MXResolver(self.reactor, [("127.0.0.1", self.port)], timeout=2.0)
        dest = await resolver.resolve("example.com")
        self.assertEqual(dest.hosts[0].addresses, ("127.0.0.1", "::1"))
        with self.assertRaises(PermanentDestinationError):
            await resolver.resolve("nullmx.example")
        with self.assertRaises(PermanentDestinationError):
            await resolver.resolve("nowhere.example")

    async def test_tcp_fallback_over_loopback(self) -> None:
        """A truncated UDP answer is fetched again over the server's TCP port."""
        resolver = MXResolver(self.reactor, [("127.0.0.1", self.port)], timeout=2.0)
        dest = await resolver.resolve("big.example")
        self.assertEqual(dest.hosts[0].name, "mx1.example.com")

    async def test_txt_records_and_live_zone(self) -> None:
        """TXT records are served, and a change to the zone dict shows in the next answer."""
        self.zone["_verify.example.com"] = {"TXT": ["mailrelay-verification=abc123"]}
        query = dns.message.make_query("_verify.example.com", "TXT")
        response = await deferToThread(dns.query.udp, query, "127.0.0.1", timeout=2, port=self.port)
        texts = [b"".join(r.strings) for rrset in response.answer for r in rrset]
        self.assertEqual(texts, [b"mailrelay-verification=abc123"])
        tcp = await deferToThread(dns.query.tcp, query, "127.0.0.1", timeout=2, port=self.port)
        self.assertEqual(len(tcp.answer), 1)
