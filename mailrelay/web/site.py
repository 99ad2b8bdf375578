"""
The HTTP service's resource tree:

- ``/healthz``: does this node's database answer;
- ``/o/<token>``, ``/c/<token>``, ``/u/<token>``: open pixel, click
  redirect, unsubscribe (``mailrelay.web.tracking``);
- ``/metrics``: Prometheus (``mailrelay.web.prometheus``);
- ``/api/v1/...``: the JSON API (``mailrelay.web.api_v1``).

``make_site`` takes each part it needs explicitly, so a test can build the
whole tree from fakes and the wiring shows what the HTTP service depends on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site

from mailrelay.events.queries import EventQueries
from mailrelay.events.stats import Stats
from mailrelay.events.webhooks import WebhookDispatcher
from mailrelay.interfaces import IEventSink
from mailrelay.metrics import Metrics
from mailrelay.processing.tokens import TokenSigner
from mailrelay.storage.store import Store
from mailrelay.storage.webhooks import Webhooks
from mailrelay.web.api import ApiResource, KeyAuthenticator
from mailrelay.web.api_v1 import ApiDeps, ApiV1, DomainRecords
from mailrelay.web.common import DEFAULT_MAX_BODY, limited_request_factory, parse_networks
from mailrelay.web.health import HealthResource
from mailrelay.web.lookup import RecipientLookup, StoreRecipientLookup
from mailrelay.web.prometheus import MetricsResource
from mailrelay.web.tracking import ClickResource, OpenResource, Tracker, UnsubscribeResource


class Root(Resource):
    """
    Anything not mounted is a plain 404 (no directory listings, no
    tracebacks).  ``tracker`` is kept so the wiring can ``drain()`` the
    tracking events still being recorded at shutdown, ``authenticator`` so
    it can drop cached API keys when another process revokes one.
    """

    tracker: Tracker
    authenticator: KeyAuthenticator

    def getChild(self, path: bytes, request: object) -> Resource:
        return NoResource("Not found")


def make_root(
    *,
    store: Store,
    webhooks: Webhooks,
    signer: TokenSigner,
    sink: IEventSink,
    stats: Stats,
    events: EventQueries,
    clock: IReactorTime,
    metrics: Metrics,
    domain_records: DomainRecords,
    dispatcher: WebhookDispatcher | None = None,
    dkim_keygen: Callable[[], Awaitable[bytes]] | None = None,
    recipients: RecipientLookup | None = None,
    injection_user: str = "smtp_injection",
    trusted_proxies: Sequence[str] = (),
    metrics_allowed: Sequence[str] | None = None,
    allow_private_webhooks: bool = False,
) -> Root:
    """The resource tree of ``make_site`` (what ``StubTreq`` is given in the tests)."""
    proxies = parse_networks(trusted_proxies)
    tracker = Tracker(
        signer=signer,
        sink=sink,
        lookup=recipients or StoreRecipientLookup(store.pool),
        suppressions=store.suppressions,
        clock=clock,
        metrics=metrics,
        trusted_proxies=proxies,
    )
    authenticator = KeyAuthenticator(store.credentials, clock, metrics)
    deps = ApiDeps(
        store=store,
        webhooks=webhooks,
        stats=stats,
        events=events,
        clock=clock,
        authenticator=authenticator,
        domain_records=domain_records,
        dkim_keygen=dkim_keygen,
        dispatcher=dispatcher,
        injection_user=injection_user,
        allow_private_webhooks=allow_private_webhooks,
    )
    root = Root()
    root.tracker = tracker
    root.authenticator = authenticator
    root.putChild(b"healthz", HealthResource(store))
    root.putChild(b"o", OpenResource(tracker))
    root.putChild(b"c", ClickResource(tracker))
    root.putChild(b"u", UnsubscribeResource(tracker))
    allowed = parse_networks(metrics_allowed) if metrics_allowed is not None else None
    root.putChild(b"metrics", MetricsResource(metrics, allowed))
    api = Resource()
    api.putChild(b"v1", ApiResource(ApiV1(deps).router(), authenticator, metrics))
    root.putChild(b"api", api)
    return root


def make_site(*, max_body: int = DEFAULT_MAX_BODY, **parts: Any) -> Site:
    """
    The HTTP service (``make_root``'s tree, keyword arguments as there);
    ``max_body`` caps what any request may send: larger bodies are not
    even stored.
    """
    root = make_root(**parts)
    site = Site(root, requestFactory=limited_request_factory(max_body))
    site.displayTracebacks = False
    return site
