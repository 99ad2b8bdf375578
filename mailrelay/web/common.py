"""
What every HTTP resource of the relay shares: the request class that caps
body sizes, the client address behind trusted proxies, security headers,
and running ``async`` handlers from twisted.web's synchronous ``render``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Default cap on any request body (the CSV import is the largest thing anyone sends).
DEFAULT_MAX_BODY = 10 * 1024 * 1024


class BodyTooLarge(Exception):
    """The request body is over the limit of the resource that reads it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class LimitedRequest(Request):
    """
    A ``Request`` that stops storing its body beyond ``max_body`` bytes.

    twisted.web buffers a whole body (in memory or a temporary file)
    before ``render`` runs, with no limit.  This keeps at most
    ``max_body + 1`` bytes, so a resource sees that the body was too large
    (``read_body`` raises ``BodyTooLarge``) without the relay having stored
    gigabytes first.
    """

    max_body = DEFAULT_MAX_BODY

    def gotLength(self, length: int | None) -> None:
        self._received = 0
        if length is not None and length > self.max_body:
            self.content = io.BytesIO()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        received = getattr(self, "_received", 0)
        room = self.max_body + 1 - received
        if room > 0 and self.content is not None:
            self.content.write(data[:room])
        self._received = received + len(data)


def limited_request_factory(max_body: int) -> type[LimitedRequest]:
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})


def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ``BodyTooLarge`` when it has more than ``limit`` bytes."""
    declared = request.getHeader(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    if getattr(request, "_received", 0) > limit:
        raise BodyTooLarge(limit)
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    if len(data) > limit:
        raise BodyTooLarge(limit)
    return data


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def client_ip(request: Request, trusted_proxies: Sequence[Network] = ()) -> str | None:
    """
    The client's address.  ``X-Forwarded-For`` is believed only when the
    peer is one of ``trusted_proxies`` (the operator's load balancer); then
    the right-most address that is not itself a trusted proxy is the
    client, since everything left of it can be forged by the client.
    """
    peer = getattr(request.getClientAddress(), "host", None)
    if peer is None or not trusted_proxies or not _in(peer, trusted_proxies):
        return peer
    header = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for", []))
    hops = [h.strip().decode("ascii", "replace") for h in header.split(b",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer


def _in(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def user_agent(request: Request) -> str:
    value = request.getHeader(b"user-agent")
    return header_text(value)[:500] if value else ""


def csp_hash(source: str) -> str:
    """The CSP source expression that allows exactly this inline ``<style>``."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def security_headers(request: Request, csp: str = "default-src 'none'; frame-ancestors 'none'") -> None:
    """
    Headers for every tracking response: no referrer (the URL holds a
    token), no framing, no sniffing, no caching (each fetch is an event).
    """
    request.setHeader(b"content-security-policy", csp.encode("ascii"))
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cache-control", b"no-store")


def run_async(request: Request, handler: Callable[[], Awaitable[None]]) -> object:
    """
    Run ``handler`` (which writes and finishes the response) from a
    ``render_*`` method.  An unexpected error becomes a 500 without a
    traceback; a client that went away is not written to.
    """

    async def guarded() -> None:
        try:
            await handler()
        except Exception:
            log.failure("HTTP handler failed for {uri}", uri=request.uri)
            if not request.finished and not request._disconnected and not request.startedWriting:
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                finish(request, b"Internal error\n")

    ensureDeferred(guarded())
    return NOT_DONE_YET


def finish(request: Request, body: bytes) -> None:
    """Write ``body`` and finish, unless the client already went away."""
    if request.finished or request._disconnected:
        return
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def header_text(value: Any) -> str:
    """A header value as text (twisted.web answers bytes for a bytes name)."""
    if value is None:
        return ""
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)
