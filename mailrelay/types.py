"""
Value types shared by every stage of the pipeline.

They are frozen attrs classes so a stage can hand one to the next without
worrying that it changes underneath.  Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen
class Reply:
    """
    One SMTP reply: a three-digit code, an RFC 3463 enhanced status code
    (empty when the reply has none, e.g. the greeting) and one or more lines
    of text that a person can understand.
    """

    code: int
    status: str
    text: str | tuple[str, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire, multi-line replies with ``-``."""
        lines = self.lines or ("",)
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            body = f"{self.status} {line}" if self.status else line
            out.append(f"{self.code}{sep}{body}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return " ".join(
            f"{self.code} {self.status} {line}" if self.status else f"{self.code} {line}"
            for line in self.lines
        )


class SMTPReplyError(Exception):
    """
    Raised (or errbacked) by a decision to refuse a command with ``reply``.

    ``close`` asks the protocol to close the connection after sending it
    (used for ``421`` replies).
    """

    def __init__(self, reply: Reply, close: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.close = close


def split_address(address: str) -> tuple[str, str]:
    """
    Split ``local@domain`` at its last ``@``; the domain is lowercased.

    The null reverse path ``""`` gives ``("", "")``.
    """
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain.lower()


def address_domain(address: str) -> str:
    return split_address(address)[1]


@attrs.frozen
class Principal:
    """
    Who a session authenticated as: the avatar of the credentials realm.

    ``account_id`` is the account that sends (a sub-account when the login
    named one); ``parent_id`` is its parent account, if any.  ``domain``
    restricts the From domain for per-domain credentials (generated SMTP
    users, domain API tokens).
    """

    account_id: int
    account_name: str
    credential_kind: str  # "password" | "smtp_user" | "api_token" | "api_key"
    credential_id: int | None = None
    parent_id: int | None = None
    scopes: frozenset[str] = frozenset()
    domain: str | None = None

    def __repr__(self) -> str:
        return (
            f"Principal(account={self.account_name!r}, id={self.account_id}, "
            f"kind={self.credential_kind}, credential={self.credential_id})"
        )


@attrs.frozen
class MailParams:
    """ESMTP parameters given with ``MAIL FROM``."""

    size: int | None = None
    body: str | None = None  # "7BIT" | "8BITMIME" | None
    smtputf8: bool = False


@attrs.frozen
class SessionInfo:
    """What is known about one SMTP connection, passed to every decision."""

    listener: str  # "smtp" | "submission" | "submissions"
    client_ip: str
    client_port: int
    server_hostname: str
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    principal: Principal | None = None


@attrs.frozen
class Envelope:
    """One SMTP transaction: reverse path, forward paths and parameters."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    params: MailParams = MailParams()

    def with_recipient(self, rcpt: str) -> Envelope:
        return attrs.evolve(self, rcpt_to=(*self.rcpt_to, rcpt))


def unique(items: Sequence[str]) -> tuple[str, ...]:
    """Items in first-seen order, case-insensitive duplicates removed."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = item.lower()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return tuple(out)
