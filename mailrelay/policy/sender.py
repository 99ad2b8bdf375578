"""
Who may send what: pure decisions at the end of DATA, before the 250.

Each function returns normally when the message may go on and raises
``SMTPReplyError`` with the precise reply when it may not.
"""

from __future__ import annotations

import enum

from mailrelay.policy.directory import AccountFacts
from mailrelay.types import Principal, Reply, SMTPReplyError

ACCOUNT_NOT_ALLOWED = Reply(550, "5.7.1", "Account is not allowed to send")


class Route(enum.Enum):
    """What happens to an accepted message."""

    DELIVER = "deliver"
    SANDBOX = "sandbox"  # processed and recorded, never delivered


def check_account(account: AccountFacts | None) -> AccountFacts:
    """The sending account exists, is approved and is not suspended (nor is its parent)."""
    if account is None or not account.can_send:
        raise SMTPReplyError(ACCOUNT_NOT_ALLOWED)
    return account


def unconfigured(domain: str) -> SMTPReplyError:
    # Mailtarget's wording, so clients migrating from it see the same reply.
    return SMTPReplyError(Reply(550, "5.7.1", f"Unconfigured Sending Domain <{domain}>"))


def domain_matches(domain: str, verified: str) -> bool:
    """``domain`` is ``verified`` or one of its subdomains."""
    return domain == verified or domain.endswith("." + verified)


def check_from_domain(principal: Principal, from_domain: str, verified: frozenset[str],
                      sandbox_domain: str) -> Route:
    """
    The From header's domain must be a verified sending domain of the
    account (or a subdomain of one), or the sandbox domain.  Credentials
    bound to one domain (generated SMTP users, API tokens) send only from it.
    """
    domain = from_domain.lower().rstrip(".")
    if sandbox_domain and domain == sandbox_domain:
        return Route.SANDBOX
    if principal.domain is not None and not domain_matches(domain, principal.domain):
        raise unconfigured(domain)
    if not any(domain_matches(domain, v) for v in verified):
        raise unconfigured(domain)
    return Route.DELIVER
