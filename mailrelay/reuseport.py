"""
``reusetcp:`` server endpoints: TCP listening sockets with ``SO_REUSEPORT``.

One mailrelay process uses one core.  Several processes, each with its own
data directory (spool, event buffer, control socket) and one shared
database, can listen on the same ports when their listeners say
``reusetcp:587:interface=0.0.0.0``: the kernel spreads new connections over
them.  Nothing else is shared, so a process may stop or crash without the
others noticing.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 128) -> None:
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            # The reactor takes its own copy of the descriptor; ours is closed below.
            port = self._reactor.adoptStreamPort(sock.fileno(), family, protocolFactory)
        except OSError as e:
            return fail(CannotListenError(self._interface, self._port, e))
        finally:
            sock.close()
        return succeed(port)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """``reusetcp:PORT[:interface=ADDRESS][:backlog=N]``, like ``tcp:`` plus ``SO_REUSEPORT``."""

    prefix = "reusetcp"

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> IStreamServerEndpoint:
        if len(args) != 1:
            raise ValueError("reusetcp: needs exactly one port, e.g. reusetcp:587:interface=0.0.0.0")
        interface = str(kwargs.pop("interface", "")).replace("\\:", ":")
        backlog = int(str(kwargs.pop("backlog", "128")))
        if kwargs:
            raise ValueError(f"reusetcp: unknown option {sorted(kwargs)[0]!r}")
        return ReusePortEndpoint(reactor, int(str(args[0])), interface, backlog)
