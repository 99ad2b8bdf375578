"""
End-to-end feedback: bounces and complaints coming back to the VERP
return path of a delivered message, through the real ``twistd mailrelay``.

A message to two recipients is delivered to the sink; each copy carries
its own VERP return path.  The test then plays the receiving systems: over
the ``smtp`` listener (port 25 mode, no AUTH) it returns a DSN for one
copy and an ARF complaint for the other, and checks the events and the
suppression list.  Mail to the bounce domain that is neither a VERP address
nor one of its fixed mailboxes (fbl, postmaster, abuse), and mail for other
domains, must be refused at RCPT.
"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.test_delivery_e2e import SENDER, RelayFixture, received, until

DSN = """\
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
To: {verp}
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUND"

--BOUND
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered.

--BOUND
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: User unknown

--BOUND
Content-Type: text/rfc822-headers

From: Shop <{sender}>
To: {rcpt}
Subject: Order 1

--BOUND--
"""

ARF = """\
From: feedback@example.net
To: {verp}
Subject: Complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="BOUND"

--BOUND
Content-Type: text/plain; charset=us-ascii

This is an email abuse report.

--BOUND
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
Original-Mail-From: <{verp}>
Original-Rcpt-To: <{rcpt}>
Reported-Domain: example.com

--BOUND
Content-Type: message/rfc822

Return-Path: <{verp}>
From: Shop <{sender}>
To: {rcpt}
Subject: Order 1

Thank you for your order.

--BOUND--
"""


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


class FeedbackTests(RelayFixture, TestCase):
    """DSNs and ARF reports on the smtp listener become events and suppressions."""

    timeout = 90

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.prepare())

    def inbound(self, rcpt: str, data: bytes | None = None) -> tuple[int, bytes]:
        """One message from ``<>`` to ``rcpt`` on the smtp listener: the RCPT reply, or DATA's when accepted."""
        client = smtplib.SMTP("127.0.0.1", self.relay.port("smtp"), timeout=30)
        try:
            client.ehlo("mx.example.net")
            client.mail("<>")
            code, text = client.rcpt(rcpt)
            if code != 250 or data is None:
                return code, text
            return client.data(data)
        finally:
            client.quit()

    async def test_bounce_and_complaint(self) -> None:
        """A DSN and an ARF report to VERP return paths: 250, bounced (hard) and complained, both suppressed."""
        bounced, complained = "fb-hank@example.net", "fb-iris@example.net"
        qid = await self.send([bounced, complained])
        await until(lambda: received(self.sink, bounced) and received(self.sink, complained), what="both copies")
        # The recipients rows (VERP index -> address) are written in batches after delivery.
        await self.events_of(qid, {"delivered"})
        await deferLater(reactor, 1.5, lambda: None)  # type: ignore[arg-type]
        verp = {r: received(self.sink, r)[0].mail_from for r in (bounced, complained)}
        self.assertNotEqual(verp[bounced], verp[complained])
        self.assertTrue(all(v.endswith("@bounces.relay.test") for v in verp.values()), verp)

        fields = {"sender": SENDER}
        # A bounce whose From has no domain and which has a line that is not a field: the header policy is for
        # senders, not for reports, so it is taken and read all the same.
        dsn = DSN.format(verp=verp[bounced], rcpt=bounced, **fields).replace(
            "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)",
            "From: Mail Delivery System <MAILER-DAEMON>\nnot a field",
        )
        code, text = await deferToThread(self.inbound, verp[bounced], crlf(dsn))
        self.assertEqual(code, 250, text)
        # Feedback loops send to the one address registered with them; Original-Mail-From names the copy.
        code, text = await deferToThread(
            self.inbound, "fbl@bounces.relay.test", crlf(ARF.format(verp=verp[complained], rcpt=complained, **fields))
        )
        self.assertEqual(code, 250, text)

        events = await self.events_of(qid, {"bounced", "complained"})
        self.assertEqual(
            [(e["recipient"], e["detail"].get("class")) for e in events.get("bounced", [])], [(bounced, "hard")]
        )
        self.assertEqual([e["recipient"] for e in events.get("complained", [])], [complained])

        async def suppressions() -> dict[str, str]:
            listed: list[dict[str, Any]] = await deferToThread(self.relay.mailrelay, "suppression", "list", "shop")
            return {s["address"]: s["reason"] for s in listed}

        found: dict[str, str] = {}
        for _ in range(40):
            found = await suppressions()
            if bounced in found and complained in found:
                break
            await deferLater(reactor, 0.2, lambda: None)  # type: ignore[arg-type]
        self.assertEqual((found.get(bounced), found.get(complained)), ("hard_bounce", "complaint"))

    async def test_recipients(self) -> None:
        """
        fbl@, postmaster@ and abuse@ the bounce domain and a bare <postmaster> (RFC 5321 section 4.5.1) are
        taken; another address on the bounce domain gets 550 5.1.1, another domain 554 5.7.1 (no open relay).
        """
        for rcpt in ("fbl@bounces.relay.test", "Postmaster@bounces.relay.test", "abuse@bounces.relay.test",
                     "postmaster"):
            code, text = await deferToThread(self.inbound, rcpt)
            self.assertEqual((code, text[:5]), (250, b"2.1.5"), rcpt)
        code, text = await deferToThread(self.inbound, "nobody@bounces.relay.test")
        self.assertEqual((code, text[:5]), (550, b"5.1.1"))
        code, text = await deferToThread(self.inbound, "someone@elsewhere.example")
        self.assertEqual((code, text[:5]), (554, b"5.7.1"))
