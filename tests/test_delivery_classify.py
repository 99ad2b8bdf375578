"""Tests for mailrelay.delivery.classify: one table of real provider replies."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.delivery.classify import RULES, Rule, classify
from mailrelay.types import Reply

# (code, enhanced status, text, expected category) as providers send them.
CASES: list[tuple[int, str, str | tuple[str, ...], str]] = [
    # Gmail
    (
        550,
        "5.1.1",
        "The email account that you tried to reach does not exist. Please try double-checking "
        "the recipient's email address for typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser",
        "hard",
    ),
    (
        550,
        "5.2.1",
        "The email account that you tried to reach is disabled. https://support.google.com/mail/?p=DisabledUser",
        "hard",
    ),
    (552, "5.2.2", "The email account that you tried to reach is over quota and inactive.", "soft"),
    (
        452,
        "4.2.2",
        "The email account that you tried to reach is over quota. Please direct the recipient to "
        "https://support.google.com/mail/?p=OverQuotaTemp",
        "soft",
    ),
    (
        450,
        "4.2.1",
        "The user you are trying to contact is receiving mail at a rate that prevents additional "
        "messages from being delivered.",
        "soft",
    ),
    (
        550,
        "5.7.26",
        "This mail is unauthenticated, which poses a security risk to the sender and Gmail users, "
        "and has been blocked.",
        "block",
    ),
    (
        550,
        "5.7.1",
        "[192.0.2.1] Our system has detected that this message is likely unsolicited mail. To reduce "
        "the amount of spam sent to Gmail, this message has been blocked.",
        "block",
    ),
    (
        421,
        "4.7.28",
        "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from "
        "your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate "
        "limited.",
        "block",
    ),
    (421, "4.7.0", "[192.0.2.1] Try again later, closed connection.", "block"),
    (
        550,
        "5.7.25",
        "[192.0.2.1] The IP address sending this message does not have a PTR record setup, or the "
        "corresponding forward DNS entry does not point to the sending IP.",
        "block",
    ),
    # Outlook / Microsoft 365
    (550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302)", "hard"),
    (
        550,
        "5.4.1",
        "Recipient address rejected: Access denied. AS(201806281) [AM0PR01MB1234.eurprd01.prod.outlook.com]",
        "hard",
    ),
    (
        550,
        "5.7.606",
        "Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit "
        "https://sender.office.com/ and follow the directions.",
        "block",
    ),
    (
        550,
        "5.7.1",
        "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service "
        "provider since part of their network is on our block list (S3150).",
        "block",
    ),
    (451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77714)", "block"),
    (
        554,
        "5.2.2",
        "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
        "soft",
    ),
    (
        550,
        "5.7.509",
        "Access denied, sending domain example.com does not pass DMARC verification and has a DMARC policy of reject.",
        "block",
    ),
    # Yahoo / AOL
    (
        554,
        "",
        "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - "
        "mta1234.mail.ne1.yahoo.com",
        "hard",
    ),
    (
        554,
        "",
        "delivery error: dd Sorry your message to someone@aol.com cannot be delivered. This mailbox is "
        "disabled (554.30). - mta1234.mail.bf1.yahoo.com",
        "hard",
    ),
    (
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
        "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        "block",
    ),
    (
        553,
        "5.7.2",
        "[TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed. "
        "See https://postmaster.yahooinc.com/error-codes",
        "block",
    ),
    (554, "5.7.9", "Message not accepted for policy reasons. See https://postmaster.yahooinc.com/error-codes", "block"),
    (451, "", "Message temporarily deferred - [160]", "soft"),
    # Apple iCloud
    (550, "5.1.1", "<someone@icloud.com>: user does not exist", "hard"),
    (552, "5.2.2", "<someone@icloud.com>: user is over quota", "soft"),
    (
        554,
        "5.7.1",
        "[CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137",
        "block",
    ),
    (450, "4.2.1", "<someone@icloud.com>: mailbox temporarily disabled", "soft"),
    # Postfix defaults
    (550, "5.1.1", "<nobody@example.com>: Recipient address rejected: User unknown in local recipient table", "hard"),
    (
        554,
        "5.7.1",
        "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; "
        "https://www.spamhaus.org/query/ip/192.0.2.1",
        "block",
    ),
    (450, "4.7.1", "Client host rejected: cannot find your reverse hostname, [192.0.2.1]", "block"),
    (
        450,
        "4.2.0",
        "<someone@example.com>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/example.com.html",
        "soft",
    ),
    (454, "4.7.1", "<someone@example.net>: Relay access denied", "block"),
    (554, "5.7.1", "<someone@example.net>: Relay access denied", "hard"),
    (452, "4.2.2", "Mailbox full", "soft"),
    (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", "hard"),
    (556, "5.1.10", "Recipient address rejected: example.com has a null MX (accepts no mail)", "hard"),
    (
        550,
        "5.1.2",
        "Host or domain name not found. Name service error for name=example.invalid type=MX: Host not found",
        "hard",
    ),
    (553, "", "sorry, mailbox name not allowed (#5.7.1)", "hard"),
    # Exim defaults
    (550, "", "Unrouteable address", "hard"),
    (550, "", "No Such User Here", "hard"),
    (550, "", "rejected because 192.0.2.1 is in a black list at zen.spamhaus.org", "block"),
    (550, "", "Administrative prohibition", "block"),
    (550, "", ("Verification failed for <bounce@example.com>", "Unrouteable address", "Sender verify failed"), "block"),
    (451, "", "Temporary local problem - please try later", "soft"),
    # Proofpoint
    (554, "", "Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1", "block"),
    (550, "5.7.1", "Mail rejected by Proofpoint Essentials for policy reasons", "block"),
    (550, "5.1.1", "User Unknown", "hard"),
    # Mimecast
    (550, "", "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550 [abcdEFGH-1234]", "hard"),
    (
        550,
        "",
        "Rejected by header based Anti-Spoofing policy: someone@example.com - "
        "https://community.mimecast.com/docs/DOC-1369#550 [abcdEFGH-1234]",
        "block",
    ),
    (550, "", "Envelope blocked - User Entry - https://community.mimecast.com/docs/DOC-1369#550", "block"),
    (
        451,
        "",
        "Internal resources are temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451",
        "soft",
    ),
    # mailrelay's own synthetic replies
    (451, "4.4.1", "Connection refused by mx.example.com[192.0.2.1]", "soft"),
    (451, "4.7.5", "TLS handshake with mx.example.com[192.0.2.1] failed: unexpected eof", "block"),
    (552, "5.3.4", "Message size exceeds fixed limit of host mx.example.com[192.0.2.1] (1000 bytes)", "soft"),
    (554, "", "Transaction failed", "hard"),
]


class ClassifyTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Every real provider reply in the table gets the category a postmaster would give it."""
        self.assertGreaterEqual(len(CASES), 25)
        wrong = []
        for code, status, text, expected in CASES:
            got = classify(Reply(code, status, text))
            if got.category != expected:
                wrong.append((code, status, text, expected, got))
        self.assertEqual(wrong, [])

    def test_status_in_text(self) -> None:
        """An enhanced code left in the text counts as the status."""
        self.assertEqual(classify(Reply(550, "", "5.1.1 mailbox gone")).category, "hard")
        self.assertEqual(classify(Reply(550, "", "5.7.1 go away")).category, "block")

    def test_first_match_wins(self) -> None:
        """Rules apply in table order: a custom table puts its own rule first."""
        reply = Reply(550, "5.1.1", "User unknown")
        rules = (Rule("soft", "custom", text="unknown"), *RULES)
        self.assertEqual(classify(reply, rules).rule, "custom")
        self.assertEqual(classify(reply).category, "hard")

    def test_positive(self) -> None:
        """A positive reply is not a bounce."""
        self.assertEqual(classify(Reply(250, "2.0.0", "Ok")).rule, "not-a-bounce")

    def test_one_table(self) -> None:
        """Every category comes from the one RULES table."""
        self.assertEqual({r.category for r in RULES}, {"hard", "soft", "block"})
