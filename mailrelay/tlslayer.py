"""
Twisted's TLS layer, made cheaper for the SMTP server and the delivery
client in two ways.

*No write batching.*  Since Twisted 22.8 the TLS layer
(``BufferingTLSTransport``) holds every write for one reactor turn and
encrypts what gathered then, which helps a protocol that makes many small
writes.  The server already makes one write per chunk of input (all the
replies that chunk produced), and the delivery client one per group of
pipelined commands or body chunk, so holding it only costs a timer, a
callback and a later loop turn for every write: measured with callgrind on
the server, about 2.6% of the instructions per message (one process,
STARTTLS, 1 KB messages).  Here each write is encrypted and handed to the
socket at once.

*No exception to learn that nothing is left.*  After feeding received bytes
to OpenSSL, Twisted calls ``recv`` until it raises ``WantReadError``, then
``bio_read`` for anything OpenSSL wants to send, which raises the same when
there is nothing: two exceptions (with their tracebacks, through pyOpenSSL)
for every chunk the peer sends, about 8 per message the server receives.
Here the layer asks OpenSSL's memory buffers how many bytes they hold (a
tenth of the cost of one exception) and stops when both are empty.  That
reads two private attributes of pyOpenSSL's ``Connection``; a pyOpenSSL
without them gets Twisted's own loop, as does everything but the common
case (the handshake, writes waiting for it, the end of the connection).

The implicit-TLS listener builds its TLS factory itself and picks
``DirectTLSProtocol``.  For STARTTLS (the server's, and the delivery
client's towards an MX host), Twisted builds the layer inside
``transport.startTLS``; ``write_through`` then changes that one connection
the same way Twisted set it up (it assigned the batcher's ``write`` to the
instance).  A Twisted without that attribute is left as it is: batching is a
cost, not an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _NULL = _ffi.NULL
    _mem_data: Any = _lib.BIO_get_mem_data  # on a memory BIO: how many bytes it holds
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    _mem_data = None

#: The most plaintext one ``recv`` returns (a TLS record holds at most 16 KiB).
_RECV_SIZE = 2**15


def _memory_bios(layer: TLSMemoryBIOProtocol) -> tuple[Any, Any] | None:
    """The connection's incoming and outgoing memory BIOs, or None where they cannot be read."""
    conn = layer._tlsConnection
    into = getattr(conn, "_into_ssl", None)
    out = getattr(conn, "_from_ssl", None)
    if _mem_data is None or into is None or out is None:
        return None
    return into, out


def receive(layer: TLSMemoryBIOProtocol, data: bytes) -> None:
    """
    ``layer.dataReceived``: Twisted's, except that once the handshake is
    done it decrypts only while OpenSSL holds bytes it has not read, and
    flushes only when OpenSSL has bytes to send.
    """
    bios = None
    if layer._handshakeDone and not layer._appSendBuffer and not layer._lostTLSConnection:
        bios = _memory_bios(layer)
    if bios is None:
        TLSMemoryBIOProtocol.dataReceived(layer, data)
        return
    into, out = bios
    conn = layer._tlsConnection
    conn.bio_write(data)
    while not layer._lostTLSConnection and (_mem_data(into, _NULL) or conn.pending()):
        try:
            plain = conn.recv(_RECV_SIZE)
        except WantReadError:
            break  # part of a record: the rest is still on its way
        except ZeroReturnError:
            # The peer closed TLS (close_notify): answer it, then close.
            layer._shutdownTLS()
            layer._tlsShutdownFinished(None)
        except Error:
            layer._tlsShutdownFinished(Failure())
        else:
            if not layer._aborted:
                ProtocolWrapper.dataReceived(layer, plain)
    if layer._tlsConnection is not None and _mem_data(out, _NULL):
        layer._flushSendBIO()  # e.g. an alert, or an answer to a key update


class DirectTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's unbatched TLS layer, reading received bytes as ``receive`` does."""

    def dataReceived(self, data: bytes) -> None:
        receive(self, data)


class DirectTLSFactory(TLSMemoryBIOFactory):
    """A ``TLSMemoryBIOFactory`` whose connections encrypt each write at once."""

    protocol = DirectTLSProtocol


def write_through(transport: Any) -> bool:
    """
    After ``transport.startTLS(...)``: make its TLS layer encrypt each write
    at once and read as ``receive`` does.  Returns whether it did (False on a
    transport without Twisted's batching layer, e.g. a test's).
    """
    layer = getattr(transport, "protocol", None)
    if not isinstance(layer, TLSMemoryBIOProtocol) or "write" not in vars(layer):
        return False

    def write(data: bytes) -> None:
        TLSMemoryBIOProtocol.write(layer, data)

    def write_sequence(iovec: Iterable[bytes]) -> None:
        TLSMemoryBIOProtocol.writeSequence(layer, iovec)

    def data_received(data: bytes) -> None:
        receive(layer, data)

    layer.write = write  # type: ignore[method-assign]
    layer.writeSequence = write_sequence  # type: ignore[method-assign]
    layer.dataReceived = data_received  # type: ignore[method-assign]
    return True
