"""The HTTP service's resource tree (tracking, unsubscribe, API come later)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import Site

from mailrelay.web.health import HealthResource

if TYPE_CHECKING:
    from mailrelay.service import RelayService


class Root(Resource):
    def getChild(self, path: bytes, request: object) -> Resource:
        from twisted.web.resource import NoResource

        return NoResource("Not found")


def make_site(relay: RelayService) -> Site:
    root = Root()
    root.putChild(b"healthz", HealthResource(relay.store))
    site = Site(root)
    site.displayTracebacks = False
    return site
