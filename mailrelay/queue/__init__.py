"""
mailrelay.queue: from the spool to the next hop.

- ``manager``: the scheduler (active window, per-destination queues, retries,
  outcomes, DSNs, the sandbox and inbound routes);
- ``destinations``: per-destination concurrency with slow start and a dead timer;
- ``backoff``: the retry arithmetic (pure, injectable jitter);
- ``render``: each recipient's copy at delivery time (tracking, footer, DKIM, VERP);
- ``dsn``: RFC 3464 notices;
- ``control``: the control socket the ``mailrelay queue`` verbs talk to;
- ``records``: the ``recipients`` table (index -> address, for tracking and bounces);
- ``secret``: the tracking secret, generated once when not configured;
- ``wiring``: assembling it all for ``service._add_queue``.

See ``docs/queue.md``.
"""

from mailrelay.queue.backoff import backoff_policy, retry_delay
from mailrelay.queue.manager import QueueManager, QueueSettings
from mailrelay.queue.secret import tracking_secret

__all__ = ["QueueManager", "QueueSettings", "backoff_policy", "retry_delay", "tracking_secret"]
