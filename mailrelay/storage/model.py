"""Records read from storage: frozen attrs values, one per table row kind."""

from __future__ import annotations

import attrs


@attrs.frozen
class Account:
    id: int
    name: str
    parent_id: int | None
    parent_name: str | None
    approved: bool
    suspended: bool
    daily_quota: int | None
    rate_limit_per_minute: int | None
    notification_address: str | None
    header_text: str | None
    footer_text: str | None
    header_html: str | None
    footer_html: str | None
    open_tracking: bool
    click_tracking: bool
    unsubscribe_link: bool
    created_at: float

    @property
    def login(self) -> str:
        """The SMTP user name: ``name``, or ``parent\\name`` for a sub-account."""
        return f"{self.parent_name}\\{self.name}" if self.parent_name else self.name

    @property
    def can_send(self) -> bool:
        return self.approved and not self.suspended


@attrs.frozen
class SendingDomain:
    id: int
    account_id: int
    domain: str
    verified: bool
    dkim_selector: str
    dkim_private_key: str = attrs.field(repr=False)
    dkim_ed25519_key: str | None = attrs.field(repr=False)
    created_at: float
    verified_at: float | None
    dkim_signing: bool = True


@attrs.frozen
class Credential:
    id: int
    account_id: int
    kind: str  # smtp_user | api_token | api_key
    username: str | None
    scopes: frozenset[str]
    domain: str | None
    label: str | None
    created_at: float
    revoked_at: float | None
    last_used_at: float | None


@attrs.frozen
class LoginRecord:
    """What AUTH needs to know about one credential, in one read."""

    account_id: int
    account_name: str
    parent_id: int | None
    approved: bool
    suspended: bool
    kind: str  # password | smtp_user | api_token | api_key
    credential_id: int | None = None
    password_hash: str | None = attrs.field(default=None, repr=False)
    scopes: frozenset[str] = frozenset()
    domain: str | None = None
    username: str | None = None


@attrs.frozen
class MailingList:
    id: int
    account_id: int
    guid: str
    name: str
    created_at: float
    members: int = 0


@attrs.frozen
class ListMember:
    address: str
    name: str | None
    added_at: float


@attrs.frozen
class Campaign:
    id: int
    account_id: int
    guid: str
    name: str
    subject: str | None
    list_id: int | None
    created_at: float


@attrs.frozen
class Suppression:
    id: int
    account_id: int
    address: str
    scope: str
    reason: str
    detail: str | None
    created_at: float
    expires_at: float | None
