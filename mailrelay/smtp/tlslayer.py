"""
Twisted's TLS layer without its write batching, for the SMTP server.

Since Twisted 22.8 the TLS layer (``BufferingTLSTransport``) holds every
write for one reactor turn and encrypts what gathered then, which helps a
protocol that makes many small writes.  The server already makes one write
per chunk of input (all the replies that chunk produced), so holding it only
costs a timer, a callback and a later loop turn for every reply: measured with
callgrind, about 2.6% of the instructions per message (one process, STARTTLS,
1 KB messages).  Here each write is encrypted and handed to the socket at once.

The implicit-TLS listener builds its TLS factory itself and picks the
unbatched protocol class, Twisted's public ``TLSMemoryBIOProtocol``.  For
STARTTLS, Twisted builds the layer inside ``transport.startTLS``;
``write_through`` then undoes the batching on that one connection the same
way Twisted set it up (it assigned the batcher's ``write`` to the instance).
A Twisted without that attribute is left as it is: batching is a cost, not an
error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol


class DirectTLSFactory(TLSMemoryBIOFactory):
    """A ``TLSMemoryBIOFactory`` whose connections encrypt each write at once."""

    protocol = TLSMemoryBIOProtocol


def write_through(transport: Any) -> bool:
    """
    After ``transport.startTLS(...)``: make its TLS layer encrypt each write
    at once.  Returns whether it did (False on a transport without Twisted's
    batching layer, e.g. a test's).
    """
    layer = getattr(transport, "protocol", None)
    if not isinstance(layer, TLSMemoryBIOProtocol) or "write" not in vars(layer):
        return False

    def write(data: bytes) -> None:
        TLSMemoryBIOProtocol.write(layer, data)

    def write_sequence(iovec: Iterable[bytes]) -> None:
        TLSMemoryBIOProtocol.writeSequence(layer, iovec)

    layer.write = write  # type: ignore[method-assign]
    layer.writeSequence = write_sequence  # type: ignore[method-assign]
    return True
