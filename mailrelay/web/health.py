"""``GET /healthz``: is this node able to take mail (its database answers)?"""

from __future__ import annotations

import json

from twisted.internet.defer import ensureDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mailrelay.storage.store import Store


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store

    def render_GET(self, request: Request) -> object:
        async def check() -> None:
            try:
                await self._store.pool.execute("healthz", "SELECT 1")
            except Exception as e:
                request.setResponseCode(503)
                body = {"status": "unavailable", "database": str(e)[:200]}
            else:
                body = {"status": "ok", "database": "ok"}
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            if not request.finished and not request._disconnected:
                request.write(json.dumps(body).encode())
                request.finish()

        ensureDeferred(check())
        return NOT_DONE_YET
