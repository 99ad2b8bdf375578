"""
TCP connections that hand each write to the kernel at once.

Twisted's TCP transport only buffers a write: on its next turn the reactor
asks epoll to report the socket writable, sends, and asks epoll to stop
reporting it.  That is two ``epoll_ctl`` calls and one more event per write.
The SMTP server writes once per command it reads and the delivery client once
per phase of a transaction, so a relayed message paid 12 ``epoll_ctl`` calls
and 6 events for its writes (strace, 1 KB, STARTTLS).

Here a write with nothing buffered before it goes to ``send()`` at once, as
asyncio's transports do; what the kernel does not take is buffered and sent
by the reactor as before, behind anything already waiting.  Nothing else of
Twisted's transport changes: producers, ``loseConnection`` after the buffer
drains, STARTTLS (its TLS layer writes its records through the same path).
``send()`` never calls back into the protocol; an error is left for the
reactor's next write attempt to report, as a buffered write would.

Without the reactor gathering a turn's writes, two small writes in a row
would meet Nagle's algorithm, which holds the second until the peer's
delayed ACK (up to 40 ms): these connections set ``TCP_NODELAY``.

- ``eager_port(port)``: a listening TCP port's new connections are eager.
- ``EagerTCPClientEndpoint``: an outgoing connection to an IP address, eager
  on a real reactor (a test's ``MemoryReactor`` sees a plain ``connectTCP``).
- ``eager_hostname_endpoint``: the same for a host given by name.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import _newtls, abstract, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import implementer


def _send_now(connection: Any, data: bytes) -> None:
    """``FileDescriptor.write``, trying ``send()`` first when nothing is buffered."""
    if (
        data
        and connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnected
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    ):
        if not connection._nodelay:
            connection._nodelay = True
            try:
                connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP after all (a test's socket): Nagle only costs time
        sent = connection.writeSomeData(data)
        if isinstance(sent, int):  # else the connection is lost: buffered, the reactor finds out and closes it
            if sent == len(data):
                return
            data = data[sent:]
    abstract.FileDescriptor.write(connection, data)


class _EagerBypass(abstract.FileDescriptor):
    """
    What Twisted's TLS layer writes its records through after ``startTLS``
    (``_newtls`` calls these with the connection as ``self``); the rest is
    ``FileDescriptor``'s, as for Twisted's own bypass.
    """

    def write(self, data: bytes) -> None:
        _send_now(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        _send_now(self, b"".join(iovec))


class _Eager:
    """Mixed into Twisted's TCP transports before them."""

    TLS: bool
    _nodelay = False

    def write(self, data: bytes) -> None:
        if self.TLS:
            super().write(data)  # type: ignore[misc]  # into the TLS layer, which comes back through _EagerBypass
        else:
            _send_now(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS:
            super().writeSequence(iovec)  # type: ignore[misc]
        else:
            _send_now(self, b"".join(iovec))

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, _EagerBypass)


class EagerServer(_Eager, tcp.Server):
    """A server-side TCP connection whose writes are sent at once."""


class EagerClient(_Eager, tcp.Client):
    """A client-side TCP connection whose writes are sent at once."""


def eager_port(port: object) -> bool:
    """
    Make the connections a listening port accepts from now on eager.  Only a
    TCP port with Twisted's own server transport is changed (returns True);
    any other port is left alone.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer  # type: ignore[misc]  # tcp.Port's documented hook: the class it builds
        return True
    return False


class _EagerConnector(tcp.Connector):
    def _makeTransport(self) -> tcp.Client:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


@implementer(IReactorTime, IReactorPluggableNameResolver)
class _EagerConnecting:
    """
    The reactor as Twisted's client endpoints use it, making eager connections:
    ``connectTCP``, and for ``HostnameEndpoint`` the name resolver and the clock
    (its delay between attempts to a name's addresses).
    """

    def __init__(self, reactor: PosixReactorBase) -> None:
        self._reactor = reactor

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> tcp.Connector:
        connector = _EagerConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector

    @property
    def nameResolver(self) -> IHostnameResolver:
        return self._reactor.nameResolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        return self._reactor.installNameResolver(resolver)

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        return self._reactor.callLater(delay, callable, *args, **kw)

    def seconds(self) -> float:
        return self._reactor.seconds()

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self._reactor.getDelayedCalls()


@implementer(IStreamClientEndpoint)
class EagerTCPClientEndpoint:
    """``TCP4ClientEndpoint`` or ``TCP6ClientEndpoint`` (by the address) whose connection is eager."""

    def __init__(self, reactor: Any, ip: str, port: int, timeout: float = 30,
                 bindAddress: tuple[str, int] | None = None) -> None:
        if isinstance(reactor, PosixReactorBase):
            reactor = _EagerConnecting(reactor)
        kind = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        self._endpoint = kind(reactor, ip, port, timeout=timeout, bindAddress=bindAddress)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._endpoint.connect(protocolFactory)


def eager_hostname_endpoint(reactor: Any, host: str, port: int, timeout: float = 30,
                            bindAddress: tuple[str, int] | None = None) -> IStreamClientEndpoint:
    """``HostnameEndpoint`` (the system's resolver, an attempt per address) whose connection is eager."""
    if isinstance(reactor, PosixReactorBase):
        reactor = _EagerConnecting(reactor)
    return HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bindAddress)
