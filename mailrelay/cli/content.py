"""``mailrelay list|campaign|suppression ...``: recipients and attribution."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from mailrelay.cli.main import CLIError, Context, table
from mailrelay.storage.suppressions import REASONS


def register(nouns: Any) -> None:
    lst = nouns.add_parser("list", help="mailing lists and their members")
    lv = lst.add_subparsers(dest="verb_name", metavar="VERB", required=True)
    c = lv.add_parser("create", help="create a list")
    c.add_argument("account")
    c.add_argument("name")
    c.add_argument("--guid", help="the list id (default: a new UUID)")
    c.set_defaults(verb=create_list)
    for name, verb, text in (("add", add_members, "add members"), ("remove", remove_members, "remove members")):
        p = lv.add_parser(name, help=text + " (addresses as arguments, or '-' to read one per line from stdin)")
        p.add_argument("account")
        p.add_argument("list", help="list id or name")
        p.add_argument("addresses", nargs="+")
        p.set_defaults(verb=verb)
    s = lv.add_parser("show", help="show one list with its members, or every list of the account")
    s.add_argument("account")
    s.add_argument("list", nargs="?", help="list id or name")
    s.set_defaults(verb=show_list)

    camp = nouns.add_parser("campaign", help="campaigns that collect statistics")
    cv = camp.add_subparsers(dest="verb_name", metavar="VERB", required=True)
    c = cv.add_parser("create", help="create a campaign")
    c.add_argument("account")
    c.add_argument("name")
    c.add_argument("--subject", help="messages with exactly this subject count for this campaign")
    c.add_argument("--guid", help="the campaign id (default: a new UUID)")
    c.add_argument("--list", help="the list its recipients join (id or name)")
    c.set_defaults(verb=create_campaign)
    ls = cv.add_parser("list", help="list campaigns")
    ls.add_argument("account")
    ls.set_defaults(verb=list_campaigns)

    sup = nouns.add_parser("suppression", help="addresses an account does not mail")
    sv = sup.add_subparsers(dest="verb_name", metavar="VERB", required=True)
    a = sv.add_parser("add", help="suppress an address")
    a.add_argument("account")
    a.add_argument("address")
    a.add_argument("--reason", choices=REASONS, default="manual")
    a.add_argument("--scope", default="account", help="'account' (default) or 'list:<list id>'")
    a.add_argument("--expires", help="when it lapses: a number of days, or an ISO date/time (UTC)")
    a.add_argument("--detail")
    a.set_defaults(verb=add_suppression)
    r = sv.add_parser("remove", help="remove a suppression")
    r.add_argument("account")
    r.add_argument("address")
    r.add_argument("--scope", default="account")
    r.set_defaults(verb=remove_suppression)
    ls = sv.add_parser("list", help="list suppressions")
    ls.add_argument("account")
    ls.add_argument("--reason", choices=REASONS)
    ls.set_defaults(verb=list_suppressions)


def _addresses(ctx: Context) -> list[str]:
    found: list[str] = []
    for item in ctx.args.addresses:
        if item == "-":
            found.extend(line.strip() for line in ctx.stdin if line.strip())
        else:
            found.append(item)
    return found


async def create_list(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    created = await ctx.store.lists.create(account.id, ctx.args.name, guid=ctx.args.guid)
    ctx.emit(created, [f"list {created.name!r} created, id {created.guid}",
                       f"  send to it: {created.guid}@{ctx.config.domains.lists_domain}"])


async def add_members(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    target = await ctx.store.lists.get(account.id, ctx.args.list)
    added = await ctx.store.lists.add_members(target.id, _addresses(ctx))
    ctx.emit({"list": target.guid, "added": added}, f"added {added} new member(s) to {target.name!r}")


async def remove_members(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    target = await ctx.store.lists.get(account.id, ctx.args.list)
    removed = await ctx.store.lists.remove_members(target.id, _addresses(ctx))
    ctx.emit({"list": target.guid, "removed": removed}, f"removed {removed} member(s) from {target.name!r}")


async def show_list(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    if ctx.args.list is None:
        found = await ctx.store.lists.list(account.id)
        ctx.emit(found, table([(x.guid, x.name, x.members) for x in found], ["ID", "NAME", "MEMBERS"]))
        return
    target = await ctx.store.lists.get(account.id, ctx.args.list)
    members = await ctx.store.lists.members(target.id)
    data = {"list": target, "members": members}
    ctx.emit(data, [f"list {target.name!r} id {target.guid}: {target.members} member(s)"] +
             [f"  {m.address}" for m in members])


async def create_campaign(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    list_id = (await ctx.store.lists.get(account.id, ctx.args.list)).id if ctx.args.list else None
    created = await ctx.store.campaigns.create(account.id, ctx.args.name, subject=ctx.args.subject,
                                               guid=ctx.args.guid, list_id=list_id)
    ctx.emit(created, [f"campaign {created.name!r} created, id {created.guid}",
                       f"  header to use it: campaign_guid: {created.guid}"])


async def list_campaigns(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    found = await ctx.store.campaigns.list(account.id)
    ctx.emit(found, table([(c.guid, c.name, c.subject or "") for c in found], ["ID", "NAME", "SUBJECT"]))


def parse_expiry(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    try:
        days = float(value)
    except ValueError:
        pass
    else:
        if days <= 0:
            raise CLIError("--expires must be a positive number of days or a date")
        return now + days * 86400
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise CLIError(f"--expires: not a number of days nor an ISO date: {value!r}")
    if when.tzinfo is None:
        from datetime import UTC

        when = when.replace(tzinfo=UTC)
    return when.timestamp()


async def add_suppression(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    expires = parse_expiry(ctx.args.expires, time.time())
    s = await ctx.store.suppressions.add(account.id, ctx.args.address, ctx.args.reason, scope=ctx.args.scope,
                                         detail=ctx.args.detail, expires_at=expires)
    ctx.emit(s, f"suppressed {s.address} ({s.reason}, scope {s.scope})")


async def remove_suppression(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    await ctx.store.suppressions.remove(account.id, ctx.args.address, scope=ctx.args.scope)
    ctx.emit({"address": ctx.args.address, "removed": True}, f"{ctx.args.address} is no longer suppressed")


async def list_suppressions(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    found = await ctx.store.suppressions.list(account.id, reason=ctx.args.reason)

    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "never"

    ctx.emit(found, table([(s.address, s.reason, s.scope, when(s.expires_at), s.detail or "") for s in found],
                          ["ADDRESS", "REASON", "SCOPE", "EXPIRES", "DETAIL"]))
