"""``GET /metrics``: the Prometheus exposition of the process's ``Metrics`` registry."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Request

from mailrelay.metrics import Metrics
from mailrelay.web.common import Network, client_ip, header_text


class MetricsResource(Resource):
    """
    The text format (or OpenMetrics when the scraper asks for it in
    ``Accept``).  ``allowed`` limits who may scrape: metrics name the
    destinations the relay talks to, which is not for the whole Internet
    when the HTTP listener also serves tracking links.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, allowed: Sequence[Network] | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self._allowed = allowed

    def render_GET(self, request: Request) -> bytes:
        if self._allowed is not None:
            ip = client_ip(request)
            if ip is None or not any(_contains(n, ip) for n in self._allowed):
                request.setResponseCode(403)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"Forbidden\n"
        encoder, content_type = choose_encoder(header_text(request.getHeader(b"accept")))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        body: bytes = encoder(self._metrics.registry)
        return body


def _contains(network: Network, ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in network
    except ValueError:
        return False
