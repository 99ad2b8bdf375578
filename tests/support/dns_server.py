"""
A small authoritative DNS server for tests, on loopback UDP and TCP.

The zone is a plain dict read at every query, so a test may change it while
the server runs (``mailrelay domain verify`` tests add TXT records)::

    zone = {
        "example.com": {"MX": [(10, "mx1.example.com")], "TXT": ["v=spf1 -all"]},
        "mx1.example.com": {"A": ["127.0.0.1"], "AAAA": ["::1"], "TTL": 60},
        "nullmx.example": {"MX": [(0, ".")]},
        "alias.example": {"CNAME": "example.com"},
        "big.example": {"A": [...], "TRUNCATE": True},  # UDP answers set TC
        "broken.example": "SERVFAIL",
        "gone.example": "NXDOMAIN",  # so is any name not in the zone
        "slow.example": "TIMEOUT",  # never answered
    }
    port, stop = start_dns_server(reactor, zone)

``answer(zone, wire)`` is the same logic without sockets, for fakes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

Zone = dict[str, Any]


def _rdata_texts(rdtype: str, values: list[Any]) -> list[str]:
    if rdtype == "MX":
        return [f"{pref} {exchange.rstrip('.')}." if exchange != "." else f"{pref} ." for pref, exchange in values]
    if rdtype == "TXT":
        out = []
        for value in values:
            chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
            out.append(" ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks))
        return out
    if rdtype == "CNAME":
        return [f"{v.rstrip('.')}." for v in values]
    return [str(v) for v in values]


def answer(zone: Zone, wire: bytes, tcp: bool = False, negative_ttl: int = 30) -> bytes | None:
    """The wire answer to query ``wire`` from ``zone`` (None: stay silent)."""
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if not query.question:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = query.question[0]
    qname = question.name.to_text(omit_final_dot=True).lower()
    rdtype = dns.rdatatype.to_text(question.rdtype)
    soa = dns.rrset.from_text(
        dns.name.root, negative_ttl, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {negative_ttl}"
    )
    name = qname
    for _ in range(8):  # follow CNAMEs inside the zone
        entry = zone.get(name, "NXDOMAIN")
        if entry == "TIMEOUT":
            return None
        if entry == "SERVFAIL":
            response.answer = []
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if entry == "NXDOMAIN":
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(soa)
            break
        ttl = int(entry.get("TTL", 300))
        if "CNAME" in entry and rdtype != "CNAME":
            target = entry["CNAME"].rstrip(".").lower()
            response.answer.append(dns.rrset.from_text(f"{name}.", ttl, "IN", "CNAME", f"{target}."))
            name = target
            continue
        values = entry.get(rdtype)
        if values:
            response.answer.append(
                dns.rrset.from_text_list(f"{name}.", ttl, "IN", rdtype, _rdata_texts(rdtype, list(values)))
            )
        else:
            response.authority.append(soa)
        if not tcp and entry.get("TRUNCATE"):
            response.answer = []
            response.authority = []
            response.flags |= dns.flags.TC
        break
    limit = 65535 if tcp else max(512, query.payload if query.edns >= 0 else 512)
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer = []
        response.authority = []
        response.flags |= dns.flags.TC
        return response.to_wire()


class _UDPServer(DatagramProtocol):
    def __init__(self, zone: Zone, negative_ttl: int) -> None:
        self.zone = zone
        self.negative_ttl = negative_ttl

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        reply = answer(self.zone, datagram, tcp=False, negative_ttl=self.negative_ttl)
        if reply is not None:
            self.transport.write(reply, addr)  # type: ignore[union-attr]


class _TCPServer(Protocol):
    def __init__(self, zone: Zone, negative_ttl: int) -> None:
        self.zone = zone
        self.negative_ttl = negative_ttl
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 2:
            (length,) = struct.unpack("!H", self._buffer[:2])
            if len(self._buffer) < 2 + length:
                return
            wire, self._buffer = self._buffer[2 : 2 + length], self._buffer[2 + length :]
            reply = answer(self.zone, wire, tcp=True, negative_ttl=self.negative_ttl)
            if reply is not None:
                self.transport.write(struct.pack("!H", len(reply)) + reply)  # type: ignore[union-attr]


def start_dns_server(
    reactor: Any, zone: Zone, interface: str = "127.0.0.1", negative_ttl: int = 30
) -> tuple[int, Callable[[], Deferred[Any]]]:
    """
    Serve ``zone`` on ``interface``, UDP and TCP on the same free port.
    Returns ``(port, stop)``; ``stop()`` returns a Deferred.
    """
    factory = Factory.forProtocol(lambda: _TCPServer(zone, negative_ttl))
    for _ in range(50):
        udp = reactor.listenUDP(0, _UDPServer(zone, negative_ttl), interface=interface)
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface=interface)
        except CannotListenError:
            udp.stopListening()
            continue

        def stop(udp: Any = udp, tcp: Any = tcp) -> Deferred[Any]:
            return gatherResults([maybeDeferred(udp.stopListening), maybeDeferred(tcp.stopListening)])

        return port, stop
    raise CannotListenError(interface, 0, "no port free for both UDP and TCP")
