"""
Bounce classification: what a failed or deferred reply says about the
recipient, in one table.

- ``hard``: the mailbox or domain is dead; suppress the address.
- ``soft``: a passing state of the mailbox (full, disabled for now) or any
  other temporary failure; retry, do not suppress.
- ``block``: the receiver refuses *us* (reputation, policy, blocklists,
  authentication, rate limits); the address may be fine, so never suppress
  it, but tell the operator.

Rules are tried in order and the first match wins, so the specific ones
(greylisting, mailbox full, provider block codes) come before the broad
fallbacks by enhanced status class.  Texts are matched case-insensitively
against all lines of the reply joined by spaces.
"""

from __future__ import annotations

import re
from typing import Literal

import attrs

from mailrelay.types import Reply

Category = Literal["hard", "soft", "block"]


@attrs.frozen
class Rule:
    """
    One row: ``codes`` matches the three-digit code, ``status`` the
    enhanced status code, ``text`` the text (each a regex, ``None`` for
    any); all given parts must match.
    """

    category: Category
    name: str
    codes: str | None = None
    status: str | None = None
    text: str | None = None

    def matches(self, code: str, status: str, text: str) -> bool:
        return (
            (self.codes is None or re.fullmatch(self.codes, code) is not None)
            and (self.status is None or re.fullmatch(self.status, status) is not None)
            and (self.text is None or re.search(self.text, text, re.I) is not None)
        )


@attrs.frozen
class Classification:
    category: Category
    rule: str


_STATUS_IN_TEXT = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")
_5 = r"5\d\d"
_4 = r"4\d\d"

RULES: tuple[Rule, ...] = (
    # Temporary by nature, whatever else the text says.
    Rule("soft", "greylisting", text=r"grey ?list|gray ?list|greylisted"),
    Rule("soft", "mailbox-temporarily-disabled", text=r"temporar(il)?y (disabled|suspended|inactive)"),
    # The MX does not serve the domain: mail to this address cannot arrive.
    Rule("hard", "relay-denied", codes=_5, text=r"relay access denied|relaying denied|relay not permitted"),
    # Mailbox full / over quota.
    Rule("soft", "mailbox-full", status=r"[45]\.2\.2"),
    Rule("soft", "mailbox-full", text=r"mailbox (is )?full|over ?quota|quota exceeded|insufficient (system )?storage"),
    Rule("soft", "recipient-rate", status=r"4\.2\.1", text=r"receiving mail at a rate"),
    # The receiver refuses the sender: reputation, policy, authentication.
    Rule("block", "dns-blocklist", text=r"spamhaus|spamcop|barracuda|sorbs|\bsurbl\b|\buceprotect"),
    Rule("block", "blocklist", text=r"block ?list|black ?list|\bdnsbl\b|\brbl\b|(?<!not )listed (at|on|in)"),
    Rule("block", "blocked", text=r"\bblocked\b|\bbanned\b|\bblacklisted\b|denied by policy"),
    Rule("block", "microsoft-banned-ip", status=r"5\.7\.6\d\d"),
    Rule("block", "yahoo-tss", text=r"\[TSS?\d\d\]"),
    Rule("block", "apple-cs", text=r"\[CS\d\d\]"),
    Rule("block", "spam", text=r"\bspam\b|unsolicited|bulk mail|junk mail"),
    Rule("block", "authentication", text=r"unauthenticated|\bdmarc\b|\bspf\b|\bdkim\b|not authorized to send"),
    Rule("block", "authentication", status=r"5\.7\.2[3-9]|5\.7\.509"),
    Rule("block", "reverse-dns", text=r"reverse (dns|hostname)|\bptr\b|rdns"),
    Rule("block", "rate-limit", text=r"rate.?limit|too many (messages|connections|recipients)|unusual rate"),
    Rule("block", "reputation", text=r"reputation|low sender score|complaints"),
    Rule("block", "busy-try-later", codes=r"421", status=r"4\.7\.\d+"),
    Rule("block", "server-busy", status=r"4\.7\.500|4\.7\.650"),
    Rule("block", "sender-rejected", text=r"sender (address )?(rejected|verify failed)|sender verification"),
    Rule("block", "policy", text=r"policy|prohibit|not accepted for policy|anti-?spoof"),
    # Dead mailbox or domain.
    Rule("hard", "user-unknown", codes=_5, status=r"5\.1\.[0136]"),
    Rule("hard", "bad-domain", codes=_5, status=r"5\.1\.2|5\.1\.10|5\.4\.4|5\.4\.1"),
    Rule("hard", "mailbox-disabled", codes=_5, status=r"5\.2\.1"),
    Rule(
        "hard",
        "user-unknown",
        codes=_5,
        status=r"|5\.[0-6]\.\d+",
        text=r"user unknown|unknown user|no such (user|mailbox|recipient)|does ?n[o']t exist|"
        r"mailbox (unavailable|not found|disabled|is disabled)|invalid (recipient|mailbox|address)|"
        r"recipient (address )?rejected|address rejected|unrouteable|unroutable|not a valid mailbox|"
        r"mailbox name not allowed|doesn't have a .* account|account (is )?(disabled|inactive|closed)|"
        r"no mailbox|user not found",
    ),
    # Fallbacks by class.
    Rule("block", "policy-status", status=r"[45]\.7\.\d+"),
    Rule("soft", "temporary", codes=_4),
    Rule("soft", "message-too-big", status=r"5\.[23]\.4|5\.3\.4|5\.2\.3"),
    Rule("hard", "permanent", codes=_5),
)


def classify(reply: Reply, rules: tuple[Rule, ...] = RULES) -> Classification:
    """
    The category of ``reply``.  A positive reply is not a bounce and comes
    back as ``soft``/``not-a-bounce`` so callers need no special case.
    """
    if reply.is_positive:
        return Classification("soft", "not-a-bounce")
    code = str(reply.code)
    text = " ".join(reply.lines)
    status = reply.status
    if not status:
        # Some callers keep the enhanced code in the text.
        m = _STATUS_IN_TEXT.match(text)
        if m and m.group(1)[0] == code[0]:
            status = m.group(1)
    for rule in rules:
        if rule.matches(code, status, text):
            return Classification(rule.category, rule.name)
    return Classification("soft", "unmatched")
