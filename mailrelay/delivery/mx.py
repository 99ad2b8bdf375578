"""
Where mail for a domain goes: MX resolution (RFC 5321 §5.1, RFC 7505).

dnspython builds and parses the DNS messages; Twisted carries them (UDP from
a fresh random port per query, TCP when the answer is truncated), so a
lookup never blocks the reactor and tests drive time with a ``Clock``.
Answers are cached for their TTL (clamped), negative answers briefly, and
concurrent lookups of one name share one query.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.delivery.model import (
    Credentials,
    Destination,
    MXHost,
    PermanentDestinationError,
    TemporaryDestinationError,
    TLSPolicy,
)
from mailrelay.types import Reply

log = Logger()


class DNSTimeout(Exception):
    """No answer from a name server in time."""


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b


class _UDPQuery(DatagramProtocol):
    """Waits for the one datagram that answers ``query`` from ``server``; ignores the rest (spoofing)."""

    def __init__(self, query: dns.message.Message, server: tuple[str, int], done: Deferred[Any]) -> None:
        self.query = query
        self.server = server
        self.done = done

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.done.called or addr[1] != self.server[1] or not _same_address(addr[0], self.server[0]):
            return
        try:
            response = dns.message.from_wire(datagram)
        except dns.exception.DNSException:
            return
        if self.query.is_response(response):
            self.done.callback(response)


class _TCPQuery(Protocol):
    """One query over TCP, two-byte length prefix both ways (RFC 1035 §4.2.2)."""

    def __init__(self, query: dns.message.Message, done: Deferred[Any]) -> None:
        self.query = query
        self.done = done
        self._buffer = b""

    def connectionMade(self) -> None:
        wire = self.query.to_wire()
        self.transport.write(struct.pack("!H", len(wire)) + wire)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < 2:
            return
        (length,) = struct.unpack("!H", self._buffer[:2])
        if len(self._buffer) < 2 + length:
            return
        self.transport.loseConnection()  # type: ignore[union-attr]
        if self.done.called:
            return
        try:
            response = dns.message.from_wire(self._buffer[2 : 2 + length])
        except dns.exception.DNSException as e:
            self.done.errback(e)
            return
        if self.query.is_response(response):
            self.done.callback(response)
        else:
            self.done.errback(dns.exception.FormError("TCP answer does not match the query"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


class _OneShotFactory(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


@attrs.frozen
class _Answer:
    kind: Literal["ok", "nxdomain", "nodata"]
    records: tuple[Any, ...] = ()


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def system_nameservers() -> list[tuple[str, int]]:
    """Name servers from /etc/resolv.conf (read once, at start-up)."""
    try:
        resolver = dns.resolver.Resolver()
    except (dns.resolver.NoResolverConfiguration, OSError):
        return [("127.0.0.1", 53)]
    return [(str(ns), int(resolver.port)) for ns in resolver.nameservers] or [("127.0.0.1", 53)]


def _literal(domain: str) -> str | None:
    """The address in a domain literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


class MXResolver:
    """
    Resolves a mail domain to a ``Destination``: hosts in preference order
    (random among equal preferences, ``rng`` injectable), each with its IPv4
    then IPv6 addresses (IPv4 first: receivers judge IPv6 senders harder).

    ``resolve`` fails with ``PermanentDestinationError`` (NXDOMAIN, null MX,
    no address at all) or ``TemporaryDestinationError`` (SERVFAIL,
    timeouts).  ``port`` overrides the SMTP port of every host (tests).
    """

    def __init__(
        self,
        reactor: IReactorUDP,
        nameservers: Sequence[tuple[str, int]] | None = None,
        clock: IReactorTime | None = None,
        timeout: float = 3.0,
        rng: random.Random | None = None,
        *,
        attempts: int = 2,
        port: int = 25,
        ipv6: bool = True,
        min_ttl: float = 5.0,
        max_ttl: float = 3600.0,
        max_negative_ttl: float = 60.0,
        max_hosts: int = 10,
        max_cache_entries: int = 50_000,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.nameservers = list(nameservers) if nameservers is not None else system_nameservers()
        self._timeout = timeout
        self._rng = rng or random.Random()
        self._attempts = attempts
        self._port = port
        self._ipv6 = ipv6
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._max_negative_ttl = max_negative_ttl
        self._max_hosts = max_hosts
        self._max_cache_entries = max_cache_entries
        self._cache: dict[tuple[str, int], tuple[float, _Answer]] = {}
        self._inflight: dict[tuple[str, int], list[Deferred[_Answer]]] = {}
        self.queries_sent = 0

    # -- public -------------------------------------------------------------

    def resolve(self, domain: str) -> Deferred[Destination]:
        """The ``Destination`` for mail to ``domain``."""
        return Deferred.fromCoroutine(self._resolve(domain))

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- resolution ---------------------------------------------------------

    async def _resolve(self, domain: str) -> Destination:
        domain = domain.strip().rstrip(".").lower()
        literal = _literal(domain)
        if literal is not None:
            return Destination(domain, (MXHost(literal, 0, (literal,), self._port),), kind="literal")
        try:
            dns.name.from_text(domain)
        except dns.exception.DNSException:
            raise PermanentDestinationError(Reply(553, "5.1.2", f"Bad destination domain {domain!r}"))
        mx = await self._lookup(domain, dns.rdatatype.MX)
        if mx.kind == "nxdomain":
            raise PermanentDestinationError(
                Reply(
                    550,
                    "5.1.2",
                    f"Host or domain name not found. Name service error for name={domain} type=MX: Host not found",
                )
            )
        if mx.kind == "nodata":
            # RFC 5321 §5.1: no MX, so the domain itself is the host.
            addresses = await self._addresses(domain)
            if not addresses:
                raise PermanentDestinationError(
                    Reply(550, "5.1.2", f"Domain {domain} has no MX and no address records")
                )
            return Destination(domain, (MXHost(domain, 0, addresses, self._port),), kind="implicit")
        return await self._mx_destination(domain, mx.records)

    async def _mx_destination(self, domain: str, records: tuple[Any, ...]) -> Destination:
        real = [r for r in records if r.exchange != dns.name.root]
        if not real:
            # RFC 7505: "0 ." says the domain accepts no mail at all.
            raise PermanentDestinationError(
                Reply(556, "5.1.10", f"Recipient address rejected: {domain} has a null MX (accepts no mail)")
            )
        by_preference: dict[int, list[str]] = {}
        for r in real:
            name = r.exchange.to_text(omit_final_dot=True).lower()
            names = by_preference.setdefault(int(r.preference), [])
            if name not in names:
                names.append(name)
        ordered: list[tuple[int, str]] = []
        for preference in sorted(by_preference):
            names = sorted(by_preference[preference])
            self._rng.shuffle(names)
            ordered.extend((preference, n) for n in names)
        ordered = ordered[: self._max_hosts]
        lookups = [Deferred.fromCoroutine(self._addresses(name)) for _, name in ordered]
        hosts = []
        temporary: TemporaryDestinationError | None = None
        for (preference, name), lookup in zip(ordered, lookups, strict=True):
            try:
                addresses = await lookup
            except TemporaryDestinationError as e:
                temporary = e
                continue
            if addresses:
                hosts.append(MXHost(name, preference, addresses, self._port))
        if hosts:
            return Destination(domain, tuple(hosts), kind="mx")
        if temporary is not None:
            raise temporary
        raise PermanentDestinationError(Reply(550, "5.4.4", f"No address found for the MX hosts of {domain}"))

    async def _addresses(self, name: str) -> tuple[str, ...]:
        """A then AAAA addresses of ``name``; a temporary error only if no family answered."""
        types = [dns.rdatatype.A] + ([dns.rdatatype.AAAA] if self._ipv6 else [])
        lookups = [self._lookup(name, t) for t in types]
        addresses: list[str] = []
        error: TemporaryDestinationError | None = None
        answered = False
        for lookup in lookups:
            try:
                answer = await lookup
            except TemporaryDestinationError as e:
                error = e
                continue
            answered = True
            addresses.extend(r.address for r in answer.records)
        if not answered and error is not None:
            raise error
        return tuple(dict.fromkeys(addresses))

    # -- cache --------------------------------------------------------------

    def _lookup(self, name: str, rdtype: int) -> Deferred[_Answer]:
        key = (name.lower(), int(rdtype))
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return succeed(cached[1])
            del self._cache[key]
        if key in self._inflight:
            waiter: Deferred[_Answer] = Deferred()
            self._inflight[key].append(waiter)
            return waiter
        self._inflight[key] = []

        def share(result: _Answer | Failure) -> _Answer | Failure:
            for waiter in self._inflight.pop(key, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return Deferred.fromCoroutine(self._fetch(key)).addBoth(share)

    def _store(self, key: tuple[str, int], answer: _Answer, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._cache) >= self._max_cache_entries:
            now = self._clock.seconds()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._max_cache_entries:
                self._cache.clear()
        self._cache[key] = (self._clock.seconds() + ttl, answer)

    async def _fetch(self, key: tuple[str, int]) -> _Answer:
        name, rdtype = key
        response = await self._exchange(name, rdtype)
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            answer = _Answer("nxdomain")
            self._store(key, answer, self._negative_ttl(response))
            return answer
        records = tuple(rd for rrset in response.answer if rrset.rdtype == rdtype for rd in rrset)
        if not records:
            answer = _Answer("nodata")
            self._store(key, answer, self._negative_ttl(response))
            return answer
        ttl = min(rrset.ttl for rrset in response.answer)
        answer = _Answer("ok", records)
        self._store(key, answer, _clamp(ttl, self._min_ttl, self._max_ttl))
        return answer

    def _negative_ttl(self, response: dns.message.Message) -> float:
        """RFC 2308: min(SOA TTL, SOA MINIMUM), kept short."""
        ttls = [
            min(rrset.ttl, rd.minimum)
            for rrset in response.authority
            if rrset.rdtype == dns.rdatatype.SOA
            for rd in rrset
        ]
        return _clamp(min(ttls) if ttls else self._max_negative_ttl, 0, self._max_negative_ttl)

    # -- transport ----------------------------------------------------------

    async def _exchange(self, name: str, rdtype: int) -> dns.message.Message:
        """Ask each name server in turn; NOERROR/NXDOMAIN is an answer, the rest is temporary."""
        query = dns.message.make_query(name, dns.rdatatype.RdataType.make(rdtype), use_edns=0, payload=1232)
        failure = "timed out"
        for _ in range(self._attempts):
            every_server_answered = True
            for server in self.nameservers:
                try:
                    response = await self._udp(query, server)
                    if response.flags & dns.flags.TC:
                        response = await self._tcp(query, server)
                except Exception as e:
                    every_server_answered = False
                    failure = "timed out" if isinstance(e, DNSTimeout) else str(e) or type(e).__name__
                    continue
                rcode = response.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return response
                failure = dns.rcode.to_text(rcode)
            if every_server_answered:
                break
        rdname = dns.rdatatype.to_text(rdtype)  # type: ignore[arg-type]
        raise TemporaryDestinationError(
            Reply(
                451,
                "4.4.3",
                f"Host or domain name not found. Name service error for name={name} type={rdname}: "
                f"Host not found, try again ({failure})",
            )
        )

    def _udp(self, query: dns.message.Message, server: tuple[str, int]) -> Deferred[dns.message.Message]:
        done: Deferred[dns.message.Message] = Deferred()
        protocol = _UDPQuery(query, server, done)
        interface = "::" if ":" in server[0] else ""
        port = self._reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=65535)
        self.queries_sent += 1

        def expire() -> None:
            if not done.called:
                done.errback(DNSTimeout(f"no answer from {server[0]}"))

        timer = self._clock.callLater(self._timeout, expire)

        def cleanup(result: object) -> object:
            if timer.active():
                timer.cancel()
            port.stopListening()
            return result

        done.addBoth(cleanup)
        try:
            protocol.transport.write(query.to_wire(), server)  # type: ignore[union-attr]
        except OSError as e:
            if not done.called:
                done.errback(e)
        return done

    def _tcp(self, query: dns.message.Message, server: tuple[str, int]) -> Deferred[dns.message.Message]:
        done: Deferred[dns.message.Message] = Deferred()
        protocol = _TCPQuery(query, done)
        endpoint_type = TCP6ClientEndpoint if ":" in server[0] else TCP4ClientEndpoint
        reactor: IReactorTCP = self._reactor  # type: ignore[assignment]
        endpoint = endpoint_type(reactor, server[0], server[1], timeout=self._timeout)
        self.queries_sent += 1
        connecting = endpoint.connect(_OneShotFactory(protocol))

        def not_connected(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        connecting.addErrback(not_connected)

        def expire() -> None:
            if done.called:
                return
            done.errback(DNSTimeout(f"no TCP answer from {server[0]}"))
            connecting.cancel()
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

        timer = self._clock.callLater(self._timeout, expire)

        def cleanup(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(cleanup)
        return done


def parse_hostport(spec: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port``, ``[2001:db8::1]:port`` -> (host, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, _, port = spec.partition(":")
    else:
        host, port = spec, ""
    if not host or (port and not port.isdigit()) or not 0 < int(port or default_port) < 65536:
        raise ValueError(f"not a host[:port]: {spec!r}")
    return host.rstrip(".").lower(), int(port or default_port)


def smarthost_destination(
    spec: str,
    domain: str = "",
    tls: TLSPolicy | None = None,
    credentials: Credentials | None = None,
    default_port: int = 25,
) -> Destination:
    """
    A ``Destination`` with the one host named by ``spec`` (``host:port``),
    instead of MX.  A name is resolved when connecting.
    """
    host, port = parse_hostport(spec, default_port)
    try:
        addresses: tuple[str, ...] = (str(ipaddress.ip_address(host)),)
    except ValueError:
        addresses = ()
    return Destination(
        domain,
        (MXHost(host, 0, addresses, port),),
        kind="smarthost",
        tls=tls,
        credentials=credentials,
    )


class SmarthostResolver:
    """Same shape as ``MXResolver``: every domain goes to one relay host."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._by_domain: dict[str, Destination] = {}

    def resolve(self, domain: str) -> Deferred[Destination]:
        found = self._by_domain.get(domain)
        if found is None:
            # One copy per recipient domain, kept: this runs for every message.
            if len(self._by_domain) >= 4096:
                self._by_domain.clear()
            found = self._by_domain[domain] = attrs.evolve(self.destination, domain=domain.rstrip(".").lower())
        return succeed(found)
