"""
Campaign and list attribution of a transactional send, and list addresses.

Moosend's rules (``shared/seeds/000_*``) are the specification:

- the campaign is the one named by ``campaign_guid`` (or
  ``X-Mailrelay-Campaign``), which must be a campaign of the sending
  account; else the account's campaign whose subject equals the message's
  subject; else the account's "Transactional Campaign", created on first use;
- the list is the one named by ``mailing_list_id`` (or ``X-Mailrelay-List``),
  which must be a list of the account; else the list of a message sent to a
  list address; else the list connected to the campaign; else the account's
  "Transactional Campaign Recipients" list, created on first use;
- the recipients (to, cc, bcc; not archive copies, which are the sender's
  own records) are added to that list.

The accept path must not wait on the database for every message, so the
campaigns of an account are read once into an index kept for ``ttl``
seconds, and lists are cached per reference the same way.  A reference not
in the cache is looked up once more before the message is refused, so a
campaign or list created a moment ago is usable at once; unknown
references are never cached.

Membership adds are collected in memory and written in one batch per list
every ``flush_interval`` seconds, off the accept path.  A crash loses at most
the adds of the last interval: the messages themselves are safe in the
spool, and a list of recipients is a convenience, not a delivery record.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailrelay.policy.directory import TTLCache
from mailrelay.storage.campaigns import TRANSACTIONAL_CAMPAIGN
from mailrelay.storage.errors import NotFound, StorageError
from mailrelay.storage.lists import TRANSACTIONAL_LIST
from mailrelay.storage.model import Campaign, MailingList
from mailrelay.storage.store import Store
from mailrelay.types import Reply, SMTPReplyError

log = Logger()

#: The most members a list address may expand to; beyond it the message is
#: refused rather than half-sent (a bulk campaign belongs in a campaign tool).
MAX_LIST_EXPANSION = 100_000

#: How many members are read per query while expanding a list.
_PAGE = 10_000

NO_SUCH_LIST = Reply(550, "5.1.1", "No such list")


class UnknownCampaign(SMTPReplyError):
    """The campaign header names no campaign of this account: ``550 5.6.0``."""

    def __init__(self, ref: str, header: str) -> None:
        super().__init__(Reply(550, "5.6.0", f"Unknown campaign {_printable(ref)} in {header} header"))


class UnknownList(SMTPReplyError):
    """The list header names no list of this account: ``550 5.6.0``."""

    def __init__(self, ref: str, header: str) -> None:
        super().__init__(Reply(550, "5.6.0", f"Unknown list {_printable(ref)} in {header} header"))


def list_too_big(guid: str, limit: int) -> Reply:
    """The reply when a list address would expand beyond ``limit`` members."""
    return Reply(550, "5.5.3", f"Too many recipients: list {_printable(guid)} has more than {limit} members")


def no_deliverable_members(guid: str) -> Reply:
    """The reply when a list address leaves no one to send to (empty, or everyone suppressed)."""
    return Reply(550, "5.1.1", f"No deliverable recipients: list {_printable(guid)} has no members to send to")


def _printable(text: str, limit: int = 80) -> str:
    cleaned = "".join(ch if ch.isascii() and ch.isprintable() and ch != " " else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


@attrs.frozen
class Attributed:
    """Where a message's statistics and recipients go."""

    campaign_id: int
    campaign_guid: str
    list_id: int
    list_guid: str


@attrs.frozen
class _CampaignIndex:
    """The campaigns of one account, indexed the ways attribution looks them up."""

    by_guid: dict[str, Campaign]
    by_subject: dict[str, Campaign]
    transactional: Campaign | None


class Attribution:
    """
    Campaign/list attribution and list expansion for one process, with the
    caches and the membership batch they share.  ``stop()`` writes the
    pending membership adds (wire it into the shutdown steps).
    """

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        ttl: float = 30.0,
        flush_interval: float = 1.0,
        max_list_members: int = MAX_LIST_EXPANSION,
    ) -> None:
        self._store = store
        self._clock = clock
        self._flush_interval = flush_interval
        self.max_list_members = max_list_members
        self._campaigns: TTLCache[int, _CampaignIndex] = TTLCache(clock, ttl, self._load_campaigns)
        self._lists: TTLCache[tuple[int, str], MailingList | None] = TTLCache(clock, ttl, self._load_list)
        self._lists_by_id: TTLCache[tuple[int, int], MailingList | None] = TTLCache(clock, ttl, self._load_list_id)
        self._transactional_lists: TTLCache[int, MailingList] = TTLCache(clock, ttl, self._load_transactional_list)
        self._pending: dict[int, set[str]] = {}
        self._timer: IDelayedCall | None = None
        self._flushing: Deferred[int] | None = None

    # -- loading -------------------------------------------------------------

    async def _load_campaigns(self, account_id: int) -> _CampaignIndex:
        campaigns = await self._store.campaigns.list(account_id)  # ordered by id: the oldest wins a subject
        by_subject: dict[str, Campaign] = {}
        transactional = None
        for c in campaigns:
            if c.subject is not None:
                by_subject.setdefault(c.subject, c)
            if c.name == TRANSACTIONAL_CAMPAIGN and transactional is None:
                transactional = c
        return _CampaignIndex({c.guid: c for c in campaigns}, by_subject, transactional)

    async def _load_list(self, key: tuple[int, str]) -> MailingList | None:
        try:
            return await self._store.lists.get(*key)
        except NotFound:
            return None

    async def _load_list_id(self, key: tuple[int, int]) -> MailingList | None:
        try:
            return await self._store.lists.by_id(*key)
        except NotFound:
            return None

    async def _load_transactional_list(self, account_id: int) -> MailingList:
        return await self._store.lists.get_or_create(account_id, TRANSACTIONAL_LIST)

    # -- lookups -------------------------------------------------------------

    async def _campaign(self, account_id: int, guid: str) -> Campaign | None:
        index = await self._campaigns.get(account_id)
        found = index.by_guid.get(guid)
        if found is None:
            # Perhaps created since the index was read: read it again once.
            self._campaigns.invalidate(account_id)
            index = await self._campaigns.get(account_id)
            found = index.by_guid.get(guid)
        return found

    async def _transactional_campaign(self, account_id: int) -> Campaign:
        index = await self._campaigns.get(account_id)
        if index.transactional is not None:
            return index.transactional
        campaign = await self._store.campaigns.named(account_id, TRANSACTIONAL_CAMPAIGN)
        self._campaigns.invalidate(account_id)
        return campaign

    async def mailing_list(self, account_id: int, ref: str) -> MailingList | None:
        """A list of this account by guid (or name); ``None`` when there is none.  Unknown refs are not cached."""
        found = await self._lists.get((account_id, ref))
        if found is None:
            self._lists.invalidate((account_id, ref))
        return found

    async def list_address(self, account_id: int, local_part: str) -> MailingList | None:
        """The list a ``<guid>@<lists domain>`` recipient names, if it is one of this account's."""
        found = await self.mailing_list(account_id, local_part)
        if found is None and local_part != local_part.lower():
            found = await self.mailing_list(account_id, local_part.lower())
        return found

    async def attribute(
        self,
        account_id: int,
        subject: str | None,
        campaign: tuple[str, str] | None = None,
        mailing_list: tuple[str, str] | None = None,
        expanded: MailingList | None = None,
    ) -> Attributed:
        """
        Decide the campaign and the list of one message.  ``campaign`` and
        ``mailing_list`` are ``(reference, header name)`` from the control
        headers; ``expanded`` the list of a list address the message was
        sent to.  Raises ``UnknownCampaign``/``UnknownList``.
        """
        chosen: Campaign | None = None
        if campaign is not None:
            chosen = await self._campaign(account_id, campaign[0])
            if chosen is None:
                raise UnknownCampaign(*campaign)
        elif subject:
            chosen = (await self._campaigns.get(account_id)).by_subject.get(subject)
        if chosen is None:
            chosen = await self._transactional_campaign(account_id)

        target: MailingList | None = None
        if mailing_list is not None:
            target = await self.mailing_list(account_id, mailing_list[0])
            if target is None:
                raise UnknownList(*mailing_list)
        elif expanded is not None:
            target = expanded
        elif chosen.list_id is not None:
            key = (account_id, chosen.list_id)
            target = await self._lists_by_id.get(key)
            if target is None:
                self._lists_by_id.invalidate(key)
        if target is None:
            target = await self._transactional_lists.get(account_id)
        return Attributed(chosen.id, chosen.guid, target.id, target.guid)

    async def expand(self, account_id: int, mailing_list: MailingList) -> list[str]:
        """
        The members of a list to send to: suppressed members (account scope
        or this list's) left out.  Raises ``SMTPReplyError`` with
        ``list_too_big`` when the list has more than ``max_list_members``.
        Not cached: a member removed or suppressed a moment ago must not be
        mailed.
        """
        limit = self.max_list_members
        members: list[str] = []
        after = ""
        while True:
            page = await self._store.lists.members(
                mailing_list.id, limit=min(_PAGE, limit + 1 - len(members)), after=after
            )
            members.extend(m.address for m in page)
            if len(members) > limit:
                raise SMTPReplyError(list_too_big(mailing_list.guid, limit))
            if not page or len(members) == limit + 1 or len(page) < _PAGE:
                break
            after = page[-1].address
        suppressed = await self._store.suppressions.suppressed(account_id, members, mailing_list.guid)
        return [m for m in members if m not in suppressed]

    # -- membership ------------------------------------------------------------

    def remember(self, list_id: int, addresses: Iterable[str]) -> None:
        """Add ``addresses`` to the list at the next flush (within ``flush_interval`` seconds)."""
        pending = self._pending.setdefault(list_id, set())
        pending.update(a.lower() for a in addresses)
        if not pending:
            del self._pending[list_id]
            return
        if self._timer is None:
            self._timer = self._clock.callLater(self._flush_interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._flushing = Deferred.fromCoroutine(self.flush())

    async def flush(self) -> int:
        """Write every pending membership add now; returns how many addresses were new members."""
        pending, self._pending = self._pending, {}
        added = 0
        for list_id, addresses in pending.items():
            try:
                added += await self._store.lists.add_members(list_id, addresses)
            except StorageError:
                # One bad address must not lose the others: add them one by one.
                for address in addresses:
                    try:
                        added += await self._store.lists.add_members(list_id, [address])
                    except StorageError:
                        continue
            except Exception:
                log.failure(
                    "attribution: cannot add {n} member(s) to list {list_id}", n=len(addresses), list_id=list_id
                )
        return added

    async def stop(self) -> None:
        """Cancel the timer and write what is pending (a clean shutdown loses nothing)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._flushing is not None:
            await self._flushing
            self._flushing = None
        await self.flush()
