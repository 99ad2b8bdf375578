"""
Prometheus metrics: one ``Metrics`` object per process, built by the wiring
and passed to each stage that counts something.

Why an object and not module-level metrics: prometheus-client's default
registry is a process global, so two relays in one test process (or two
tests) would share and pollute counters.  Each ``Metrics`` owns its own
``CollectorRegistry``; the HTTP service exposes that registry on
``GET /metrics``.

Names follow the Prometheus conventions (``_total`` for counters, base
units, a ``mailrelay_`` prefix).  Labels are kept to small, closed sets;
the one open-ended label (``destination`` on the connection gauge) is
removed again when its count drops to zero, so idle destinations do not
accumulate series.  ``docs/api.md`` lists every name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: The queue states ``queue_messages`` reports, in this order (others are reported as well).
QUEUE_STATES = ("incoming", "active", "deferred", "hold")


class _CallbackGauges(Collector):
    """
    Gauges whose values are read at scrape time from callbacks (the queue
    sizes): nothing has to keep a gauge in step with the queue, and a
    scrape always sees the current numbers.
    """

    def __init__(self) -> None:
        self._queue: Callable[[], Mapping[str, int]] | None = None

    def set_queue(self, callback: Callable[[], Mapping[str, int]] | None) -> None:
        self._queue = callback

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("mailrelay_queue_messages", "Messages in the queue, by state.", labels=["state"])
        if self._queue is not None:
            sizes = dict(self._queue())
            for state in QUEUE_STATES:
                family.add_metric([state], float(sizes.pop(state, 0)))
            for state, value in sorted(sizes.items()):
                family.add_metric([state], float(value))
        yield family


class Metrics:
    """
    Every metric mailrelay exports.  Stages increment the attributes
    directly (``metrics.messages_accepted.labels(listener="submission").inc()``)
    or through the small helpers below where a rule has to be kept.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # Acceptance and delivery.  Delivery is per recipient (one message may have many), so those count
        # recipients; acceptance counts messages (one 250 reply each).
        self.messages_accepted = Counter(
            "mailrelay_messages_accepted", "Messages accepted (250 after DATA).", ["listener"], registry=r
        )
        self.recipients_delivered = Counter(
            "mailrelay_recipients_delivered", "Recipients delivered (remote 250).", registry=r
        )
        self.recipients_deferred = Counter(
            "mailrelay_recipients_deferred", "Delivery attempts deferred (temporary failure).", registry=r
        )
        self.recipients_bounced = Counter(
            "mailrelay_recipients_bounced", "Recipients bounced, by class (hard, soft, block).", ["class"], registry=r
        )
        # Connections and sessions.
        self.destination_connections = Gauge(
            "mailrelay_destination_connections",
            "Open outbound SMTP connections per destination.",
            ["destination"],
            registry=r,
        )
        self.smtp_sessions = Gauge(
            "mailrelay_smtp_sessions", "SMTP sessions open now, by listener.", ["listener"], registry=r
        )
        self.smtp_sessions_started = Counter(
            "mailrelay_smtp_sessions_started", "SMTP sessions started.", ["listener"], registry=r
        )
        self.auth_failures = Counter(
            "mailrelay_auth_failures",
            "Failed authentications, by mechanism (PLAIN, LOGIN, api_key).",
            ["mechanism"],
            registry=r,
        )
        # The HTTP service.
        self.http_events = Counter(
            "mailrelay_http_events",
            "Tracking events received over HTTP (opened, clicked, unsubscribed).",
            ["type"],
            registry=r,
        )
        self.http_rejected = Counter(
            "mailrelay_http_rejected_tokens",
            "Tracking requests with a forged, damaged or unknown token.",
            ["kind"],
            registry=r,
        )
        self.api_requests = Counter(
            "mailrelay_api_requests", "JSON API requests, by status class (2xx, 4xx...).", ["status"], registry=r
        )
        # Webhooks.
        self.webhook_posts = Counter(
            "mailrelay_webhook_posts",
            "Webhook POSTs, by result (ok, http_error, timeout, error).",
            ["result"],
            registry=r,
        )
        self.webhook_events_delivered = Counter(
            "mailrelay_webhook_events_delivered", "Events delivered to webhook endpoints.", registry=r
        )
        self.webhook_events_dropped = Counter(
            "mailrelay_webhook_events_dropped",
            "Events given up (endpoint failing for 24 h, or backlog full).",
            ["reason"],
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "mailrelay_webhook_backlog_events", "Events waiting for webhook delivery (all endpoints).", registry=r
        )
        self._callbacks = _CallbackGauges()
        r.register(self._callbacks)

    def set_queue_sizes(self, callback: Callable[[], Mapping[str, int]] | None) -> None:
        """
        Report queue sizes by state from ``callback`` (state -> messages),
        called at each scrape; the queue stage sets it once at start-up.
        """
        self._callbacks.set_queue(callback)

    def connection_opened(self, destination: str) -> None:
        self.destination_connections.labels(destination=destination).inc()

    def connection_closed(self, destination: str) -> None:
        """One connection to ``destination`` ended; its series goes away when none are left."""
        gauge = self.destination_connections.labels(destination=destination)
        gauge.dec()
        if gauge._value.get() <= 0:
            try:
                self.destination_connections.remove(destination)
            except KeyError:
                pass
