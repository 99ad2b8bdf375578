"""
The endpoints of ``/api/v1``: statistics, events, message history,
suppressions, lists, campaigns, sending domains, credentials, webhooks.

Every endpoint acts on the account that owns the API key, and needs one
scope (``mailrelay.storage.credentials.SCOPES``).  Another account's
objects answer 404, exactly like missing ones, so ids cannot be probed.
docs/openapi.yaml is the contract; tests/test_web_api.py checks each
response against it.
"""

from __future__ import annotations

import csv
import io
import secrets as stdlib_secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from mailrelay import secrets
from mailrelay.events.model import EventType
from mailrelay.events.queries import EventFilter, EventQueries, parse_types
from mailrelay.events.stats import KINDS, Stats
from mailrelay.events.webhooks import WebhookDispatcher
from mailrelay.processing import dkim
from mailrelay.storage.credentials import SCOPES
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.lists import normalise_address
from mailrelay.storage.model import Account, Campaign, Credential, MailingList, SendingDomain, Suppression
from mailrelay.storage.store import Store
from mailrelay.storage.suppressions import REASONS
from mailrelay.storage.webhooks import Webhook, WebhookAttempt, Webhooks, check_url
from mailrelay.web.api import (
    MAX_CSV_BODY,
    ApiError,
    Call,
    KeyAuthenticator,
    Response,
    Router,
    bad_request,
    encode_cursor,
    invalid,
    not_found,
    row_id,
)

MAX_IMPORT_ROWS = 10000
MAX_WEBHOOKS = 10
MAX_STATS_DAYS = 366
MAX_MEMBERS_PER_REQUEST = 1000
DomainRecords = Callable[[SendingDomain], Sequence[dkim.DNSRecord]]
KeyGenerator = Callable[[], Awaitable[bytes]]


@attrs.define
class ApiDeps:
    """Everything the endpoints use, passed in by ``make_site``."""

    store: Store
    webhooks: Webhooks
    stats: Stats
    events: EventQueries
    clock: IReactorTime
    authenticator: KeyAuthenticator
    domain_records: DomainRecords
    dkim_keygen: KeyGenerator | None = None
    dispatcher: WebhookDispatcher | None = None
    injection_user: str = "smtp_injection"
    allow_private_webhooks: bool = False


# ---------------------------------------------------------------------------
# Representations
# ---------------------------------------------------------------------------


def _suppression(s: Suppression) -> dict[str, Any]:
    return {
        "address": s.address,
        "scope": s.scope,
        "reason": s.reason,
        "detail": s.detail,
        "created_at": s.created_at,
        "expires_at": s.expires_at,
    }


def _list(m: MailingList) -> dict[str, Any]:
    return {"id": m.guid, "name": m.name, "members": m.members, "created_at": m.created_at}


def _campaign(c: Campaign, list_guids: dict[int, str]) -> dict[str, Any]:
    return {
        "id": c.guid,
        "name": c.name,
        "subject": c.subject,
        "list": list_guids.get(c.list_id) if c.list_id is not None else None,
        "created_at": c.created_at,
    }


def _credential(c: Credential) -> dict[str, Any]:
    return {
        "id": c.id,
        "kind": c.kind,
        "username": c.username,
        "domain": c.domain,
        "scopes": sorted(c.scopes),
        "label": c.label,
        "created_at": c.created_at,
        "last_used_at": c.last_used_at,
    }


def _webhook(w: Webhook, pending: int) -> dict[str, Any]:
    return {
        "id": w.id,
        "url": w.url,
        "event_types": sorted(w.event_types),
        "enabled": not w.failing,
        "failing": w.failing,
        "created_at": w.created_at,
        "pending_events": pending,
    }


def _attempt(a: WebhookAttempt) -> dict[str, Any]:
    return {"id": a.id, "ts": a.ts, "status": a.status, "error": a.error, "events": a.events, "ok": a.error is None}


def _page(data: list[Any], cursor: dict[str, Any] | None) -> Response:
    return Response(200, {"data": data, "next_cursor": encode_cursor(cursor) if cursor is not None else None})


def _csv_cell(value: object) -> str:
    """A CSV cell that a spreadsheet will not run as a formula (CWE-1236)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ---------------------------------------------------------------------------
# The endpoints
# ---------------------------------------------------------------------------


class ApiV1:
    def __init__(self, deps: ApiDeps) -> None:
        self.d = deps

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/me", None, self.me)
        r.add("GET", "/stats", "stats:read", self.stats)
        r.add("GET", "/stats/breakdown", "stats:read", self.breakdown)
        r.add("GET", "/events", "events:read", self.events)
        r.add("GET", "/messages/{queue_id}", "messages:read", self.message)
        r.add("GET", "/transmissions/{transmission_id}", "messages:read", self.transmission)
        r.add("GET", "/suppressions", "suppressions:read", self.list_suppressions)
        r.add("POST", "/suppressions", "suppressions:write", self.add_suppression)
        r.add("GET", "/suppressions/export", "suppressions:read", self.export_suppressions)
        r.add("POST", "/suppressions/import", "suppressions:write", self.import_suppressions)
        r.add("DELETE", "/suppressions/{address}", "suppressions:write", self.remove_suppression)
        r.add("GET", "/lists", "lists:read", self.lists)
        r.add("POST", "/lists", "lists:write", self.create_list)
        r.add("GET", "/lists/{list}", "lists:read", self.get_list)
        r.add("PATCH", "/lists/{list}", "lists:write", self.rename_list)
        r.add("DELETE", "/lists/{list}", "lists:write", self.delete_list)
        r.add("GET", "/lists/{list}/members", "lists:read", self.members)
        r.add("POST", "/lists/{list}/members", "lists:write", self.add_members)
        r.add("DELETE", "/lists/{list}/members/{address}", "lists:write", self.remove_member)
        r.add("GET", "/campaigns", "campaigns:read", self.campaigns)
        r.add("POST", "/campaigns", "campaigns:write", self.create_campaign)
        r.add("GET", "/campaigns/{campaign}", "campaigns:read", self.get_campaign)
        r.add("GET", "/domains", "domains:read", self.domains)
        r.add("POST", "/domains", "domains:write", self.add_domain)
        r.add("GET", "/domains/{domain}", "domains:read", self.get_domain)
        r.add("PATCH", "/domains/{domain}", "domains:write", self.update_domain)
        r.add("DELETE", "/domains/{domain}", "domains:write", self.remove_domain)
        r.add("GET", "/credentials", "credentials:write", self.credentials)
        r.add("POST", "/credentials", "credentials:write", self.create_credential)
        r.add("DELETE", "/credentials/{credential}", "credentials:write", self.revoke_credential)
        r.add("GET", "/webhooks", "webhooks:read", self.webhooks)
        r.add("POST", "/webhooks", "webhooks:write", self.create_webhook)
        r.add("GET", "/webhooks/{webhook}", "webhooks:read", self.get_webhook)
        r.add("PATCH", "/webhooks/{webhook}", "webhooks:write", self.update_webhook)
        r.add("DELETE", "/webhooks/{webhook}", "webhooks:write", self.delete_webhook)
        r.add("POST", "/webhooks/{webhook}/secret", "webhooks:write", self.rotate_webhook_secret)
        r.add("GET", "/webhooks/{webhook}/attempts", "webhooks:read", self.webhook_attempts)
        return r

    # -- the key itself ----------------------------------------------------------

    async def me(self, call: Call) -> Response:
        account = await self.d.store.accounts.by_id(call.account_id)
        return Response(
            200,
            {
                "account": {
                    "id": account.id,
                    "name": account.login,
                    "approved": account.approved,
                    "suspended": account.suspended,
                },
                "key_id": call.login.credential_id,
                "scopes": sorted(call.login.scopes),
            },
        )

    # -- statistics --------------------------------------------------------------

    def _range(self, call: Call) -> tuple[str, str]:
        today = time.strftime("%Y-%m-%d", time.gmtime(self.d.clock.seconds()))
        until = call.arg("until", today) or today
        default_since = time.strftime("%Y-%m-%d", time.gmtime(self.d.clock.seconds() - 29 * 86400))
        since = call.arg("since", default_since) or default_since
        for name, value in (("since", since), ("until", until)):
            try:
                time.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise bad_request(f"the query parameter {name!r} must be a day (YYYY-MM-DD)", "invalid_parameter")
        if since > until:
            raise bad_request("'since' is after 'until'", "invalid_parameter")
        span = time.mktime(time.strptime(until, "%Y-%m-%d")) - time.mktime(time.strptime(since, "%Y-%m-%d"))
        if span / 86400 >= MAX_STATS_DAYS:
            raise bad_request(f"the range is longer than {MAX_STATS_DAYS} days", "invalid_parameter")
        return since, until

    async def _campaign_id(self, call: Call, guid: str) -> int:
        return (await self.d.store.campaigns.get(call.account_id, guid)).id

    async def _subaccounts(self, call: Call) -> list[Account]:
        found = await self.d.store.accounts.list(parent=call.login.account_name)
        return [a for a in found if a.parent_id == call.account_id]

    async def _subaccount_id(self, call: Call, name: str) -> int:
        for child in await self._subaccounts(call):
            if child.parent_id == call.account_id and child.name == name:
                return child.id
        raise not_found(f"no sub-account {name!r} of this account")

    async def stats(self, call: Call) -> Response:
        since, until = self._range(call)
        campaign, tag, subaccount = call.arg("campaign"), call.arg("tag"), call.arg("subaccount")
        if len([x for x in (campaign, tag, subaccount) if x]) > 1:
            raise bad_request("filter by one of campaign, tag or subaccount at a time", "invalid_parameter")
        report = await self.d.stats.stats(
            call.account_id,
            since,
            until,
            campaign_id=await self._campaign_id(call, campaign) if campaign else None,
            tag=tag or None,
            subaccount_id=await self._subaccount_id(call, subaccount) if subaccount else None,
            by_day=call.bool_arg("by_day"),
        )
        totals = report.totals.as_dict()
        totals.pop("day", None)
        return Response(
            200,
            {
                "since": report.since,
                "until": report.until,
                "totals": totals,
                "days": [d.as_dict() for d in report.days],
            },
        )

    async def breakdown(self, call: Call) -> Response:
        since, until = self._range(call)
        kind = call.arg("by")
        if kind not in KINDS:
            raise bad_request(f"the query parameter 'by' must be one of {', '.join(KINDS)}", "invalid_parameter")
        found = await self.d.stats.breakdown(call.account_id, since, until, kind)
        names: dict[str, str] = {}
        if kind == "campaign":
            names = {str(c.id): c.guid for c in await self.d.store.campaigns.list(call.account_id)}
        elif kind == "subaccount":
            names = {str(a.id): a.name for a in await self._subaccounts(call)}
        rows = []
        for b in found:
            counts = b.counts.as_dict()
            counts.pop("day", None)
            rows.append({"key": names.get(b.key, b.key), **counts})
        return Response(200, {"since": since, "until": until, "by": kind, "data": rows})

    # -- events and message history ----------------------------------------------

    async def events(self, call: Call) -> Response:
        campaign = call.arg("campaign")
        try:
            types = parse_types(call.query.get("type", []))
        except ValueError as e:
            raise bad_request(str(e), "invalid_parameter")
        order = call.arg("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request("the query parameter 'order' must be asc or desc", "invalid_parameter")
        recipient = call.arg("recipient")
        where = EventFilter(
            account_id=call.account_id,
            types=types,
            recipient=recipient.lower() if recipient else None,
            campaign_id=await self._campaign_id(call, campaign) if campaign else None,
            tag=call.arg("tag"),
            since=call.float_arg("since"),
            until=call.float_arg("until"),
        )
        after = call.cursor_position("id")
        page = await self.d.events.find(where, cursor=after, limit=call.limit(), newest_first=order == "desc")
        return _page([e.to_json() for e in page.events], {"id": page.cursor} if page.cursor is not None else None)

    async def message(self, call: Call) -> Response:
        queue_id = call.params["queue_id"]
        found = await self.d.events.history(queue_id=queue_id, account_id=call.account_id)
        if not found:
            raise not_found("no message with this queue id in this account")
        return Response(200, {"queue_id": queue_id, "events": [e.to_json() for e in found]})

    async def transmission(self, call: Call) -> Response:
        transmission_id = call.params["transmission_id"]
        found = await self.d.events.history(transmission_id=transmission_id, account_id=call.account_id)
        if not found:
            raise not_found("no transmission with this id in this account")
        return Response(200, {"transmission_id": transmission_id, "events": [e.to_json() for e in found]})

    # -- suppressions ------------------------------------------------------------

    async def list_suppressions(self, call: Call) -> Response:
        reason = call.arg("reason")
        if reason is not None and reason not in REASONS:
            raise bad_request(f"the reason must be one of {', '.join(REASONS)}", "invalid_parameter")
        after = call.cursor_position("after") or 0
        limit = call.limit()
        found = await self.d.store.suppressions.list(call.account_id, reason=reason, limit=limit + 1, after_id=after)
        more = len(found) > limit
        found = found[:limit]
        return _page([_suppression(s) for s in found], {"after": found[-1].id} if more else None)

    async def _check_scope(self, call: Call, scope: str) -> str:
        """``account`` or ``list:<id or name>`` of this account, spelled with the list's id."""
        if scope == "account":
            return scope
        if not scope.startswith("list:") or len(scope) <= 5:
            raise invalid("the scope must be 'account' or 'list:<list id>'")
        found = await self.d.store.lists.get(call.account_id, scope[5:])
        return f"list:{found.guid}"

    async def add_suppression(self, call: Call) -> Response:
        body = call.body()
        body.only("address", "reason", "scope", "detail", "expires_at")
        address = body.text("address", required=True, max_length=320) or ""
        reason = body.text("reason") or "manual"
        if reason not in REASONS:
            raise invalid(f"the reason must be one of {', '.join(REASONS)}")
        scope = await self._check_scope(call, body.text("scope") or "account")
        added = await self.d.store.suppressions.add(
            call.account_id,
            address,
            reason,
            scope=scope,
            detail=body.text("detail", max_length=1000),
            expires_at=body.number("expires_at"),
        )
        return Response(201, _suppression(added))

    async def remove_suppression(self, call: Call) -> Response:
        scope = await self._check_scope(call, call.arg("scope", "account") or "account")
        await self.d.store.suppressions.remove(call.account_id, call.params["address"], scope)
        return Response(204)

    async def export_suppressions(self, call: Call) -> Response:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["address", "reason", "scope", "expires_at", "detail", "created_at"])
        after = 0
        while True:
            found = await self.d.store.suppressions.list(call.account_id, limit=1000, after_id=after)
            for s in found:
                writer.writerow(
                    [
                        _csv_cell(s.address),
                        s.reason,
                        _csv_cell(s.scope),
                        "" if s.expires_at is None else s.expires_at,
                        _csv_cell(s.detail),
                        s.created_at,
                    ]
                )
            if len(found) < 1000:
                break
            after = found[-1].id
        return Response(
            200,
            raw=out.getvalue().encode("utf-8"),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'},
        )

    async def import_suppressions(self, call: Call) -> Response:
        """
        CSV rows ``address[,reason[,scope[,expires_at[,detail]]]]`` (the
        export's columns), a header row optional.  Valid rows are added,
        invalid ones reported by line; nothing is all-or-nothing, so a
        re-import after fixing a line is harmless (adding is idempotent).
        """
        data = call.raw_body(MAX_CSV_BODY)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise bad_request("the CSV must be UTF-8", "invalid_csv")
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as e:
            raise bad_request(f"the body is not CSV: {e}", "invalid_csv")
        if rows and rows[0] and rows[0][0].strip().lower() == "address":
            rows = [[], *rows[1:]]  # keep line numbers
        if sum(1 for r in rows if r) > MAX_IMPORT_ROWS:
            raise ApiError(413, "too_many_rows", f"import at most {MAX_IMPORT_ROWS} rows per request")
        imported = 0
        errors: list[dict[str, Any]] = []
        scopes: dict[str, str] = {}
        for line, row in enumerate(rows, start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells):
                continue
            cells += [""] * (5 - len(cells))
            address, reason, scope, expires, detail = cells[:5]
            try:
                reason = reason or "manual"
                if reason not in REASONS:
                    raise StorageError(f"unknown reason {reason!r}")
                scope = scope.lstrip("'") or "account"
                if scope not in scopes:
                    try:
                        scopes[scope] = await self._check_scope(call, scope)
                    except NotFound:
                        raise StorageError(f"no list {scope[5:]!r} in this account")
                    except ApiError as e:
                        raise StorageError(e.message)
                expires_at = float(expires) if expires else None
                await self.d.store.suppressions.add(
                    call.account_id,
                    address.lstrip("'"),
                    reason,
                    scope=scopes[scope],
                    detail=detail.lstrip("'")[:1000] or None,
                    expires_at=expires_at,
                )
            except (StorageError, ValueError) as e:
                if len(errors) < 100:
                    errors.append({"line": line, "message": str(e)})
                continue
            imported += 1
        return Response(200, {"imported": imported, "errors": errors})

    # -- lists -------------------------------------------------------------------

    async def lists(self, call: Call) -> Response:
        return Response(
            200, {"data": [_list(m) for m in await self.d.store.lists.list(call.account_id)], "next_cursor": None}
        )

    async def create_list(self, call: Call) -> Response:
        body = call.body()
        body.only("name", "id")
        name = (body.text("name", required=True, max_length=200) or "").strip()
        guid = body.text("id", max_length=100)
        created = await self.d.store.lists.create(call.account_id, name, guid=guid)
        return Response(201, _list(created))

    async def get_list(self, call: Call) -> Response:
        return Response(200, _list(await self.d.store.lists.get(call.account_id, call.params["list"])))

    async def rename_list(self, call: Call) -> Response:
        body = call.body()
        body.only("name")
        name = body.text("name", required=True, max_length=200) or ""
        return Response(200, _list(await self.d.store.lists.rename(call.account_id, call.params["list"], name)))

    async def delete_list(self, call: Call) -> Response:
        await self.d.store.lists.delete(call.account_id, call.params["list"])
        return Response(204)

    async def members(self, call: Call) -> Response:
        found_list = await self.d.store.lists.get(call.account_id, call.params["list"])
        after = str((call.cursor() or {}).get("after", ""))
        limit = call.limit()
        found = await self.d.store.lists.members(found_list.id, limit=limit + 1, after=after)
        more = len(found) > limit
        found = found[:limit]
        return _page(
            [{"address": m.address, "name": m.name, "added_at": m.added_at} for m in found],
            {"after": found[-1].address} if more else None,
        )

    async def add_members(self, call: Call) -> Response:
        found_list = await self.d.store.lists.get(call.account_id, call.params["list"])
        body = call.body()
        body.only("addresses")
        addresses = body.strings("addresses", required=True, max_items=MAX_MEMBERS_PER_REQUEST) or []
        bad = []
        for a in addresses:
            try:
                normalise_address(a)
            except StorageError:
                bad.append(a)
        if bad:
            raise invalid(f"not an email address: {bad[0]!r}")
        added = await self.d.store.lists.add_members(found_list.id, addresses)
        return Response(
            200, {"added": added, "list": _list(await self.d.store.lists.get(call.account_id, found_list.guid))}
        )

    async def remove_member(self, call: Call) -> Response:
        found_list = await self.d.store.lists.get(call.account_id, call.params["list"])
        if not await self.d.store.lists.remove_members(found_list.id, [call.params["address"]]):
            raise not_found(f"{call.params['address']} is not a member of this list")
        return Response(204)

    # -- campaigns ---------------------------------------------------------------

    async def _list_guids(self, account_id: int) -> dict[int, str]:
        return {m.id: m.guid for m in await self.d.store.lists.list(account_id)}

    async def campaigns(self, call: Call) -> Response:
        guids = await self._list_guids(call.account_id)
        found = await self.d.store.campaigns.list(call.account_id)
        return Response(200, {"data": [_campaign(c, guids) for c in found], "next_cursor": None})

    async def create_campaign(self, call: Call) -> Response:
        body = call.body()
        body.only("name", "subject", "id", "list")
        name = (body.text("name", required=True, max_length=200) or "").strip()
        list_ref = body.text("list", max_length=200)
        list_id = (await self.d.store.lists.get(call.account_id, list_ref)).id if list_ref else None
        created = await self.d.store.campaigns.create(
            call.account_id,
            name,
            subject=body.text("subject", max_length=998),
            guid=body.text("id", max_length=100),
            list_id=list_id,
        )
        return Response(201, _campaign(created, await self._list_guids(call.account_id)))

    async def get_campaign(self, call: Call) -> Response:
        found = await self.d.store.campaigns.get(call.account_id, call.params["campaign"])
        return Response(200, _campaign(found, await self._list_guids(call.account_id)))

    # -- sending domains ---------------------------------------------------------

    def _domain(self, d: SendingDomain) -> dict[str, Any]:
        return {
            "domain": d.domain,
            "verified": d.verified,
            "verified_at": d.verified_at,
            "dkim_selector": d.dkim_selector,
            "dkim_signing": d.dkim_signing,
            "ed25519": d.dkim_ed25519_key is not None,
            "created_at": d.created_at,
            "dns_records": [
                {"name": r.name, "type": r.type, "value": r.value, "purpose": r.purpose}
                for r in self.d.domain_records(d)
            ],
        }

    async def _own_domain(self, call: Call, name: str) -> SendingDomain:
        try:
            found = await self.d.store.domains.get(name)
        except StorageError:  # NotFound, or not a domain name at all
            raise not_found(f"no sending domain {name} in this account")
        if found.account_id != call.account_id:
            raise not_found(f"no sending domain {name} in this account")
        return found

    async def domains(self, call: Call) -> Response:
        found = await self.d.store.domains.list(call.account_id)
        return Response(200, {"data": [self._domain(d) for d in found], "next_cursor": None})

    async def add_domain(self, call: Call) -> Response:
        body = call.body()
        body.only("domain", "selector", "ed25519")
        name = body.text("domain", required=True, max_length=253) or ""
        selector = body.text("selector", max_length=63) or "mr" + stdlib_secrets.token_hex(3)
        if not selector.replace("-", "").isalnum() or not selector.isascii():
            raise invalid("the selector may hold letters, digits and '-' only")
        if self.d.dkim_keygen is None:
            raise ApiError(501, "not_available", "this relay does not create domains through the API")
        rsa_key = (await self.d.dkim_keygen()).decode("ascii")
        ed_key = dkim.generate_ed25519_key().decode("ascii") if body.flag("ed25519") else None
        added = await self.d.store.domains.add(call.account_id, name, selector, rsa_key, ed_key)
        return Response(201, self._domain(added))

    async def get_domain(self, call: Call) -> Response:
        return Response(200, self._domain(await self._own_domain(call, call.params["domain"])))

    async def update_domain(self, call: Call) -> Response:
        found = await self._own_domain(call, call.params["domain"])
        body = call.body()
        body.only("dkim_signing")
        signing = body.flag("dkim_signing")
        if signing is not None:
            found = await self.d.store.domains.set_dkim_signing(found.domain, signing)
        return Response(200, self._domain(found))

    async def remove_domain(self, call: Call) -> Response:
        found = await self._own_domain(call, call.params["domain"])
        await self.d.store.domains.remove(found.domain)
        self.d.authenticator.forget_all()
        return Response(204)

    # -- credentials -------------------------------------------------------------

    async def credentials(self, call: Call) -> Response:
        kind = call.arg("kind")
        if kind is not None and kind not in ("smtp_user", "api_token", "api_key"):
            raise bad_request("the kind must be smtp_user, api_token or api_key", "invalid_parameter")
        found = await self.d.store.credentials.list(call.account_id, kind=kind)
        return Response(200, {"data": [_credential(c) for c in found], "next_cursor": None})

    async def create_credential(self, call: Call) -> Response:
        """
        A new secret, shown in this answer only.  A key can never create a
        credential with more power than itself: an API key's scopes must be
        a subset of the caller's, and SMTP credentials need ``smtp:send``.
        """
        body = call.body()
        body.only("kind", "domain", "scopes", "label")
        kind = body.text("kind", required=True)
        label = body.text("label", max_length=200)
        if kind in ("smtp_user", "api_token"):
            if "smtp:send" not in call.login.scopes:
                raise ApiError(403, "scope_escalation", "creating SMTP credentials needs the scope 'smtp:send'")
            domain = await self._own_domain(call, body.text("domain", required=True, max_length=253) or "")
            secret = secrets.new_secret(kind)
            username = secrets.new_username(domain.domain) if kind == "smtp_user" else None
            created = await self.d.store.credentials.create(
                call.account_id,
                kind,
                secrets.secret_hash(secret),
                username=username,
                scopes=["smtp:send"],
                domain_id=domain.id,
                label=label,
            )
            shown = {"username": username or secret, "password": secret}
        elif kind == "api_key":
            scopes = body.strings("scopes", required=True, max_items=len(SCOPES)) or []
            unknown = sorted(set(scopes) - SCOPES)
            if unknown or not scopes:
                raise invalid(f"unknown scope {unknown[0]!r}" if unknown else "give at least one scope")
            beyond = sorted(set(scopes) - call.login.scopes)
            if beyond:
                raise ApiError(
                    403, "scope_escalation", f"this API key cannot grant the scope {beyond[0]!r}, which it lacks itself"
                )
            secret = secrets.new_secret("api_key")
            created = await self.d.store.credentials.create(
                call.account_id, "api_key", secrets.secret_hash(secret), scopes=scopes, label=label
            )
            shown = {"key": secret}
            if "smtp:send" in created.scopes:
                shown["smtp_username"] = self.d.injection_user
        else:
            raise invalid("the kind must be smtp_user, api_token or api_key")
        return Response(201, {**_credential(created), "secret": shown})

    async def revoke_credential(self, call: Call) -> Response:
        ident = row_id(call.params["credential"])
        if ident is None:
            raise not_found("no credential with this id")
        await self.d.store.credentials.revoke(call.account_id, credential_id=ident)
        self.d.authenticator.forget_all()
        return Response(204)

    # -- webhooks ----------------------------------------------------------------

    def _pending(self, webhook_id: int) -> int:
        return self.d.dispatcher.pending(webhook_id) if self.d.dispatcher is not None else 0

    def _changed(self, account_id: int) -> None:
        if self.d.dispatcher is not None:
            self.d.dispatcher.invalidate(account_id)

    async def _own_webhook(self, call: Call) -> Webhook:
        ident = row_id(call.params["webhook"])
        if ident is None:
            raise not_found("no webhook with this id")
        return await self.d.webhooks.get(call.account_id, ident)

    def _event_types(self, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        unknown = sorted(set(values) - set(_EVENT_TYPES))
        if unknown:
            raise invalid(f"unknown event type {unknown[0]!r}; known types: {', '.join(_EVENT_TYPES)}")
        return values

    def _url(self, url: str) -> str:
        try:
            return check_url(url, allow_private=self.d.allow_private_webhooks)
        except StorageError as e:
            raise invalid(str(e), "invalid_url")

    async def webhooks(self, call: Call) -> Response:
        found = await self.d.webhooks.list(call.account_id)
        return Response(200, {"data": [_webhook(w, self._pending(w.id)) for w in found], "next_cursor": None})

    async def create_webhook(self, call: Call) -> Response:
        body = call.body()
        body.only("url", "event_types")
        url = self._url(body.text("url", required=True, max_length=2000) or "")
        types = self._event_types(body.strings("event_types", max_items=len(_EVENT_TYPES), max_length=40)) or []
        if len(await self.d.webhooks.list(call.account_id)) >= MAX_WEBHOOKS:
            raise Conflict(f"an account has at most {MAX_WEBHOOKS} webhooks")
        secret = "whsec_" + stdlib_secrets.token_urlsafe(32)
        created = await self.d.webhooks.create(call.account_id, url, secret, types)
        self._changed(call.account_id)
        return Response(201, {**_webhook(created, 0), "secret": secret})

    async def get_webhook(self, call: Call) -> Response:
        found = await self._own_webhook(call)
        return Response(200, _webhook(found, self._pending(found.id)))

    async def update_webhook(self, call: Call) -> Response:
        found = await self._own_webhook(call)
        body = call.body()
        body.only("url", "event_types", "enabled")
        url = body.text("url", max_length=2000)
        enabled = body.flag("enabled")
        updated = await self.d.webhooks.update(
            call.account_id,
            found.id,
            url=self._url(url) if url is not None else None,
            event_types=self._event_types(body.strings("event_types", max_items=len(_EVENT_TYPES), max_length=40)),
            failing=None if enabled is None else not enabled,
        )
        self._changed(call.account_id)
        return Response(200, _webhook(updated, self._pending(updated.id)))

    async def delete_webhook(self, call: Call) -> Response:
        found = await self._own_webhook(call)
        await self.d.webhooks.delete(call.account_id, found.id)
        self._changed(call.account_id)
        return Response(204)

    async def rotate_webhook_secret(self, call: Call) -> Response:
        found = await self._own_webhook(call)
        secret = "whsec_" + stdlib_secrets.token_urlsafe(32)
        updated = await self.d.webhooks.update(call.account_id, found.id, secret=secret)
        self._changed(call.account_id)
        return Response(200, {**_webhook(updated, self._pending(updated.id)), "secret": secret})

    async def webhook_attempts(self, call: Call) -> Response:
        found = await self._own_webhook(call)
        before = call.cursor_position("before")
        limit = call.limit()
        attempts = await self.d.webhooks.attempts(call.account_id, found.id, limit=limit + 1, before_id=before)
        more = len(attempts) > limit
        attempts = attempts[:limit]
        return _page([_attempt(a) for a in attempts], {"before": attempts[-1].id} if more else None)


_EVENT_TYPES = tuple(t.value for t in EventType)
