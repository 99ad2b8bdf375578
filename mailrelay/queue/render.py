"""
From the stored original to the bytes one recipient receives, at delivery
time.

The spool keeps one copy of each message; every delivery attempt renders
the recipient's copy from it (``mailrelay.processing.mime.render``: control
headers stripped, Cc/Bcc copy headers, Message-ID and Date when missing,
header/footer, open and click tracking, List-Unsubscribe), signs it with
the From domain's DKIM key as the very last step, and picks a VERP return
path that names the message and the recipient.

Everything that decides the bytes is stored with the message (queue id,
acceptance time, control headers, recipient index) or is a setting
(tracking defaults, decoration, keys), so a retry renders the same bytes as
the first attempt as long as the account's settings do not change in
between: the Message-ID and Date come from the queue id and the acceptance
time, the DKIM ``t=`` is the acceptance time, and the tokens are HMACs.

Account and domain settings are read through a ``Directory`` and cached
for a minute, so a busy queue costs the database one read per account and
domain per minute, not one per message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IReactorTime

from mailrelay.policy.directory import TTLCache
from mailrelay.processing.controls import ControlAttributes, RecipientCopy
from mailrelay.processing.dkim import DKIMError, DKIMSigner
from mailrelay.processing.headers import line_ending, message_date
from mailrelay.processing.mime import Decoration, RenderRequest, Tracking, render
from mailrelay.processing.tokens import TokenSigner, verp_address
from mailrelay.spool.model import SpooledMessage
from mailrelay.types import address_domain

# ---------------------------------------------------------------------------
# What the renderer needs to know about accounts and domains
# ---------------------------------------------------------------------------


@attrs.frozen
class AccountInfo:
    """The account settings that shape delivery: defaults for tracking, decoration, where notices go."""

    id: int
    open_tracking: bool = False
    click_tracking: bool = False
    unsubscribe_link: bool = False
    notification_address: str | None = None
    decoration: Decoration | None = None


@attrs.frozen
class DomainInfo:
    """
    A sending domain: is it verified, its DKIM keys, whether mailrelay signs
    its mail (``dkim_signing``: off when the application signs itself) and
    its own header/footer.
    """

    domain: str
    verified: bool
    selector: str
    private_key: str = attrs.field(repr=False)
    ed25519_key: str | None = attrs.field(default=None, repr=False)
    decoration: Decoration | None = None
    account_id: int | None = None
    dkim_signing: bool = True

    @property
    def signs(self) -> bool:
        """Whether copies from this domain get mailrelay's DKIM signature: verified and not switched off."""
        return self.verified and self.dkim_signing


class Directory(Protocol):
    """Account, domain and suppression facts, from storage (``StoreDirectory``) or a test's fake."""

    async def account(self, account_id: int) -> AccountInfo | None: ...

    async def sending_domain(self, domain: str) -> DomainInfo | None: ...

    async def suppressed(
        self, account_id: int, addresses: Iterable[str], list_guid: str | None
    ) -> Mapping[str, str]: ...

    async def suppress(
        self, account_id: int, address: str, reason: str, detail: str | None, expires_at: float | None
    ) -> None: ...


def decoration_of(
    text_header: str | None, text_footer: str | None, html_header: str | None, html_footer: str | None
) -> Decoration | None:
    """A ``Decoration`` when any of the four is set, else None."""
    if not (text_header or text_footer or html_header or html_footer):
        return None
    return Decoration(text_header or "", text_footer or "", html_header or "", html_footer or "")


class StoreDirectory:
    """
    ``Directory`` over ``mailrelay.storage.store.Store``.  Sending domains'
    header/footer columns are read with one query of their own because the
    storage record (``SendingDomain``) does not carry them.
    """

    def __init__(self, store: Any, clock: IReactorTime, ttl: float = 60.0) -> None:
        from mailrelay.storage.suppressions import CoalescedChecks

        self._store = store
        self._accounts: TTLCache[int, AccountInfo | None] = TTLCache(clock, ttl, self._load_account, 10_000)
        self._domains: TTLCache[str, DomainInfo | None] = TTLCache(clock, ttl, self._load_domain, 10_000)
        # Never cached (a suppression must take effect at once), but the checks of the
        # messages that become ready together go to the database as one query.
        self._suppression_checks = CoalescedChecks(store.suppressions, clock)

    # Both run for every message: a fresh entry is answered without awaiting another coroutine.

    async def account(self, account_id: int) -> AccountInfo | None:
        hit = self._accounts.fresh(account_id)
        return hit[0] if hit is not None else await self._accounts.get(account_id)

    async def sending_domain(self, domain: str) -> DomainInfo | None:
        key = domain.lower()
        hit = self._domains.fresh(key)
        return hit[0] if hit is not None else await self._domains.get(key)

    async def _load_account(self, account_id: int) -> AccountInfo | None:
        from mailrelay.storage.errors import NotFound

        try:
            a = await self._store.accounts.by_id(account_id)
        except NotFound:
            info = None
        else:
            info = AccountInfo(
                id=a.id,
                open_tracking=a.open_tracking,
                click_tracking=a.click_tracking,
                unsubscribe_link=a.unsubscribe_link,
                notification_address=a.notification_address or None,
                decoration=decoration_of(a.header_text, a.footer_text, a.header_html, a.footer_html),
            )
        return info

    async def _load_domain(self, key: str) -> DomainInfo | None:
        from mailrelay.storage.errors import NotFound, StorageError

        try:
            d = await self._store.domains.get(key)
        except (NotFound, StorageError):
            info = None
        else:
            decoration = None
            try:
                rows = await self._store.pool.execute(
                    "queue_domain_decoration",
                    "SELECT header_text, footer_text, header_html, footer_html FROM sending_domains WHERE id = ?",
                    (d.id,),
                )
                if rows:
                    decoration = decoration_of(*rows[0])
            except Exception:
                decoration = None
            info = DomainInfo(
                domain=d.domain,
                verified=d.verified,
                selector=d.dkim_selector,
                private_key=d.dkim_private_key,
                ed25519_key=d.dkim_ed25519_key,
                decoration=decoration,
                account_id=d.account_id,
                dkim_signing=d.dkim_signing,
            )
        return info

    def forget_all(self) -> None:
        """Drop every cached account and domain (another process changed them: ``ChangeWatcher``)."""
        self._accounts.clear()
        self._domains.clear()

    async def suppressed(self, account_id: int, addresses: Iterable[str], list_guid: str | None) -> Mapping[str, str]:
        found = await self._suppression_checks.suppressed(account_id, addresses, list_guid)
        return {address: s.reason for address, s in found.items()}

    async def suppress(
        self, account_id: int, address: str, reason: str, detail: str | None, expires_at: float | None
    ) -> None:
        await self._store.suppressions.add(account_id, address, reason, detail=detail, expires_at=expires_at)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@attrs.frozen
class RenderSettings:
    hostname: str
    bounce_domain: str
    tracking_base_url: str


@attrs.frozen
class Prepared:
    """
    Everything about one message that rendering its copies needs, looked up
    once per delivery pass: the settings in force and the DKIM signer.
    """

    queue_id: str
    account_id: int | None
    mail_from: str
    recipients: tuple[str, ...]
    received_at: float
    message_id: str
    date: str
    dsn: bool
    controls: ControlAttributes
    roles: Mapping[str, str]
    decoration: Decoration | None
    opens: bool
    clicks: bool
    unsubscribe: bool
    notification_address: str | None
    dkim: DKIMSigner | None = attrs.field(eq=False, repr=False)

    @property
    def varies_per_recipient(self) -> bool:
        """
        Whether copies for different recipients differ (VERP, tracking
        tokens, a Bcc copy header): then each recipient needs a transaction
        of its own.  Only copies that are byte-identical may share one.
        """
        return bool(self.mail_from) or self.tracked or any(r == "bcc" for r in self.roles.values())

    @property
    def tracked(self) -> bool:
        return self.account_id is not None and (self.opens or self.clicks or self.unsubscribe)


def message_id_for(queue_id: str, received_at: float, hostname: str) -> str:
    """The Message-ID given to a message that came without one: stable for the queue id."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(received_at))
    return f"<{stamp}.{queue_id}@{hostname}>"


def _flag(said: Any, default: bool) -> bool:
    return bool(default if said is None else said)


class Renderer:
    """
    Renders recipients' copies.  One per process: it keeps one
    ``DKIMSigner`` per sending domain (keys are parsed once, and again
    only when the stored key changes).
    """

    def __init__(self, directory: Directory, secret: bytes, settings: RenderSettings) -> None:
        self._directory = directory
        self._secret = secret
        self.settings = settings
        self.signer = TokenSigner(secret)
        self._dkim: dict[str, tuple[bytes, DKIMSigner | None]] = {}

    async def prepare(self, message: SpooledMessage) -> Prepared:
        """Look up what this message's copies depend on (may fail if storage is down: retry later)."""
        env = message.envelope
        account_id = env.get("account_id")
        dsn = bool(env.get("dsn"))
        received_at = float(env.get("received_at") or message.created)
        controls = ControlAttributes() if dsn else ControlAttributes.from_json(env.get("controls") or {})
        account = await self._directory.account(account_id) if account_id is not None else None
        from_domain = address_domain(str(env.get("from") or ""))
        domain = await self._directory.sending_domain(from_domain) if from_domain else None
        decoration = None
        if not dsn:
            decoration = (domain.decoration if domain is not None else None) or (
                account.decoration if account is not None else None
            )
        return Prepared(
            queue_id=message.queue_id,
            account_id=account_id,
            mail_from=str(env.get("mail_from") or ""),
            recipients=message.recipients,
            received_at=received_at,
            message_id=env.get("message_id") or message_id_for(message.queue_id, received_at, self.settings.hostname),
            date=message_date(received_at),
            dsn=dsn,
            controls=controls,
            roles=dict(env.get("roles") or {}),
            decoration=decoration,
            opens=not dsn and _flag(controls.open_tracking, account.open_tracking if account else False),
            clicks=not dsn and _flag(controls.click_tracking, account.click_tracking if account else False),
            unsubscribe=not dsn and _flag(controls.unsubscribe, account.unsubscribe_link if account else False),
            notification_address=account.notification_address if account else None,
            dkim=self._signer(domain) if domain is not None and domain.signs else None,
        )

    def _signer(self, domain: DomainInfo) -> DKIMSigner | None:
        material = hashlib.sha256(
            "\0".join([domain.selector, domain.private_key, domain.ed25519_key or ""]).encode("utf-8")
        ).digest()
        cached = self._dkim.get(domain.domain)
        if cached is not None and cached[0] == material:
            return cached[1]
        signer: DKIMSigner | None
        try:
            signer = DKIMSigner(
                domain.domain,
                domain.selector,
                domain.private_key.encode("ascii"),
                domain.ed25519_key.encode("ascii") if domain.ed25519_key else None,
            )
        except (DKIMError, ValueError, UnicodeError) as e:
            # A broken key must not stop the mail; it goes unsigned and the log says why.
            from twisted.logger import Logger

            Logger().error("cannot use the DKIM key of {domain}: {error}", domain=domain.domain, error=str(e))
            signer = None
        self._dkim[domain.domain] = (material, signer)
        return signer

    def return_path(self, prepared: Prepared, recipient: str) -> str:
        """The envelope sender of one copy: a VERP address, or the null sender for notices."""
        if not prepared.mail_from:
            return ""
        index = prepared.recipients.index(recipient)
        return verp_address(prepared.queue_id, index, self.settings.bounce_domain, self._secret)

    def render(self, prepared: Prepared, original: bytes, recipient: str) -> tuple[str, bytes]:
        """``(envelope sender, message bytes)`` of ``recipient``'s copy.  CPU only; no I/O."""
        mail_from = self.return_path(prepared, recipient)
        if prepared.dsn:
            data = original
        else:
            index = prepared.recipients.index(recipient)
            tracking = None
            if prepared.tracked and prepared.account_id is not None:
                tracking = Tracking(
                    base_url=self.settings.tracking_base_url,
                    signer=self.signer,
                    account_id=prepared.account_id,
                    queue_id=prepared.queue_id,
                    recipient=index,
                    opens=prepared.opens,
                    clicks=prepared.clicks,
                    unsubscribe=prepared.unsubscribe,
                )
            role: Any = prepared.roles.get(recipient, "to")
            request = RenderRequest(
                copy=RecipientCopy(recipient, role),
                controls=prepared.controls,
                message_id=prepared.message_id,
                date=prepared.date,
                decoration=prepared.decoration,
                tracking=tracking,
            )
            data = render(original, request)
        if prepared.dkim is not None:
            data = prepared.dkim.sign(data, now=prepared.received_at, linesep=line_ending(data)) + data
        return mail_from, data
