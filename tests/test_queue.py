"""
Tests for mailrelay.queue: the retry arithmetic, per-destination windows,
DSNs, rendering, the tracking secret and the queue manager.

The manager runs on a ``Clock`` with in-memory fakes for the spool, the
resolver, the delivery client, the directory and the event sink
(``tests.test_queue_support``, where the fakes are held to the real
shapes); nothing here opens a socket.
"""

from __future__ import annotations

import email
import email.policy
import os
import stat
from pathlib import Path
from typing import Any

import dkim
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.delivery.model import (
    DeliveryResult,
    DeliveryStatus,
    PermanentDestinationError,
    TemporaryDestinationError,
)
from mailrelay.events.model import Event
from mailrelay.processing.dkim import DKIMSigner
from mailrelay.processing.mime import Decoration
from mailrelay.processing.tokens import parse_verp
from mailrelay.queue.backoff import backoff_policy, expired, next_attempt_time, retry_delay
from mailrelay.queue.destinations import Destination, is_connection_failure
from mailrelay.queue.dsn import DSNRecipient, build_dsn, original_headers, status_of
from mailrelay.queue.render import AccountInfo, DomainInfo, message_id_for
from mailrelay.queue.secret import load_or_create_secret
from mailrelay.queue.wiring import make_backpressure
from mailrelay.spool import RecipientState, Status
from mailrelay.types import Reply
from tests.test_queue_support import (
    DEFERRED,
    DELIVERED,
    FAILED,
    Harness,
    envelope,
    message_bytes,
    rsa_key,
)

# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------


class BackoffTests(SynchronousTestCase):
    def test_doubles_then_clamps(self) -> None:
        """Without jitter (0.5 is the middle) delays double from retry_min and stop at retry_max."""
        delays = [retry_delay(n, 300, 3600, jitter=lambda: 0.5) for n in range(1, 8)]
        self.assertEqual(delays, [300, 600, 1200, 2400, 3600, 3600, 3600])

    def test_jitter_stays_within_bounds(self) -> None:
        """Jitter spreads a delay by ±20% and the result never leaves [retry_min, retry_max]."""
        self.assertEqual(retry_delay(2, 300, 3600, jitter=lambda: 0.0), 480)
        self.assertAlmostEqual(retry_delay(2, 300, 3600, jitter=lambda: 0.999999), 720, places=2)
        self.assertEqual(retry_delay(1, 300, 3600, jitter=lambda: 0.0), 300)  # clamped up
        self.assertEqual(retry_delay(9, 300, 3600, jitter=lambda: 0.999999), 3600)  # clamped down

    def test_jitter_spreads_a_wave(self) -> None:
        """A thousand recipients deferred together come due over a spread of times, not in one second."""
        import random

        rng = random.Random(1)
        policy = backoff_policy(300, 3600, jitter=rng.random)
        delays = {round(policy(3)) for _ in range(1000)}
        self.assertGreater(len(delays), 100)
        self.assertTrue(all(960 <= d <= 1440 for d in delays))

    def test_many_attempts_do_not_overflow(self) -> None:
        """A message retried thousands of times gets retry_max, not an OverflowError."""
        self.assertEqual(retry_delay(100_000, 1, 2, jitter=lambda: 0.5), 2)

    def test_bad_settings(self) -> None:
        """retry_min must be positive and not above retry_max."""
        self.assertRaises(ValueError, retry_delay, 1, 0, 10)
        self.assertRaises(ValueError, backoff_policy, 10, 5)

    def test_last_attempt_at_expiry(self) -> None:
        """The next attempt is never after the expiry, and a message at max_age is expired."""
        self.assertEqual(next_attempt_time(1000, 600, created=0, max_age=1200), 1200)
        self.assertEqual(next_attempt_time(1000, 100, created=0, max_age=1200), 1100)
        self.assertTrue(expired(1200, 0, 1200))
        self.assertFalse(expired(1199, 0, 1200))


def result(status: DeliveryStatus, code: int, enhanced: str, text: str = "x") -> DeliveryResult:
    return DeliveryResult("a@example.net", status, Reply(code, enhanced, text))


class DestinationTests(SynchronousTestCase):
    def test_slow_start(self) -> None:
        """The window opens by 1/window per success: one more slot per window's worth, never above the limit."""
        d = Destination("example.net", limit=7, dead_time=60)
        self.assertEqual(d.slots, 5)
        for _ in range(5):
            d.success()
        self.assertEqual(int(d.window), 5)  # 5 + 5 * ~1/5.x: just under 6
        d.success()
        self.assertEqual(int(d.window), 6)
        for _ in range(100):
            d.success()
        self.assertEqual(d.window, 7)

    def test_failures_shrink_then_kill(self) -> None:
        """Each connection failure closes the window by one; about a window's worth makes the destination dead."""
        d = Destination("example.net", limit=20, dead_time=60)
        self.assertFalse(d.failure(100.0))  # 1/5
        self.assertEqual(d.window, 4)
        self.assertFalse(d.failure(100.0))  # + 1/4
        self.assertFalse(d.failure(100.0))  # + 1/3
        self.assertTrue(d.failure(100.0, "451 4.4.1 refused"))  # + 1/2 >= 1
        self.assertTrue(d.dead(100.0))
        self.assertFalse(d.can_start(159.0))
        self.assertEqual(d.last_failure, "451 4.4.1 refused")

    def test_revives_with_one_probe(self) -> None:
        """After the dead timer one connection is tried; a failure of that probe kills it again at once."""
        d = Destination("example.net", limit=20, dead_time=60, window=1)
        self.assertTrue(d.failure(0.0))
        self.assertTrue(d.can_start(60.0))
        self.assertEqual(d.slots, 1)
        d.active = 1
        self.assertFalse(d.can_start(60.0))
        self.assertTrue(d.failure(61.0))
        self.assertTrue(d.dead(61.0))

    def test_success_resets_the_cohort(self) -> None:
        """A success between failures forgets them: intermittent trouble does not kill a destination."""
        d = Destination("example.net", limit=20, dead_time=60)
        for _ in range(10):
            self.assertFalse(d.failure(0.0))
            d.success()
        self.assertFalse(d.dead(0.0))

    def test_what_counts_as_a_connection_failure(self) -> None:
        """Network, TLS, 421 and greeting refusals count; recipient replies (even 451 4.7.1) do not."""
        self.assertTrue(is_connection_failure(result(DEFERRED, 451, "4.4.1", "Connection refused")))
        self.assertTrue(is_connection_failure(result(DEFERRED, 451, "4.4.2", "Timeout")))
        self.assertTrue(is_connection_failure(result(DEFERRED, 451, "4.7.5", "TLS handshake failed")))
        self.assertTrue(is_connection_failure(result(DEFERRED, 421, "4.3.2", "shutting down")))
        self.assertTrue(is_connection_failure(result(DEFERRED, 554, "", "go away")))  # greeting
        self.assertFalse(is_connection_failure(result(DEFERRED, 451, "4.7.1", "greylisted")))
        self.assertFalse(is_connection_failure(result(FAILED, 550, "5.1.1", "unknown")))
        self.assertFalse(is_connection_failure(result(DELIVERED, 250, "2.0.0", "ok")))


class DSNTests(SynchronousTestCase):
    ORIGINAL = message_bytes(extra='Bcc: secret@example.org\r\nX-MT-ATTR: {"tags": ["x"]}\r\n')

    def notice(self, **kw: Any) -> bytes:
        args: dict[str, Any] = {
            "reporting_mta": "relay.test",
            "from_address": "MAILER-DAEMON@bounces.relay.test",
            "to_address": "hello@example.com",
            "queue_id": "Q1",
            "arrival": 1_700_000_000.0,
            "now": 1_700_000_100.0,
            "message_id": "<n1@relay.test>",
            "original": self.ORIGINAL,
            "recipients": [
                DSNRecipient(
                    "fail-a@example.net",
                    "failed",
                    "5.1.1",
                    "550 5.1.1 <fail-a@example.net>: User unknown",
                    "mx.example.net",
                    1_700_000_050.0,
                )
            ],
        }
        args.update(kw)
        return build_dsn(**args)

    def test_rfc3464_structure(self) -> None:
        """multipart/report; report-type=delivery-status with the text, the status fields and the headers."""
        msg = email.message_from_bytes(self.notice(), policy=email.policy.default)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        parts = list(msg.iter_parts())
        self.assertEqual(
            [p.get_content_type() for p in parts], ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        )
        self.assertIn("<fail-a@example.net>: host mx.example.net said: 550 5.1.1", parts[0].get_content())
        status = parts[1].as_bytes().decode()
        for field in (
            "Reporting-MTA: dns; relay.test",
            "Final-Recipient: rfc822; fail-a@example.net",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.example.net",
            "Diagnostic-Code: smtp; 550 5.1.1 <fail-a@example.net>: User unknown",
        ):
            self.assertIn(field, status)

    def test_returned_headers_are_cleaned(self) -> None:
        """The returned header section has no Bcc and no control headers, but the sender's own fields."""
        headers = original_headers(self.ORIGINAL)
        self.assertIn(b"Subject: Order 1\r\n", headers)
        self.assertNotIn(b"Bcc", headers)
        self.assertNotIn(b"X-MT-ATTR", headers)
        self.assertNotIn(b"Thank you", headers)

    def test_delay_notice(self) -> None:
        """A delay notice says it is a warning and carries Will-Retry-Until."""
        data = self.notice(
            recipients=[
                DSNRecipient(
                    "b@example.net", "delayed", "4.7.1", "451 4.7.1 later", None, 1_700_000_050.0, 1_700_400_000.0
                )
            ]
        )
        self.assertIn(b"Subject: Delayed Mail (still being retried)", data)
        self.assertIn(b"THIS IS A WARNING ONLY", data)
        self.assertIn(b"Action: delayed", data)
        self.assertIn(b"Will-Retry-Until: ", data)

    def test_one_action_per_notice(self) -> None:
        """Bounces and delays are separate notices; an empty notice is refused."""
        mixed = [DSNRecipient("a@x.test", "failed", "5.0.0"), DSNRecipient("b@x.test", "delayed", "4.0.0")]
        self.assertRaises(ValueError, self.notice, recipients=mixed)
        self.assertRaises(ValueError, self.notice, recipients=[])

    def test_status_of(self) -> None:
        """A reply's enhanced code, else its class: 5.0.0 / 4.0.0."""
        self.assertEqual(status_of(550, "5.1.1"), "5.1.1")
        self.assertEqual(status_of(554, ""), "5.0.0")
        self.assertEqual(status_of(451, "bogus"), "4.0.0")


class SecretTests(SynchronousTestCase):
    def test_created_once_and_private(self) -> None:
        """The secret is generated once (mode 0600) and the same bytes come back on the next start."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        first = load_or_create_secret(path)
        self.assertGreaterEqual(len(first), 32)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_secret(path, randbytes=lambda n: b"\0" * n), first)

    def test_truncated_file_refused(self) -> None:
        """A file too short to be a secret stops the start rather than signing with it."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("short\n")
        self.assertRaises(ValueError, load_or_create_secret, path)


class BackpressureTests(SynchronousTestCase):
    def test_count_and_disk(self) -> None:
        """New mail waits above the high-water mark or below 5% free disk, using the O(1) count."""
        from twisted.internet.task import Clock

        full = Reply(451, "4.3.1", "Queue full")
        count = [10]

        class Spool:
            free = 0.5
            calls = 0

            def disk_free_fraction(self) -> float:
                self.calls += 1
                return self.free

        spool, clock = Spool(), Clock()
        check = make_backpressure(spool, clock, 10, lambda: count[0], full)
        self.assertIs(check(), full)
        count[0] = 9
        self.assertIsNone(check())
        spool.free = 0.01
        self.assertIsNone(check())  # the disk is looked at once a second
        self.assertEqual(spool.calls, 1)
        clock.advance(1.5)
        self.assertIs(check(), full)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def dnsfunc_for(signer: DKIMSigner) -> Any:
    records = {
        f"{r.name}.".encode(): r.value.replace('"', "").replace(" ", "").encode()
        for r in signer.dns_records("bounces.relay.test", return_path_target="bounces.relay.test")
        if "._domainkey." in r.name
    }

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


class RenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.directory.domains["example.com"] = DomainInfo("example.com", True, "sel", rsa_key().decode("ascii"))

    def prepare(
        self, env: dict[str, Any], rcpts: tuple[str, ...] = ("a@example.net",), body: bytes | None = None
    ) -> Any:
        qid = self.h.spool.add(env, rcpts, body)
        message = self.h.spool.get(qid)
        assert message is not None
        d = Deferred.fromCoroutine(self.h.renderer.prepare(message))
        return self.successResultOf(d), self.h.spool.stored[qid].body

    def test_signed_verp_and_clean(self) -> None:
        """A copy is DKIM-signed (valid), has a VERP return path naming it, and no control headers."""
        prepared, body = self.prepare(envelope(), body=message_bytes(extra='X-MT-ATTR: {"tags": ["a"]}\r\n'))
        mail_from, data = self.h.renderer.render(prepared, body, "a@example.net")
        info = parse_verp(mail_from, b"s" * 32)
        self.assertEqual((info.queue_id, info.recipient, info.domain), (prepared.queue_id, 0, "bounces.relay.test"))
        self.assertTrue(data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
        signer = self.h.renderer._signer(self.h.directory.domains["example.com"])
        assert signer is not None
        self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc_for(signer)))
        self.assertNotIn(b"X-MT-ATTR", data)

    def test_deterministic(self) -> None:
        """Rendering twice (a retry) gives the same bytes; Message-ID and Date derive from the queue id and time."""
        prepared, body = self.prepare(envelope())
        first = self.h.renderer.render(prepared, body, "a@example.net")
        self.h.clock.advance(3600)
        again = self.h.renderer.render(prepared, body, "a@example.net")
        self.assertEqual(first, again)
        mid = message_id_for(prepared.queue_id, 1_700_000_000.0, "relay.test")
        self.assertIn(f"Message-ID: {mid}".encode(), first[1])
        self.assertIn(b"Date: Tue, 14 Nov 2023 22:13:20 GMT", first[1])

    def test_unverified_domain_not_signed(self) -> None:
        """A From domain that is not a verified sending domain gets no signature."""
        self.h.directory.domains["example.com"] = DomainInfo("example.com", False, "sel", rsa_key().decode())
        prepared, body = self.prepare(envelope())
        self.assertNotIn(b"DKIM-Signature", self.h.renderer.render(prepared, body, "a@example.net")[1])

    def test_signing_switched_off_and_on(self) -> None:
        """A verified domain with DKIM signing off gets unsigned copies; switched on again, they are signed."""
        key = rsa_key().decode("ascii")
        self.h.directory.domains["example.com"] = DomainInfo("example.com", True, "sel", key, dkim_signing=False)
        prepared, body = self.prepare(envelope())
        self.assertIsNone(prepared.dkim)
        data = self.h.renderer.render(prepared, body, "a@example.net")[1]
        self.assertNotIn(b"DKIM-Signature", data)
        self.assertIn(b"Message-ID: ", data)  # otherwise rendered as usual
        self.h.directory.domains["example.com"] = DomainInfo("example.com", True, "sel", key, dkim_signing=True)
        prepared, body = self.prepare(envelope())
        data = self.h.renderer.render(prepared, body, "a@example.net")[1]
        self.assertTrue(data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
        signer = self.h.renderer._signer(self.h.directory.domains["example.com"])
        assert signer is not None
        self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc_for(signer)))

    def test_tracking_defaults_and_overrides(self) -> None:
        """Account defaults turn tracking on; the message's controls override them either way."""
        html = (
            b"From: hello@example.com\r\nTo: a@example.net\r\nSubject: s\r\nContent-Type: text/html\r\n\r\n"
            b'<html><body><a href="https://shop.example/x">x</a></body></html>\r\n'
        )
        self.h.directory.accounts[7] = AccountInfo(7, open_tracking=True, click_tracking=True, unsubscribe_link=True)
        prepared, body = self.prepare(envelope(), body=html)
        data = self.h.renderer.render(prepared, body, "a@example.net")[1]
        self.assertIn(b"https://t.relay.test/o/", data)
        self.assertIn(b"https://t.relay.test/c/", data)
        self.assertIn(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", data)
        self.assertIn(b"list-unsubscribe", data.split(b"\r\n\r\n")[0].lower().split(b"h=")[1][:300])  # signed
        prepared, body = self.prepare(
            envelope(controls={"open_tracking": False, "click_tracking": False, "unsubscribe": False}), body=html
        )
        data = self.h.renderer.render(prepared, body, "a@example.net")[1]
        self.assertNotIn(b"t.relay.test", data)
        self.assertFalse(prepared.varies_per_recipient and not prepared.mail_from)

    def test_decoration_prefers_the_domain(self) -> None:
        """The sending domain's footer wins over the account's."""
        self.h.directory.accounts[7] = AccountInfo(7, decoration=Decoration(text_footer="ACCOUNT FOOTER"))
        prepared, body = self.prepare(envelope())
        self.assertIn(b"ACCOUNT FOOTER", self.h.renderer.render(prepared, body, "a@example.net")[1])
        self.h.directory.domains["example.com"] = DomainInfo(
            "example.com", True, "sel", rsa_key().decode(), decoration=Decoration(text_footer="DOMAIN FOOTER")
        )
        prepared, body = self.prepare(envelope())
        data = self.h.renderer.render(prepared, body, "a@example.net")[1]
        self.assertIn(b"DOMAIN FOOTER", data)
        self.assertNotIn(b"ACCOUNT FOOTER", data)

    def test_copy_headers(self) -> None:
        """Mailtarget copies: every copy shows the cc list; a bcc copy shows only its own address."""
        env = envelope(controls={"cc": ["c@example.org"]}, roles={"c@example.org": "cc", "b@example.org": "bcc"})
        prepared, body = self.prepare(env, ("a@example.net", "c@example.org", "b@example.org"))
        a = self.h.renderer.render(prepared, body, "a@example.net")[1]
        b = self.h.renderer.render(prepared, body, "b@example.org")[1]
        self.assertIn(b"Cc: c@example.org", a)
        self.assertNotIn(b"Bcc:", a)
        self.assertIn(b"Bcc: b@example.org", b)

    def test_notice_is_not_decorated(self) -> None:
        """A DSN keeps the null sender, gets no footer or tracking, and passes through as it is."""
        self.h.directory.accounts[7] = AccountInfo(7, open_tracking=True, decoration=Decoration(text_footer="F"))
        env = envelope(mail_from="", dsn=True, **{"from": "MAILER-DAEMON@bounces.relay.test"})
        prepared, body = self.prepare(env, ("hello@example.com",))
        mail_from, data = self.h.renderer.render(prepared, body, "hello@example.com")
        self.assertEqual((mail_from, data), ("", body))
        self.assertFalse(prepared.varies_per_recipient)

    def test_broken_key_sends_unsigned(self) -> None:
        """An unusable stored key leaves the copy unsigned instead of stopping delivery."""
        self.h.directory.domains["example.com"] = DomainInfo("example.com", True, "sel", "not a key")
        prepared, _body = self.prepare(envelope())
        self.assertIsNone(prepared.dkim)
        self.flushLoggedErrors()


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------


class ManagerDeliveryTests(SynchronousTestCase):
    def test_delivered_is_recorded_before_the_event(self) -> None:
        """A 250 is on the spool (final) when the delivered event is emitted, and the message is then gone."""
        h = Harness()
        seen: list[Any] = []
        h.events.check = lambda e: seen.append((e.type.value, h.spool.state(e.queue_id or "", e.recipient or "")))
        h.start()
        qid = h.submit(["a@example.net"])
        self.assertEqual([s[0] for s in seen], ["queued", "delivered"])
        self.assertIsNone(seen[1][1])  # already finished: recorded, then removed
        self.assertEqual(h.spool.log[-1][1]["a@example.net"].status, Status.DELIVERED)
        self.assertEqual(h.spool.finished, [qid])
        self.assertEqual(h.manager.message_count, 0)
        event = h.events.of("delivered")[0]
        self.assertEqual((event.account_id, event.queue_id, event.transmission_id, event.tags), (7, qid, qid, ("t1",)))
        self.assertEqual(event.detail["mx_host"], "mx.example.net")
        self.assertTrue(event.message_id and event.message_id.startswith("<"))

    def test_recipient_rows(self) -> None:
        """Each recipient has a row from acceptance on ("queued"), updated by each outcome, for lookups."""
        h = Harness()
        rows: list[tuple[Any, ...]] = []

        class Records:
            def put(self, *row: Any) -> None:
                rows.append(row)

        h.manager.records = Records()  # type: ignore[assignment]
        h.start()
        qid = h.submit(["a@example.net", "fail-b@example.net"])
        self.assertEqual(
            [r[:5] for r in rows if r[0] == qid],
            [(qid, 0, "a@example.net", "queued", 0), (qid, 1, "fail-b@example.net", "queued", 0),
             (qid, 0, "a@example.net", "delivered", 1), (qid, 1, "fail-b@example.net", "bounced", 1)],
        )

    def test_activity_hook(self) -> None:
        """The activity hook hears each delivery to a destination start and end (the connections metric)."""
        h = Harness()
        seen: list[tuple[str, int]] = []
        h.manager.activity = lambda key, change: seen.append((key, change))
        h.start()
        h.submit(["a@example.net"])
        self.assertEqual(seen, [("example.net", 1), ("example.net", -1)])

    def test_copy_on_the_wire(self) -> None:
        """The client gets one transaction per recipient, with the VERP sender and the rendered bytes."""
        h = Harness()
        h.start()
        h.submit(["a@example.net", "b@example.net"])
        self.assertEqual(sorted(h.client.recipients()), ["a@example.net", "b@example.net"])
        for sent in h.client.sent:
            self.assertEqual(len(sent.message.recipients), 1)
            self.assertTrue(sent.message.mail_from.startswith("bounces+"))
            self.assertIn(b"Message-ID: <", sent.data)
            self.assertEqual(sent.destination.domain, "example.net")

    def test_identical_copies_share_a_transaction(self) -> None:
        """Copies that cannot differ (null sender, no tracking) go to one destination in one transaction."""
        h = Harness()
        h.start()
        h.submit(["a@example.net", "b@example.net", "c@example.org"], env=envelope(mail_from=""))
        self.assertEqual(
            sorted(tuple(sorted(s.message.recipients)) for s in h.client.sent),
            [("a@example.net", "b@example.net"), ("c@example.org",)],
        )

    def test_deferred_then_delivered(self) -> None:
        """A 451 is recorded deferred with the backoff; the retry comes at that time and delivers."""
        h = Harness()
        answers = iter([(DEFERRED, Reply(451, "4.7.1", "later")), (DELIVERED, Reply(250, "2.0.0", "ok"))])
        h.client.script = lambda rcpt: next(answers)
        h.start()
        now = h.clock.seconds()
        qid = h.submit(["a@example.net"])
        state = h.spool.state(qid, "a@example.net")
        self.assertEqual(state, RecipientState.deferred(1, now + 60.0, "451 4.7.1 later"))
        self.assertEqual(len(h.client.sent), 1)
        h.advance(59)
        self.assertEqual(len(h.client.sent), 1)
        h.advance(1)
        self.assertEqual(len(h.client.sent), 2)
        self.assertEqual(h.spool.finished, [qid])
        self.assertEqual([e.type.value for e in h.events.events], ["queued", "deferred", "delivered"])
        self.assertEqual(h.events.of("delivered")[0].detail["attempts"], 2)

    def test_backoff_grows(self) -> None:
        """Each deferral of one recipient waits twice as long, up to retry_max."""
        h = Harness()
        h.client.script = lambda rcpt: (DEFERRED, Reply(451, "4.7.1", "later"))
        h.start()
        qid = h.submit(["a@example.net"])
        gaps = []
        for _ in range(5):
            state = h.spool.state(qid, "a@example.net")
            assert state is not None and state.next_attempt is not None
            gaps.append(state.next_attempt - h.clock.seconds())
            h.advance(gaps[-1])
        self.assertEqual(gaps, [60, 120, 240, 480, 600])

    def test_hard_bounce(self) -> None:
        """A 5.1.1 bounces: DSN queued to the sender first, then the record, the event and the suppression."""
        h = Harness()
        order: list[str] = []
        h.events.check = lambda e: order.append(
            f"{e.type.value}:{len([m for m in h.spool.messages() if m.envelope.get('dsn')])}"
        )
        h.start()
        qid = h.submit(["fail-a@example.net", "b@example.net"])
        bounced = h.events.of("bounced")[0]
        self.assertEqual(
            (bounced.recipient, bounced.detail["class"], bounced.detail["rule"]),
            ("fail-a@example.net", "hard", "user-unknown"),
        )
        self.assertIn("bounced:1", order)  # the notice was in the spool when the event went out
        self.assertEqual(len(h.directory.added), 1)
        account, address, reason, detail, expires = h.directory.added[0]
        self.assertEqual((account, address, reason), (7, "fail-a@example.net", "hard_bounce"))
        self.assertIn("5.1.1", detail or "")
        self.assertEqual(expires, h.clock.seconds() + 180 * 86400)
        notice = [s for s in h.client.sent if s.message.mail_from == ""]
        self.assertEqual(len(notice), 1)
        self.assertEqual(notice[0].message.recipients, ("hello@example.com",))
        self.assertIn(b"Final-Recipient: rfc822; fail-a@example.net", notice[0].data)
        self.assertIn(f"The queue id of your message was {qid}".encode(), notice[0].data)
        self.assertIn(qid, h.spool.finished)
        # The notice itself is no account send: no events of its own.
        self.assertEqual({e.queue_id for e in h.events.events}, {qid})

    def test_block_is_not_suppressed(self) -> None:
        """A reputation block bounces with class block and leaves the address unsuppressed."""
        h = Harness()
        h.start()
        h.submit(["block-a@example.net"])
        self.assertEqual(h.events.of("bounced")[0].detail["class"], "block")
        self.assertEqual(h.directory.added, [])

    def test_null_mx_bounces_at_once(self) -> None:
        """A permanent resolution error (null MX) bounces without any SMTP attempt."""
        h = Harness()
        h.resolver.errors["nullmx.example"] = PermanentDestinationError(
            Reply(556, "5.1.10", "nullmx.example has a null MX")
        )
        h.start()
        h.submit(["a@nullmx.example"])
        self.assertEqual(h.events.of("bounced")[0].detail["reply"], "556 5.1.10 nullmx.example has a null MX")
        self.assertEqual([s.message.recipients for s in h.client.sent], [("hello@example.com",)])

    def test_temporary_resolution_error_defers(self) -> None:
        """SERVFAIL defers (and counts against the destination), it does not bounce."""
        h = Harness()
        h.resolver.errors["example.net"] = TemporaryDestinationError(Reply(451, "4.4.3", "SERVFAIL"))
        h.start()
        qid = h.submit(["a@example.net"])
        state = h.spool.state(qid, "a@example.net")
        assert state is not None
        self.assertEqual((state.status, state.last_reply), (Status.DEFERRED, "451 4.4.3 SERVFAIL"))

    def test_notice_to_the_notification_address(self) -> None:
        """With a notification address on the account the notice goes there instead of the sender."""
        h = Harness()
        h.directory.accounts[7] = AccountInfo(7, notification_address="it@example.com")
        h.start()
        h.submit(["fail-a@example.net"])
        self.assertEqual(
            [s.message.recipients for s in h.client.sent if s.message.mail_from == ""], [("it@example.com",)]
        )

    def test_no_notice_to_the_null_sender(self) -> None:
        """A bounce of a message sent with MAIL FROM:<> produces no notice."""
        h = Harness()
        h.start()
        qid = h.submit(["fail-a@example.net"], env=envelope(mail_from=""))
        self.assertEqual(len(h.client.sent), 1)
        self.assertIn(qid, h.spool.finished)
        self.assertEqual(h.spool.messages(), [])

    def test_notice_about_a_notice_never(self) -> None:
        """A DSN that bounces is dropped: no notice about a notice, no suppression."""
        h = Harness()
        h.start()
        env = envelope(mail_from="", dsn=True, **{"from": "MAILER-DAEMON@bounces.relay.test"})
        h.submit(["fail-sender@example.com"], env=env)
        self.assertEqual(len(h.client.sent), 1)
        self.assertEqual(h.directory.added, [])
        self.assertEqual(h.spool.messages(), [])

    def test_expiry_bounces_with_a_notice(self) -> None:
        """Deferred until max_age: the last attempt is at the expiry, then a notice with Action: failed."""
        h = Harness()
        h.client.script = lambda rcpt: (DEFERRED, Reply(451, "4.7.1", "try later"))
        h.start()
        start = h.clock.seconds()
        qid = h.submit(["a@example.net"])
        times = []
        for _ in range(400):
            before = len(h.client.sent)
            h.advance(10)
            if len(h.client.sent) > before:
                times.append(h.clock.seconds() - start)
        # 60, 180, 420, 900, then every retry_max (600), the last one capped at the expiry.
        self.assertEqual(times[:9], [60, 180, 420, 900, 1500, 2100, 2700, 3300, 3600])
        bounced = h.events.of("bounced")[0]
        self.assertTrue(bounced.detail["expired"])
        self.assertEqual(bounced.detail["class"], "block")  # 4.7.1 refusals for an hour: the receiver, not the box
        self.assertEqual(h.directory.added, [])
        notice = next(s for s in h.client.sent if s.message.mail_from == "")
        self.assertIn(b"Action: failed", notice.data)
        self.assertIn(b"Status: 4.7.1", notice.data)
        self.assertIn(b"was given up", notice.data)
        self.assertIn(qid, h.spool.finished)

    def test_suppressed_recipients_are_not_mailed(self) -> None:
        """A suppressed address gets a suppressed event, a final record, no SMTP and no notice."""
        h = Harness()
        h.directory.suppressions[(7, "gone@example.net")] = "hard_bounce"
        h.start()
        qid = h.submit(["gone@example.net", "a@example.net"], env=envelope(controls={"mailing_list": "L1"}))
        self.assertEqual(h.client.recipients(), ["a@example.net"])
        self.assertEqual(h.events.of("suppressed")[0].detail, {"reason": "hard_bounce"})
        self.assertEqual(h.directory.suppressed_calls[0], (7, ("gone@example.net", "a@example.net"), "L1"))
        self.assertIn(qid, h.spool.finished)

    def test_storage_down_postpones(self) -> None:
        """When the suppression list cannot be read the message waits (retry_min) instead of being mailed."""
        h = Harness()
        h.directory.down = True
        h.start()
        qid = h.submit(["a@example.net"])
        self.assertEqual(h.client.sent, [])
        self.assertEqual(h.spool.state(qid, "a@example.net"), RecipientState())  # nothing recorded
        h.directory.down = False
        h.advance(60)
        self.assertEqual(h.client.recipients(), ["a@example.net"])
        self.flushLoggedErrors(ConnectionError)


class ManagerRouteTests(SynchronousTestCase):
    def test_sandbox(self) -> None:
        """Sandbox mail never leaves: every recipient is final with a sandboxed event."""
        h = Harness()
        h.start()
        qid = h.submit(["a@example.net", "b@example.net"], env=envelope(route="sandbox"))
        self.assertEqual(h.client.sent, [])
        self.assertEqual([e.recipient for e in h.events.of("sandboxed")], ["a@example.net", "b@example.net"])
        self.assertEqual(h.events.of("queued"), [])
        self.assertIn(qid, h.spool.finished)

    def test_inbound_goes_to_the_feedback_handler(self) -> None:
        """Mail to a VERP address is handed over raw, then final; nothing is delivered, no events."""
        h = Harness()
        h.start()
        body = b"From: mailer-daemon@example.net\r\n\r\nbounce\r\n"
        qid = h.submit(
            ["bounces+abc@bounces.relay.test"], env=envelope(account_id=None, route="inbound", mail_from=""), body=body
        )
        self.assertEqual([(q, d) for q, _, d in h.feedback_calls], [(qid, body)])
        self.assertEqual(h.client.sent, [])
        self.assertEqual(h.events.events, [])
        self.assertIn(qid, h.spool.finished)

    def test_failing_feedback_handler_is_retried(self) -> None:
        """A handler that fails leaves the message deferred; the next attempt hands it over again."""
        calls: list[str] = []

        def handler(qid: str, env: Any, data: bytes) -> Deferred[None]:
            calls.append(qid)
            d: Deferred[None] = Deferred()
            if len(calls) == 1:
                d.errback(RuntimeError("parser crashed"))
            else:
                d.callback(None)
            return d

        h = Harness(feedback=handler)
        h.start()
        qid = h.submit(["bounces+abc@bounces.relay.test"], env=envelope(account_id=None, route="inbound"))
        state = h.spool.state(qid, "bounces+abc@bounces.relay.test")
        assert state is not None
        self.assertEqual(state.status, Status.DEFERRED)
        h.advance(60)
        self.assertEqual(len(calls), 2)
        self.assertIn(qid, h.spool.finished)
        self.flushLoggedErrors(RuntimeError)


class SchedulingTests(SynchronousTestCase):
    def test_concurrency_window_slow_start(self) -> None:
        """Thirty copies for one domain: 5 at first; each success opens the window, never past the limit."""
        h = Harness(concurrency_per_destination=8)
        h.client.hold = True
        h.start()
        h.submit([f"r{i}@example.net" for i in range(30)])
        self.assertEqual(len(h.client.waiting), 5)
        peak = 5
        while h.client.waiting:
            h.client.finish(h.client.waiting[0])
            h.settle()
            peak = max(peak, len(h.client.waiting))
        self.assertEqual(len(h.client.sent), 30)
        self.assertEqual(peak, 8)

    def test_destinations_do_not_wait_for_each_other(self) -> None:
        """A full window at one domain does not hold back another domain's copies."""
        h = Harness()
        h.client.hold = True
        h.start()
        h.submit([f"r{i}@example.net" for i in range(10)] + ["x@example.org"])
        self.assertIn("example.org", [s.destination.domain for s in h.client.waiting])

    def test_dead_destination(self) -> None:
        """Connection failures kill the destination: the rest is deferred without trying, then one probe."""
        h = Harness()
        h.client.hold = True
        h.start()
        qid = h.submit([f"refused-{i}@example.net" for i in range(10)])
        self.assertEqual(len(h.client.waiting), 5)
        for sent in list(h.client.waiting):
            h.client.finish(sent)
        h.settle()
        self.assertEqual(len(h.client.sent), 5)  # the other five were suspended, not tried
        message = h.spool.get(qid)
        assert message is not None
        replies = {s.last_reply for s in message.states}
        self.assertTrue(any(r and "delivery temporarily suspended" in r for r in replies))
        self.assertEqual(h.manager.destination_state("example.net")["dead"], True)  # type: ignore[index]
        h.advance(60)  # dead timer and retry_min both end: one probe
        self.assertEqual(len(h.client.waiting), 1)

    def test_smarthost_is_one_destination(self) -> None:
        """With a smarthost every domain shares one window: the relay host's, not each domain's."""
        h = Harness(smarthost="relay.isp.example:587")
        h.client.hold = True
        h.start()
        h.submit([f"r@d{i}.example" for i in range(10)])
        self.assertEqual(len(h.client.waiting), 5)
        self.assertEqual(h.manager.destination_of("x@anything.example"), "[relay.isp.example:587]")

    def test_active_window(self) -> None:
        """No more than active_window messages are in delivery; the next comes in when one finishes."""
        h = Harness(active_window=3)
        h.client.hold = True
        h.start()
        for i in range(10):
            h.submit([f"r@d{i}.example"])
        self.assertEqual(len(h.client.waiting), 3)
        self.assertEqual(h.manager.active_count, 3)
        h.client.finish(h.client.waiting[0])
        h.settle()
        self.assertEqual(len(h.client.waiting), 3)
        self.assertEqual(len(h.client.sent), 4)

    def test_recovery_is_time_sliced(self) -> None:
        """Two thousand recovered messages are loaded a slice per reactor turn, not in one go."""
        h = Harness(slice_size=500, active_window=10)
        h.client.hold = True
        for i in range(2000):
            h.spool.add(envelope(), [f"r{i}@example.net"])
        d = h.manager.start()
        self.assertNoResult(d)
        seen = [h.manager.message_count]
        while not d.called:
            # One reactor turn at a time: the earliest delayed call only.
            call = min(h.clock.getDelayedCalls(), key=lambda c: c.getTime())
            h.clock.calls.remove(call)
            call.func(*call.args, **call.kw)
            seen.append(h.manager.message_count)
        self.assertEqual(sorted(set(seen)), [500, 1000, 1500, 2000])
        h.settle()
        self.assertEqual(h.manager.active_count, 10)

    def test_restart_never_repeats_a_delivered_recipient(self) -> None:
        """After a crash mid-message, a new manager tries only what was not recorded delivered."""
        h = Harness()
        h.client.hold = True
        h.start()
        qid = h.submit(["a@example.net", "b@example.net"])
        first = {s.message.recipients[0]: s for s in h.client.waiting}
        h.client.finish(first["a@example.net"])  # recorded; b is "on the wire" when the process dies
        h.settle()
        after = Harness()
        after.spool.stored = h.spool.stored  # the same disk
        after.client.hold = False
        after.start()
        self.assertEqual(after.client.recipients(), ["b@example.net"])
        self.assertEqual(after.spool.finished, [qid])

    def test_recovered_backoff_is_kept(self) -> None:
        """A recovered deferred recipient waits for its recorded next attempt, not a fresh one."""
        h = Harness()
        now = h.clock.seconds()
        h.spool.add(envelope(), ["a@example.net"], states=[RecipientState.deferred(3, now + 100, "451 4.7.1 later")])
        h.start()
        self.assertEqual(h.client.sent, [])
        h.advance(100)
        self.assertEqual(h.client.recipients(), ["a@example.net"])

    def test_big_body_is_streamed_from_the_spool(self) -> None:
        """A body above the spill threshold is read with open_body in pieces, and read once for all copies."""
        h = Harness()
        big = message_bytes(body="x" * 100 + "\r\n" * 5000)
        h.spool.spill_threshold = 1000
        h.start()
        h.submit(["a@example.net", "b@example.net"], body=big)
        self.assertEqual(len(h.client.sent), 2)
        self.assertEqual(h.spool.reads, 1)
        self.assertTrue(all(s.data.endswith(big[-200:]) for s in h.client.sent))

    def test_delay_notice_once(self) -> None:
        """After delay_notice_after a delay notice goes to the sender, once, while retries go on."""
        h = Harness(delay_notice_after=100.0)
        h.client.script = lambda rcpt: (
            (DEFERRED, Reply(451, "4.7.1", "later")) if rcpt.startswith("a@") else (DELIVERED, Reply(250, "", "ok"))
        )
        h.start()
        h.submit(["a@example.net"])
        h.advance(60)
        self.assertEqual([s for s in h.client.sent if s.message.mail_from == ""], [])
        h.advance(120)
        h.advance(240)
        notices = [s for s in h.client.sent if s.message.mail_from == ""]
        self.assertEqual(len(notices), 1)
        self.assertIn(b"Action: delayed", notices[0].data)
        self.assertIn(b"Status: 4.7.1", notices[0].data)
        self.assertIn(b"Will-Retry-Until:", notices[0].data)

    def test_stop_waits_for_deliveries(self) -> None:
        """stop() lets a delivery under way finish and record, and starts nothing new."""
        h = Harness(shutdown_grace=30)
        h.client.hold = True
        h.start()
        qid = h.submit(["a@example.net"])
        d = Deferred.fromCoroutine(h.manager.stop())
        self.assertNoResult(d)
        h.client.finish(h.client.waiting[0])
        h.settle()
        self.successResultOf(d)
        self.assertIn(qid, h.spool.finished)

    def test_stop_gives_up_after_the_grace(self) -> None:
        """A delivery that never ends does not hold the shutdown beyond shutdown_grace."""
        h = Harness(shutdown_grace=5)
        h.client.hold = True
        h.start()
        h.submit(["a@example.net"])
        d = Deferred.fromCoroutine(h.manager.stop())
        h.clock.advance(5)
        self.successResultOf(d)

    def test_spool_failure_does_not_spin(self) -> None:
        """When outcomes cannot be recorded nothing is reported, and the message is not retried in a busy loop."""
        h = Harness()
        h.start()
        h.spool.fail_record = OSError("I/O error")
        h.submit(["a@example.net"])
        self.assertEqual(h.events.of("delivered"), [])
        self.assertEqual(len(h.client.sent), 1)
        h.advance(0.5)
        self.assertEqual(len(h.client.sent), 1)
        self.flushLoggedErrors(OSError)


class OperatorTests(SynchronousTestCase):
    def test_hold_and_release(self) -> None:
        """A held message is not tried, not even when due; released, it is."""
        h = Harness()
        h.client.script = lambda rcpt: (DEFERRED, Reply(451, "4.7.1", "later"))
        h.start()
        qid = h.submit(["a@example.net"])
        self.successResultOf(Deferred.fromCoroutine(h.manager.hold(qid)))
        h.advance(600)
        self.assertEqual(len(h.client.sent), 1)
        self.successResultOf(Deferred.fromCoroutine(h.manager.release(qid)))
        h.settle()
        self.assertEqual(len(h.client.sent), 2)

    def test_retry_now(self) -> None:
        """retry makes a deferred message due at once, whatever its backoff, and revives its destination."""
        h = Harness()
        h.client.script = lambda rcpt: (DEFERRED, Reply(451, "4.7.1", "later"))
        h.start()
        qid = h.submit(["a@example.net"])
        self.assertTrue(h.manager.retry(qid))
        h.settle()
        self.assertEqual(len(h.client.sent), 2)
        self.assertFalse(h.manager.retry("NOPE"))

    def test_delete_with_and_without_notice(self) -> None:
        """delete sends the sender a notice for the pending recipients, unless silent."""
        h = Harness()
        h.client.script = lambda rcpt: (DEFERRED, Reply(451, "4.7.1", "later"))
        h.start()
        loud = h.submit(["a@example.net"])
        quiet = h.submit(["b@example.net"])
        notice = self.successResultOf(Deferred.fromCoroutine(h.manager.delete(loud)))
        self.assertIsNotNone(notice)
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(h.manager.delete(quiet, notify=False))))
        self.assertIsNone(h.spool.get(loud))
        self.assertIsNone(h.spool.get(quiet))
        notices = [m for m in h.spool.messages() if m.envelope.get("dsn")]
        self.assertEqual([(m.queue_id, m.recipients) for m in notices], [(notice, ("hello@example.com",))])
        self.assertIn(b"deleted from the queue by the mail system administrator", h.spool.stored[notice].body)
        self.assertIn(b"Final-Recipient: rfc822; a@example.net", h.spool.stored[notice].body)
        self.assertEqual(h.manager.message_count, 1)  # the notice itself
        self.assertEqual([e.detail["rule"] for e in h.events.of("bounced")], ["deleted-by-admin"] * 2)


def _event_types(events: list[Event]) -> list[str]:
    return [e.type.value for e in events]


class WiringTests(SynchronousTestCase):
    def config(self, **delivery: Any) -> Any:
        from mailrelay.config import parse_config

        base = Path(self.mktemp())
        return parse_config(
            {"server": {"hostname": "relay.test", "data_dir": str(base)}, "delivery": delivery}, "test", base
        )

    def test_smarthost_resolver(self) -> None:
        """A configured smarthost becomes the destination of every domain, with its TLS level and login."""
        from mailrelay.delivery.mx import MXResolver, SmarthostResolver
        from mailrelay.queue.wiring import make_resolver, settings_of

        config = self.config(
            smarthost="smtp.isp.example:587",
            smarthost_username="u",
            smarthost_password="p",
            smarthost_tls="required",
            retry_min=5,
            retry_max=50,
        )
        resolver = make_resolver(object(), config)
        assert isinstance(resolver, SmarthostResolver)
        destination = self.successResultOf(resolver.resolve("Example.NET"))
        self.assertEqual(
            (destination.domain, destination.kind, destination.hosts[0].port), ("example.net", "smarthost", 587)
        )
        assert destination.tls is not None and destination.credentials is not None
        self.assertEqual((destination.tls.level, destination.credentials.username), ("encrypt", "u"))
        settings = settings_of(config)
        self.assertEqual((settings.smarthost, settings.retry_min, settings.retry_max), ("smtp.isp.example:587", 5, 50))
        self.assertIsInstance(make_resolver(object(), self.config()), MXResolver)

    def test_late_event_sink(self) -> None:
        """Events go to the sink wired later; before that they are only logged."""
        from mailrelay.events.model import EventType
        from mailrelay.queue.wiring import LateEventSink
        from tests.test_queue_support import FakeEvents

        target: list[Any] = []
        late = LateEventSink(lambda: target[0] if target else None)
        event = Event(EventType.DELIVERED, 1.0, 7, "Q", recipient="a@example.net")
        late.emit(event)
        sink = FakeEvents()
        target.append(sink)
        late.emit(event)
        self.assertEqual(sink.events, [event])
