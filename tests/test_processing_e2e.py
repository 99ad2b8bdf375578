"""
End-to-end message processing: the real ``twistd mailrelay`` with the DNS
server and sink of ``tests.test_delivery_e2e``, looking at what arrives.

Mailtarget's cc/bcc/archive copies with the headers its page describes,
control headers stripped, click and open tracking, list addresses expanded
(once per member, suppressed members left out), DKIM checked by dkimpy and
by an independent implementation (Perl ``Mail::DKIM``, asking this
process's DNS server), and campaign attribution reaching the stored events.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import re
import shutil
import smtplib
import subprocess
from typing import Any

import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.storage.lists import TRANSACTIONAL_LIST
from tests.test_delivery_e2e import SENDER, RelayFixture, received, tls_context, until

LISTS = "lists.relay.test"
BASE = "http://relay.test:8080"

# Verifies the DKIM signature of the message on stdin with Mail::DKIM, looking
# the key up with Net::DNS at 127.0.0.1:<port> (the test's DNS server).
VERIFY_PL = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 1,
                                  udp_timeout => 3, tcp_timeout => 3, retry => 1);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\r?\n\z/\015\012/; $dkim->PRINT($_); }
$dkim->CLOSE;
print $dkim->result, "\n", ($dkim->result_detail // ''), "\n";
"""


def head_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n")[0]


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def addresses(msg: email.message.EmailMessage, name: str) -> list[str]:
    return [a.lower() for _, a in email.utils.getaddresses(msg.get_all(name) or [])]


class ProcessingTests(RelayFixture, TestCase):
    timeout = 90

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.prepare_all())

    async def prepare_all(self) -> None:
        await self.prepare()
        cls = type(self)
        if cls.__dict__.get("seeded"):
            return
        for name, value in self.world.dkim.items():
            self.world.zone[name.decode().rstrip(".")] = {"TXT": [value.decode()]}

        def seed() -> None:
            r = self.relay.mailrelay
            r("account", "create", "rival", stdin="rival-password\n")
            r("list", "create", "rival", "Theirs", "--guid", "l-rival")
            r("list", "create", "shop", "Members", "--guid", "l-members")
            r("list", "add", "shop", "l-members", "m1@example.net", "m2@example.net", "m3@example.net")
            r("suppression", "add", "shop", "m3@example.net", "--reason", "unsubscribe")
            r("campaign", "create", "shop", "Spring", "--guid", "c-spring")
            r("campaign", "create", "rival", "Theirs", "--guid", "c-rival")

        await deferToThread(seed)
        cls.seeded = True  # type: ignore[attr-defined]

    async def submit(self, rcpts: list[str], message: bytes) -> tuple[list[tuple[int, bytes]], tuple[int, bytes]]:
        """Every RCPT reply and the DATA reply (DATA only when a recipient was accepted)."""
        port = self.relay.port("submission")

        def go() -> tuple[list[tuple[int, bytes]], tuple[int, bytes]]:
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            try:
                client.starttls(context=tls_context())
                client.login("shop", "shop-password")
                client.mail(SENDER)
                replies = [client.rcpt(r) for r in rcpts]
                if not any(code == 250 for code, _ in replies):
                    client.rset()
                    return replies, (0, b"")
                client.putcmd("data")
                code, text = client.getreply()
                if code != 354:
                    return replies, (code, text)
                client.send(smtplib.quotedata(message.decode()).encode() + b"\r\n.\r\n")
                return replies, client.getreply()
            finally:
                client.quit()

        return await deferToThread(go)

    def message(self, to: str, subject: str, extra: str = "", body: str = "Hello.\r\n") -> bytes:
        return f"From: Shop <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n{body}".encode()

    async def test_mailtarget_copies(self) -> None:
        """
        X-MT-ATTR cc/bcc/archive: one copy per distinct address; every copy
        shows the Cc header with all cc addresses; a bcc copy has a Bcc
        header with only its own address; archive copies and the others
        have none; no control header reaches the sink.
        """
        attr = (
            '{"cc": ["cc1@example.net", "cc2@example.net"], "bcc": ["bcc1@example.net", "cc1@example.net"],'
            ' "archive": ["arch@example.net", "bcc1@example.net"]}'
        )
        extra = f"X-MT-ATTR: {attr}\r\nX-Mailrelay-Tags: copies\r\ncampaign_guid: c-spring\r\n"
        replies, (code, text) = await self.submit(["to1@example.net"], self.message("to1@example.net", "Copies", extra))
        self.assertEqual((code, replies[0][0]), (250, 250), text)
        everyone = ["to1@example.net", "cc1@example.net", "cc2@example.net", "bcc1@example.net", "arch@example.net"]
        await until(lambda: all(received(self.sink, r) for r in everyone), what="all five copies")
        await deferLater(reactor, 1.5, lambda: None)  # type: ignore[arg-type]  # a duplicate would have come by now
        for rcpt in everyone:
            copies = received(self.sink, rcpt)
            self.assertEqual(len(copies), 1, rcpt)
            self.assertEqual(copies[0].rcpt_to, [rcpt])
            msg = parsed(copies[0].data)
            self.assertEqual(addresses(msg, "To"), ["to1@example.net"], rcpt)
            self.assertEqual(addresses(msg, "Cc"), ["cc1@example.net", "cc2@example.net"], rcpt)
            self.assertEqual(addresses(msg, "Bcc"), ["bcc1@example.net"] if rcpt == "bcc1@example.net" else [], rcpt)
            head = head_of(copies[0].data).lower()
            for control in (b"x-mt-attr", b"x-mailrelay-", b"campaign_guid", b"mailing_list_id"):
                self.assertNotIn(control, head, rcpt)

    async def test_tracking(self) -> None:
        """With clickTracking and openTracking on, HTML links go through the tracking base URL and a pixel is added."""
        extra = (
            'X-MT-ATTR: {"options":{"clickTracking":true,"openTracking":true}}\r\n'
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
        )
        body = '<html><body><p>See <a href="https://shop.example.org/order/1">your order</a>.</p></body></html>\r\n'
        _, (code, text) = await self.submit(["track@example.net"], self.message("track@example.net", "Tr", extra, body))
        self.assertEqual(code, 250, text)
        copy = (await until(lambda: received(self.sink, "track@example.net"), what="the tracked copy"))[0]
        html = parsed(copy.data).get_body(("html",)).get_content()  # type: ignore[union-attr]
        links = re.findall(r'href="([^"]+)"', html)
        self.assertTrue(links)
        for link in links:
            self.assertTrue(link.startswith(BASE + "/c/"), link)
        self.assertNotIn("https://shop.example.org/order/1", html)
        self.assertRegex(html, r'<img src="' + re.escape(BASE) + r'/o/[^"]+"')
        self.assertNotIn(b"x-mt-attr", head_of(copy.data).lower())

    async def test_list_address(self) -> None:
        """
        A list address reaches each member once (also a member named as a
        direct recipient), never a suppressed member, and the list address
        itself is not delivered to; unknown or other accounts' lists get
        550 5.1.1 at RCPT.
        """
        rcpts = [f"l-members@{LISTS}", "m1@example.net", f"l-rival@{LISTS}", f"nope@{LISTS}"]
        replies, (code, text) = await self.submit(rcpts, self.message(f"Members <l-members@{LISTS}>", "News"))
        self.assertEqual([c for c, _ in replies], [250, 250, 550, 550])
        self.assertIn(b"5.1.1 No such list", replies[2][1])
        self.assertEqual(code, 250, text)
        await until(lambda: received(self.sink, "m1@example.net") and received(self.sink, "m2@example.net"))
        await deferLater(reactor, 1.5, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(len(received(self.sink, "m1@example.net")), 1)
        self.assertEqual(len(received(self.sink, "m2@example.net")), 1)
        self.assertEqual(received(self.sink, "m3@example.net"), [])
        self.assertFalse([m for m in self.sink.messages if any(r.endswith("@" + LISTS) for r in m.rcpt_to)])

    async def test_list_address_needs_auth(self) -> None:
        """Without AUTH (port 25) a list address is refused like any other relay attempt."""
        port = self.relay.port("smtp")

        def go() -> tuple[int, bytes]:
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            try:
                client.ehlo()
                client.mail(SENDER)
                return client.rcpt(f"l-members@{LISTS}")
            finally:
                client.quit()

        code, text = await deferToThread(go)
        self.assertEqual((code, text[:5]), (554, b"5.7.1"))

    async def test_unknown_campaign_and_list_refused(self) -> None:
        """Another account's campaign or list in a header: 550 5.6.0 naming the id and the header (not X-MT-ATTR)."""
        _, (code, text) = await self.submit(
            ["x@example.net"], self.message("x@example.net", "S", "campaign_guid: c-rival\r\n")
        )
        self.assertEqual((code, text), (550, b"5.6.0 Unknown campaign c-rival in campaign_guid header"))
        _, (code, text) = await self.submit(
            ["x@example.net"], self.message("x@example.net", "S", "X-Mailrelay-List: l-rival\r\n")
        )
        self.assertEqual((code, text), (550, b"5.6.0 Unknown list l-rival in X-Mailrelay-List header"))
        # X-MT-ATTR's campaign_id is a free label (Mailtarget, SparkPost): an unknown one is no error.
        _, (code, text) = await self.submit(
            ["y@example.net"], self.message("y@example.net", "S", 'X-MT-ATTR: {"campaign_id": "c-rival"}\r\n')
        )
        self.assertEqual(code, 250, text)
        self.assertEqual(received(self.sink, "x@example.net"), [])

    async def test_dkim_verifies_independently(self) -> None:
        """The delivered copy's DKIM signature verifies with dkimpy and with Perl Mail::DKIM over DNS."""
        if shutil.which("perl") is None or subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"]).returncode:
            if os.environ.get("CI"):  # in CI a missing verifier is a failure, never a skip
                self.fail("Perl Mail::DKIM is not installed (Debian: libmail-dkim-perl; .ci/run installs it)")
            raise SkipTest("Perl Mail::DKIM is not installed (Debian: libmail-dkim-perl)")
        _, (code, text) = await self.submit(["signed@example.net"], self.message("signed@example.net", "Signed"))
        self.assertEqual(code, 250, text)
        copy = (await until(lambda: received(self.sink, "signed@example.net"), what="the signed copy"))[0]
        self.assertTrue(dkim.verify(copy.data, dnsfunc=self.dnsfunc))
        port = str(self.world.dns_port)

        def perl() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(["perl", "-e", VERIFY_PL, port], input=copy.data, capture_output=True, timeout=30)

        done = await deferToThread(perl)
        self.assertEqual(done.stdout.split(b"\n")[0], b"pass", done.stdout + done.stderr)
        tampered = copy.data.replace(b"Hello.", b"Hullo.")
        done = await deferToThread(
            lambda: subprocess.run(["perl", "-e", VERIFY_PL, port], input=tampered, capture_output=True, timeout=30)
        )
        self.assertEqual(done.stdout.split(b"\n")[0], b"fail", done.stdout + done.stderr)

    async def test_campaign_in_events(self) -> None:
        """campaign_guid's campaign reaches the stored events; without it the Transactional Campaign does."""
        campaigns = await deferToThread(self.relay.mailrelay, "campaign", "list", "shop")
        spring = next(c for c in campaigns if c["guid"] == "c-spring")
        qid = await self.send(["ev1@example.net"], extra="campaign_guid: c-spring\r\n")
        events = await self.events_of(qid, {"queued", "delivered"})
        self.assertEqual({e["campaign_id"] for kind in events.values() for e in kind}, {spring["id"]})
        qid = await self.send(["ev2@example.net"], subject="No campaign")
        events = await self.events_of(qid, {"queued", "delivered"})
        campaigns = await deferToThread(self.relay.mailrelay, "campaign", "list", "shop")
        default = next(c for c in campaigns if c["name"] == "Transactional Campaign")
        self.assertEqual({e["campaign_id"] for kind in events.values() for e in kind}, {default["id"]})
        members: list[Any] = []
        for _ in range(40):  # membership adds are flushed about once a second
            shown = await deferToThread(self.relay.mailrelay, "list", "show", "shop", TRANSACTIONAL_LIST)
            members = [m["address"] for m in shown.get("members", [])]
            if "ev2@example.net" in members:
                break
            await deferLater(reactor, 0.25, lambda: None)  # type: ignore[arg-type]
        self.assertIn("ev2@example.net", members)
