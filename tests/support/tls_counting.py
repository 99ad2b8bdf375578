"""A wrapper that counts the ``WantReadError``s a TLS connection raises (tests of the TLS layer)."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL


class CountingConnection:
    """Wraps an ``SSL.Connection`` (server or client): counts the ``WantReadError``s its reads raise."""

    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn
        self.want_read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def _counted(self, method: Any, size: int) -> bytes:
        try:
            return method(size)  # type: ignore[no-any-return]
        except SSL.WantReadError:
            self.want_read += 1
            raise

    def recv(self, size: int) -> bytes:
        return self._counted(self._conn.recv, size)

    def bio_read(self, size: int) -> bytes:
        return self._counted(self._conn.bio_read, size)
