"""
The recipient-facing HTTP endpoints: ``/o/<token>`` (open pixel),
``/c/<token>`` (click redirect) and ``/u/<token>`` (unsubscribe).

Answers never wait on the database for opens and clicks: the pixel and the
redirect go out at once (everything they need is in the signed token), and
the event is looked up and emitted afterwards.  A token that does not
verify gets a 404, never a redirect: the only URLs the relay redirects to
are URLs it signed itself, so it is not an open redirect.

Opens are noisy.  Mailbox providers fetch images through proxies or ahead
of the reader (Apple Mail Privacy Protection, Gmail's image proxy and
prefetch, Yahoo's proxy), and security scanners follow links; such
requests are still recorded, with ``detail["proxy"]`` naming the fetcher,
so statistics can tell them from people.  See docs/tracking.md.

Unsubscribing needs a POST (RFC 8058 one-click, or the page's button):
link scanners fetch with GET and must never unsubscribe anybody.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Coroutine, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from mailrelay.events.model import Event, EventType
from mailrelay.interfaces import IEventSink
from mailrelay.metrics import Metrics
from mailrelay.processing.tokens import Kind, TokenError, TokenSigner, TrackingToken
from mailrelay.storage.lists import TRANSACTIONAL_LIST
from mailrelay.storage.suppressions import Suppressions
from mailrelay.web import pages
from mailrelay.web.common import (
    BodyTooLarge,
    Network,
    client_ip,
    finish,
    read_body,
    run_async,
    security_headers,
    user_agent,
)
from mailrelay.web.lookup import RecipientInfo, RecipientLookup

log = Logger()

#: A 1x1 transparent GIF (43 bytes).
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
MAX_UNSUBSCRIBE_BODY = 16 * 1024
MAX_TOKEN = 4096

# (substring of the User-Agent, proxy name).  First match wins.
_UA_PROXIES = (
    ("GoogleImageProxy", "google_image_proxy"),
    ("ggpht.com", "google_image_proxy"),
    ("Edge/12.246 Mozilla/5.0", "gmail_prefetch"),
    ("YahooMailProxy", "yahoo_proxy"),
    ("Yahoo! Slurp", "yahoo_proxy"),
    ("BingPreview", "microsoft_prefetch"),
    ("Microsoft Office Existence Discovery", "microsoft_prefetch"),
    ("ms-office", "microsoft_prefetch"),
    ("OneOutlook", "outlook_proxy"),
)
# Apple's own 17.0.0.0/8 (the proxies of Mail Privacy Protection fetch from it and from relay partners).
_APPLE = ipaddress.ip_network("17.0.0.0/8")


def classify_proxy(ua: str, ip: str | None) -> str | None:
    """
    The name of the proxy or prefetcher that made this request, or None
    when it looks like a person's mail client.  Heuristic by nature: the
    user agents are what these services are documented (or observed) to
    send; Apple MPP sends exactly ``Mozilla/5.0`` and nothing else.
    """
    for needle, name in _UA_PROXIES:
        if needle in ua:
            return name
    if ua.strip() == "Mozilla/5.0":
        return "apple_mpp"
    if ip is not None:
        try:
            if ipaddress.ip_address(ip) in _APPLE:
                return "apple_mpp"
        except ValueError:
            pass
    return None


@attrs.define
class Tracker:
    """What the three tracking resources share."""

    signer: TokenSigner
    sink: IEventSink
    lookup: RecipientLookup
    suppressions: Suppressions
    clock: IReactorTime
    metrics: Metrics | None = None
    trusted_proxies: Sequence[Network] = ()

    _running: set[Deferred[None]] = attrs.field(factory=set, init=False)

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (event recording after the answer went out), tracked for ``drain``."""
        d = ensureDeferred(work)
        self._running.add(d)
        d.addErrback(lambda f: log.failure("recording a tracking event failed", f))
        d.addBoth(lambda _: self._running.discard(d))

    async def drain(self) -> None:
        """Wait for every event still being recorded (at shutdown, and in tests)."""
        while self._running:
            await DeferredList(list(self._running))

    def token(self, request: Request, kind: Kind) -> TrackingToken | None:
        """The verified token in the path, or None (counted, never explained to the client)."""
        path = request.postpath or []
        if len(path) != 1 or not path[0] or len(path[0]) > MAX_TOKEN:
            self._rejected(kind)
            return None
        try:
            return self.signer.verify(path[0].decode("ascii"), kind)
        except (TokenError, UnicodeDecodeError, ValueError):
            self._rejected(kind)
            return None

    def _rejected(self, kind: Kind) -> None:
        if self.metrics is not None:
            self.metrics.http_rejected.labels(kind=kind.name.lower()).inc()

    async def recipient(self, token: TrackingToken) -> RecipientInfo | None:
        info = await self.lookup.recipient(token.queue_id, token.recipient)
        if info is None or info.account_id != token.account_id:
            return None
        return info

    def emit(
        self, event_type: EventType, token: TrackingToken, info: RecipientInfo | None, detail: dict[str, Any]
    ) -> None:
        if info is None:
            detail = {**detail, "rcpt_index": token.recipient}
        event = Event(
            type=event_type,
            ts=self.clock.seconds(),
            account_id=token.account_id,
            queue_id=token.queue_id,
            message_id=info.message_id if info else None,
            transmission_id=info.transmission_id if info else None,
            recipient=info.address if info else None,
            campaign_id=info.campaign_id if info else None,
            tags=info.tags if info else (),
            detail=detail,
        )
        self.sink.emit(event)
        if self.metrics is not None:
            self.metrics.http_events.labels(type=event_type.value).inc()

    async def record(
        self, event_type: EventType, token: TrackingToken, request_ip: str | None, ua: str, extra: dict[str, Any]
    ) -> None:
        """Look up the recipient and emit one open or click (after the answer went out)."""
        try:
            info = await self.recipient(token)
            first = not await self.lookup.seen(event_type.value, token.queue_id, token.recipient)
        except Exception:
            log.failure("tracking lookup failed; emitting the event without recipient details")
            info, first = None, True
        detail = {**extra, "first": first, "proxy": classify_proxy(ua, request_ip), "user_agent": ua, "ip": request_ip}
        self.emit(event_type, token, info, detail)


def _not_found(request: Request) -> bytes:
    request.setResponseCode(404)
    security_headers(request, pages.PAGE_CSP)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return pages.invalid_link()


class OpenResource(Resource):
    """``GET /o/<token>``: the pixel, then an ``opened`` event."""

    isLeaf = True

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self._t = tracker

    def render_GET(self, request: Request) -> object:
        token = self._t.token(request, Kind.OPEN)
        if token is None:
            return _not_found(request)
        security_headers(request)
        request.setHeader(b"content-type", b"image/gif")
        request.setHeader(b"expires", b"0")
        request.setHeader(b"pragma", b"no-cache")
        if request.method != b"GET":
            return PIXEL  # HEAD: a link checker, not an open
        self._t.later(
            self._t.record(
                EventType.OPENED, token, client_ip(request, self._t.trusted_proxies), user_agent(request), {}
            )
        )
        return PIXEL


class ClickResource(Resource):
    """``GET /c/<token>``: 302 to the signed URL, then a ``clicked`` event."""

    isLeaf = True

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self._t = tracker

    def render_GET(self, request: Request) -> object:
        token = self._t.token(request, Kind.CLICK)
        if token is None or token.url is None:
            return _not_found(request)
        request.setResponseCode(302)
        security_headers(request)
        request.setHeader(b"location", token.url.encode("utf-8"))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        body = b"Redirecting\n"
        if request.method != b"GET":
            return body
        extra = {"url": token.url, "link": token.link}
        self._t.later(
            self._t.record(
                EventType.CLICKED, token, client_ip(request, self._t.trusted_proxies), user_agent(request), extra
            )
        )
        return body


class UnsubscribeResource(Resource):
    """
    ``GET /u/<token>``: a page with one button.  ``POST /u/<token>``
    (RFC 8058 ``List-Unsubscribe=One-Click``, or that button): suppress
    the address for the account (or the mailing list the message went to)
    with reason ``unsubscribe`` and emit ``unsubscribed``; a repeat POST
    changes nothing and answers the same page.
    """

    isLeaf = True

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self._t = tracker

    def render_GET(self, request: Request) -> object:
        token = self._t.token(request, Kind.UNSUBSCRIBE)
        if token is None:
            return _not_found(request)

        async def show() -> None:
            info = await self._t.recipient(token)
            if info is None:
                finish(request, _not_found(request))
                return
            _page_headers(request)
            finish(request, pages.unsubscribe_form(info.address, _what(info)))

        return run_async(request, show)

    def render_POST(self, request: Request) -> object:
        token = self._t.token(request, Kind.UNSUBSCRIBE)
        if token is None:
            return _not_found(request)
        try:
            body = read_body(request, MAX_UNSUBSCRIBE_BODY)
        except BodyTooLarge:
            request.setResponseCode(413)
            _page_headers(request)
            return pages.page("Request too large", "<p>The request was too large.</p>")
        one_click = b"List-Unsubscribe=One-Click" in body
        ip = client_ip(request, self._t.trusted_proxies)
        ua = user_agent(request)

        async def unsubscribe() -> None:
            info = await self._t.recipient(token)
            if info is None:
                finish(request, _not_found(request))
                return
            scope = _scope(info)
            existing = await self._t.suppressions.suppressed(
                info.account_id, [info.address], scope[5:] if scope != "account" else None
            )
            already = any(s.scope == scope for s in existing.values())
            if not already:
                await self._t.suppressions.add(
                    info.account_id,
                    info.address,
                    "unsubscribe",
                    scope=scope,
                    detail=f"unsubscribe link of {info.queue_id}",
                )
                self._t.emit(
                    EventType.UNSUBSCRIBED,
                    token,
                    info,
                    {"scope": scope, "one_click": one_click, "ip": ip, "user_agent": ua},
                )
            _page_headers(request)
            finish(request, pages.unsubscribed(info.address, _what(info)))

        return run_async(request, unsubscribe)


def _page_headers(request: Request) -> None:
    security_headers(request, pages.PAGE_CSP)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")


def _scope(info: RecipientInfo) -> str:
    """
    A message sent to a mailing list (``mailing_list_id``) unsubscribes from
    that list; transactional mail (no list, or the automatic
    "Transactional Campaign Recipients" list) from the whole account.
    """
    if info.list_guid and info.list_name != TRANSACTIONAL_LIST:
        return f"list:{info.list_guid}"
    return "account"


def _what(info: RecipientInfo) -> str:
    if info.list_guid and info.list_name != TRANSACTIONAL_LIST:
        return f"messages of the list \u201c{info.list_name}\u201d"
    return "these messages"
