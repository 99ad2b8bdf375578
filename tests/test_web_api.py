"""
The JSON API over a real store (SQLite and PostgreSQL), through StubTreq;
every answer is validated against docs/openapi.yaml by ``Web.call``.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any
from urllib.parse import quote

from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.events.model import Event, EventType
from mailrelay.events.sink import EventSink
from mailrelay.storage.credentials import SCOPES
from mailrelay.web.api import MAX_JSON_BODY, encode_cursor
from mailrelay.web.api_v1 import ApiV1
from tests.test_web_support import SpecMismatch, Web, check_response, check_schema, spec


class OpenAPIFileTests(SynchronousTestCase):
    def test_spec_is_valid(self) -> None:
        """docs/openapi.yaml is a valid OpenAPI 3.1 document."""
        validate(spec())

    def test_routes_match_spec(self) -> None:
        """Every route is documented with its scope, and every documented operation has a route."""
        router = ApiV1.__new__(ApiV1).router()
        routes = {(r.method.lower(), r.path): r.scope for r in router.routes}
        documented = {}
        for path, item in spec()["paths"].items():
            for method, operation in item.items():
                if method in ("get", "post", "put", "patch", "delete"):
                    documented[(method, path)] = operation.get("x-scope")
        self.assertEqual(routes, documented)

    def test_checker_rejects_undocumented(self) -> None:
        """The response checker fails on an undocumented status and on a body off the schema."""
        with self.assertRaises(SpecMismatch):
            check_response("GET", "/me", 418, "application/json", b"{}")
        with self.assertRaises(SpecMismatch):
            check_response("GET", "/me", 200, "application/json", b'{"account": 1}')
        check_response("GET", "/me", 401, "application/json", b'{"error": {"code": "missing_api_key", "message": "x"}}')


class ApiTestsMixin:
    engine: str

    async def web(self, **options: Any) -> Web:
        return await Web.create(self, self.engine, **options)  # type: ignore[arg-type]

    # -- authentication and errors --------------------------------------------------

    async def test_authentication(self) -> None:
        """No key or a wrong key: 401 with WWW-Authenticate; a key lacking the scope: 403."""
        web = await self.web()
        t: Any = self
        no_key = await web.call("GET", "/me", key="")
        t.assertEqual(no_key.status, 401)
        t.assertEqual(no_key.json()["error"]["code"], "missing_api_key")
        t.assertIn("Bearer", no_key.header("www-authenticate"))
        wrong = await web.call("GET", "/me", key="mrk_nope")
        t.assertEqual(wrong.json()["error"]["code"], "invalid_api_key")
        t.assertEqual(web.metrics.auth_failures.labels(mechanism="api_key")._value.get(), 1)
        basic = await web.call("GET", "/me", headers={"Authorization": ["Basic Zm9vOmJhcg=="]})
        t.assertEqual(basic.status, 401)
        reader = await web.new_key(web.account_id, ["stats:read"])
        me = await web.call("GET", "/me", key=reader)
        t.assertEqual(me.status, 200)
        t.assertEqual(me.json()["scopes"], ["stats:read"])
        t.assertEqual(me.json()["account"]["name"], "shop")
        denied = await web.call("GET", "/suppressions", key=reader)
        t.assertEqual(denied.status, 403)
        t.assertEqual(denied.json()["error"]["code"], "missing_scope")
        t.assertIn("suppressions:read", denied.json()["error"]["message"])

    async def test_unknown_endpoint_and_method(self) -> None:
        """An unknown path is a JSON 404; a known path with another method is 405 with Allow."""
        web = await self.web()
        t: Any = self
        missing = await web.request("GET", "/api/v1/nothing", headers={"Authorization": [f"Bearer {web.key}"]})
        t.assertEqual(missing.status, 404)
        t.assertEqual(missing.json()["error"]["code"], "not_found")
        wrong = await web.request("PUT", "/api/v1/lists", headers={"Authorization": [f"Bearer {web.key}"]})
        t.assertEqual(wrong.status, 405)
        t.assertEqual(wrong.header("allow"), "GET, POST")

    async def test_bad_bodies(self) -> None:
        """Broken JSON is 400, a non-object 400, an unknown field 422, a too large body 413."""
        web = await self.web()
        t: Any = self
        broken = await web.call("POST", "/suppressions", raw=b"{nope", headers={"Content-Type": ["application/json"]})
        t.assertEqual((broken.status, broken.json()["error"]["code"]), (400, "invalid_json"))
        array = await web.call("POST", "/suppressions", [1, 2])
        t.assertEqual((array.status, array.json()["error"]["code"]), (400, "invalid_json"))
        unknown = await web.call("POST", "/suppressions", {"address": "a@example.com", "colour": "red"})
        t.assertEqual((unknown.status, unknown.json()["error"]["code"]), (422, "unknown_field"))
        missing = await web.call("POST", "/suppressions", {})
        t.assertEqual((missing.status, missing.json()["error"]["code"]), (422, "missing_field"))
        big = await web.call(
            "POST",
            "/suppressions",
            raw=b"{" + b" " * MAX_JSON_BODY + b"}",
            headers={"Content-Type": ["application/json"]},
        )
        t.assertEqual((big.status, big.json()["error"]["code"]), (413, "body_too_large"))
        bad_limit = await web.call("GET", "/suppressions?limit=100000")
        t.assertEqual((bad_limit.status, bad_limit.json()["error"]["code"]), (400, "invalid_parameter"))
        bad_cursor = await web.call("GET", "/suppressions?cursor=%%%")
        t.assertEqual((bad_cursor.status, bad_cursor.json()["error"]["code"]), (400, "invalid_cursor"))

    async def test_forged_cursors_and_ids(self) -> None:
        """
        A cursor is sent back by the client, so a made-up one (a position too big for a database integer, a
        string, a list, a boolean) is 400 invalid_cursor, and an id no row can have is 404: never a 500.
        """
        web = await self.web()
        t: Any = self
        hook = (await web.call("POST", "/webhooks", {"url": "https://hooks.example.com/x"})).json()
        paths = {"/suppressions": "after", "/events": "id", f"/webhooks/{hook['id']}/attempts": "before"}
        for path, key in paths.items():
            for value in (10**30, 2**63, -1, "12", [1], True, 1.5):
                got = await web.call("GET", f"{path}?cursor={encode_cursor({key: value})}")
                t.assertEqual((got.status, got.json()["error"]["code"]), (400, "invalid_cursor"), (path, value))
            t.assertEqual((await web.call("GET", f"{path}?cursor={encode_cursor({key: 2**63 - 1})}")).status, 200)
        for ident in ("99999999999999999999999", str(2**63), "\u00b2", "\u0663", "-1", "1e3"):
            for method, path in (("DELETE", f"/credentials/{ident}"), ("GET", f"/webhooks/{ident}")):
                got = await web.call(method, quote(path))
                t.assertEqual((got.status, got.json()["error"]["code"]), (404, "not_found"), (method, ident))

    # -- suppressions -------------------------------------------------------------

    async def test_suppressions(self) -> None:
        """Add (normalised), page through with cursors, remove, and 404 removing twice."""
        web = await self.web()
        t: Any = self
        for i in range(5):
            added = await web.call("POST", "/suppressions", {"address": f"User{i}@Example.com"})
            t.assertEqual(added.status, 201)
        t.assertEqual(added.json()["address"], "user4@example.com")
        t.assertEqual(added.json()["reason"], "manual")
        seen: list[str] = []
        path = "/suppressions?limit=2"
        pages = 0
        while True:
            page = (await web.call("GET", path)).json()
            seen += [s["address"] for s in page["data"]]
            pages += 1
            if page["next_cursor"] is None:
                break
            path = f"/suppressions?limit=2&cursor={page['next_cursor']}"
        t.assertEqual(seen, [f"user{i}@example.com" for i in range(5)])
        t.assertEqual(pages, 3)
        bad = await web.call("POST", "/suppressions", {"address": "x@example.com", "reason": "bored"})
        t.assertEqual(bad.status, 422)
        not_address = await web.call("POST", "/suppressions", {"address": "nobody"})
        t.assertEqual(not_address.status, 422)
        removed = await web.call("DELETE", "/suppressions/user0%40example.com")
        t.assertEqual(removed.status, 204)
        again = await web.call("DELETE", "/suppressions/user0%40example.com")
        t.assertEqual(again.status, 404)
        hard = await web.call("GET", "/suppressions?reason=hard_bounce")
        t.assertEqual(hard.json()["data"], [])

    async def test_suppressions_list_scope(self) -> None:
        """A list scope given by list name is stored with the list's id; an unknown list is 404."""
        web = await self.web()
        t: Any = self
        created = (await web.call("POST", "/lists", {"name": "News"})).json()
        added = await web.call(
            "POST", "/suppressions", {"address": "a@example.com", "scope": "list:News", "reason": "unsubscribe"}
        )
        t.assertEqual(added.json()["scope"], f"list:{created['id']}")
        unknown = await web.call("POST", "/suppressions", {"address": "a@example.com", "scope": "list:Nope"})
        t.assertEqual(unknown.status, 404)
        removed = await web.call("DELETE", f"/suppressions/a%40example.com?scope=list:{created['id']}")
        t.assertEqual(removed.status, 204)

    async def test_suppressions_csv(self) -> None:
        """Import reports bad lines by number and adds the rest; export round-trips and defuses formulas."""
        web = await self.web()
        t: Any = self
        text = (
            "address,reason,scope,expires_at,detail\r\n"
            "a@example.com,hard_bounce,,,bounced twice\r\n"
            "not-an-address,manual\r\n"
            "b@example.com\r\n"
            "c@example.com,weird\r\n"
            'd@example.com,manual,account,,=HYPERLINK("x")\r\n'
        )
        imported = await web.call(
            "POST", "/suppressions/import", raw=text.encode(), headers={"Content-Type": ["text/csv"]}
        )
        t.assertEqual(imported.status, 200)
        t.assertEqual(imported.json()["imported"], 3)
        t.assertEqual([e["line"] for e in imported.json()["errors"]], [3, 5])
        again = await web.call("POST", "/suppressions/import", raw=text.encode())
        t.assertEqual(again.json()["imported"], 3)
        listed = (await web.call("GET", "/suppressions")).json()["data"]
        t.assertEqual(len(listed), 3)
        exported = await web.call("GET", "/suppressions/export")
        t.assertEqual(exported.status, 200)
        t.assertTrue((exported.header("content-type") or "").startswith("text/csv"))
        rows = list(csv.reader(io.StringIO(exported.body.decode())))
        t.assertEqual(rows[0][:3], ["address", "reason", "scope"])
        by_address = {r[0]: r for r in rows[1:]}
        t.assertEqual(by_address["a@example.com"][1], "hard_bounce")
        t.assertEqual(by_address["d@example.com"][4], '\'=HYPERLINK("x")')
        # What was exported imports again unchanged (the formula guard is taken off).
        await web.call("DELETE", "/suppressions/d%40example.com")
        back = await web.call("POST", "/suppressions/import", raw=exported.body)
        t.assertEqual(back.json(), {"imported": 3, "errors": []})
        detail = {s["address"]: s["detail"] for s in (await web.call("GET", "/suppressions")).json()["data"]}
        t.assertEqual(detail["d@example.com"], '=HYPERLINK("x")')

    # -- lists and campaigns ------------------------------------------------------

    async def test_lists_and_members(self) -> None:
        """Create, duplicate 409, add members (new ones counted), page them, remove, delete."""
        web = await self.web()
        t: Any = self
        created = await web.call("POST", "/lists", {"name": "News", "id": "news-1"})
        t.assertEqual(created.status, 201)
        t.assertEqual(created.json()["id"], "news-1")
        dup = await web.call("POST", "/lists", {"name": "News"})
        t.assertEqual(dup.status, 409)
        added = await web.call(
            "POST", "/lists/news-1/members", {"addresses": ["b@example.com", "A@example.com", "c@example.com"]}
        )
        t.assertEqual(added.json()["added"], 3)
        t.assertEqual(added.json()["list"]["members"], 3)
        more = await web.call("POST", "/lists/News/members", {"addresses": ["a@example.com", "d@example.com"]})
        t.assertEqual(more.json()["added"], 1)
        bad = await web.call("POST", "/lists/news-1/members", {"addresses": ["nope"]})
        t.assertEqual(bad.status, 422)
        first = (await web.call("GET", "/lists/news-1/members?limit=3")).json()
        t.assertEqual([m["address"] for m in first["data"]], ["a@example.com", "b@example.com", "c@example.com"])
        rest = (await web.call("GET", f"/lists/news-1/members?limit=3&cursor={first['next_cursor']}")).json()
        t.assertEqual([m["address"] for m in rest["data"]], ["d@example.com"])
        t.assertIsNone(rest["next_cursor"])
        t.assertEqual((await web.call("DELETE", "/lists/news-1/members/b%40example.com")).status, 204)
        t.assertEqual((await web.call("DELETE", "/lists/news-1/members/b%40example.com")).status, 404)
        t.assertEqual((await web.call("GET", "/lists/news-1")).json()["members"], 3)
        t.assertEqual(len((await web.call("GET", "/lists")).json()["data"]), 1)
        renamed = await web.call("PATCH", "/lists/news-1", {"name": "Weekly news"})
        t.assertEqual((renamed.status, renamed.json()["name"], renamed.json()["id"]), (200, "Weekly news", "news-1"))
        await web.call("POST", "/lists", {"name": "Other", "id": "other-1"})
        t.assertEqual((await web.call("PATCH", "/lists/other-1", {"name": "Weekly news"})).status, 409)
        t.assertEqual((await web.call("PATCH", "/lists/news-1", {"name": ""})).status, 422)
        t.assertEqual((await web.call("DELETE", "/lists/other-1")).status, 204)
        t.assertEqual((await web.call("DELETE", "/lists/news-1")).status, 204)
        t.assertEqual((await web.call("GET", "/lists/news-1")).status, 404)

    async def test_accounts_are_isolated(self) -> None:
        """Another account's list, campaign, domain and webhook answer 404, as if they did not exist."""
        web = await self.web()
        t: Any = self
        other = await web.store.accounts.create("other", None)
        other_key = await web.new_key(other.id, SCOPES)
        await web.call("POST", "/lists", {"name": "Mine", "id": "mine"})
        await web.call("POST", "/campaigns", {"name": "Spring", "id": "spring"})
        await web.call("POST", "/domains", {"domain": "shop.example"})
        hook = (await web.call("POST", "/webhooks", {"url": "https://hooks.example.com/x"})).json()
        for path in (
            "/lists/mine",
            "/lists/mine/members",
            "/campaigns/spring",
            "/domains/shop.example",
            f"/webhooks/{hook['id']}",
            f"/webhooks/{hook['id']}/attempts",
        ):
            answer = await web.call("GET", path, key=other_key)
            t.assertEqual(answer.status, 404, path)
        t.assertEqual((await web.call("DELETE", "/domains/shop.example", key=other_key)).status, 404)
        t.assertEqual((await web.call("GET", "/domains/shop.example")).status, 200)

    async def test_campaigns(self) -> None:
        """A campaign names its list by id or name and answers it by id; unknown list 404, duplicate id 409."""
        web = await self.web()
        t: Any = self
        await web.call("POST", "/lists", {"name": "News", "id": "news-1"})
        created = await web.call(
            "POST", "/campaigns", {"name": "Spring", "subject": "Hello", "id": "c-1", "list": "News"}
        )
        t.assertEqual(created.status, 201)
        t.assertEqual(created.json()["list"], "news-1")
        t.assertEqual((await web.call("GET", "/campaigns/c-1")).json()["subject"], "Hello")
        t.assertEqual((await web.call("POST", "/campaigns", {"name": "X", "list": "nope"})).status, 404)
        t.assertEqual((await web.call("POST", "/campaigns", {"name": "Y", "id": "c-1"})).status, 409)
        t.assertEqual([c["id"] for c in (await web.call("GET", "/campaigns")).json()["data"]], ["c-1"])

    # -- domains and credentials --------------------------------------------------

    async def test_domains(self) -> None:
        """A new domain has a generated DKIM key, its DNS records, and is not verified; a duplicate is 409."""
        web = await self.web()
        t: Any = self
        created = await web.call("POST", "/domains", {"domain": "Shop.Example", "selector": "s1", "ed25519": True})
        t.assertEqual(created.status, 201)
        data = created.json()
        t.assertEqual(data["domain"], "shop.example")
        t.assertFalse(data["verified"])
        names = {(r["name"], r["type"]) for r in data["dns_records"]}
        t.assertIn(("s1._domainkey.shop.example", "TXT"), names)
        t.assertIn(("rp.shop.example", "CNAME"), names)
        t.assertIn("v=DKIM1", " ".join(r["value"] for r in data["dns_records"]))
        t.assertTrue(data["ed25519"])
        t.assertEqual((await web.call("POST", "/domains", {"domain": "shop.example"})).status, 409)
        t.assertEqual((await web.call("POST", "/domains", {"domain": "not a domain"})).status, 422)
        await web.store.domains.set_verified("shop.example", True)
        t.assertTrue((await web.call("GET", "/domains/shop.example")).json()["verified"])
        t.assertEqual(len((await web.call("GET", "/domains")).json()["data"]), 1)
        t.assertEqual((await web.call("DELETE", "/domains/shop.example")).status, 204)
        t.assertEqual((await web.call("GET", "/domains/shop.example")).status, 404)

    async def test_domain_dkim_signing(self) -> None:
        """
        A domain is DKIM-signed by default; PATCH turns signing off and on
        again, GET and the list show it; a wrong value is 422, another
        account's domain 404, a key without domains:write 403.
        """
        web = await self.web()
        t: Any = self
        created = (await web.call("POST", "/domains", {"domain": "shop.example"})).json()
        t.assertIs(created["dkim_signing"], True)
        check_schema("DomainUpdate", {"dkim_signing": False})
        off = await web.call("PATCH", "/domains/shop.example", {"dkim_signing": False})
        t.assertEqual(off.status, 200)
        t.assertIs(off.json()["dkim_signing"], False)
        t.assertIs((await web.call("GET", "/domains/shop.example")).json()["dkim_signing"], False)
        t.assertIs((await web.store.domains.get("shop.example")).dkim_signing, False)
        listed = (await web.call("GET", "/domains")).json()["data"]
        t.assertEqual([(d["domain"], d["dkim_signing"]) for d in listed], [("shop.example", False)])
        unchanged = await web.call("PATCH", "/domains/shop.example", {})
        t.assertIs(unchanged.json()["dkim_signing"], False)
        on = await web.call("PATCH", "/domains/Shop.Example", {"dkim_signing": True})
        t.assertIs(on.json()["dkim_signing"], True)
        t.assertIs((await web.call("GET", "/domains/shop.example")).json()["dkim_signing"], True)

        wrong = await web.call("PATCH", "/domains/shop.example", {"dkim_signing": "no"})
        t.assertEqual((wrong.status, wrong.json()["error"]["code"]), (422, "invalid_field"))
        unknown = await web.call("PATCH", "/domains/shop.example", {"verified": True})
        t.assertEqual((unknown.status, unknown.json()["error"]["code"]), (422, "unknown_field"))
        t.assertEqual((await web.call("PATCH", "/domains/else.example", {"dkim_signing": False})).status, 404)
        other = await web.store.accounts.create("other", None)
        other_key = await web.new_key(other.id, SCOPES)
        t.assertEqual(
            (await web.call("PATCH", "/domains/shop.example", {"dkim_signing": False}, key=other_key)).status, 404
        )
        reader = await web.new_key(web.account_id, ["domains:read"])
        t.assertEqual(
            (await web.call("PATCH", "/domains/shop.example", {"dkim_signing": False}, key=reader)).status, 403
        )
        t.assertIs((await web.store.domains.get("shop.example")).dkim_signing, True)

    async def test_domains_without_keygen(self) -> None:
        """Without a key generator the relay refuses to create domains with 501 not_available."""
        web = await self.web(dkim_keygen=None)
        answer = await web.call("POST", "/domains", {"domain": "shop.example"})
        self.assertEqual((answer.status, answer.json()["error"]["code"]), (501, "not_available"))  # type: ignore

    async def test_credentials(self) -> None:
        """Secrets are shown once; keys cannot grant scopes they lack; a revoked key stops at once."""
        web = await self.web()
        t: Any = self
        await web.call("POST", "/domains", {"domain": "shop.example"})
        smtp = await web.call("POST", "/credentials", {"kind": "smtp_user", "domain": "shop.example", "label": "shop"})
        t.assertEqual(smtp.status, 201)
        t.assertTrue(smtp.json()["secret"]["username"].endswith("@shop.example"))
        t.assertTrue(smtp.json()["secret"]["password"].startswith("mrs_"))
        key = await web.call("POST", "/credentials", {"kind": "api_key", "scopes": ["stats:read", "smtp:send"]})
        secret = key.json()["secret"]
        t.assertEqual(secret["smtp_username"], "smtp_injection")
        listed = await web.call("GET", "/credentials")
        t.assertNotIn(secret["key"], listed.body.decode())
        t.assertNotIn(smtp.json()["secret"]["password"], listed.body.decode())
        limited = await web.new_key(web.account_id, ["credentials:write", "stats:read"])
        escalate = await web.call(
            "POST", "/credentials", {"kind": "api_key", "scopes": ["suppressions:write"]}, key=limited
        )
        t.assertEqual((escalate.status, escalate.json()["error"]["code"]), (403, "scope_escalation"))
        smtp_denied = await web.call(
            "POST", "/credentials", {"kind": "smtp_user", "domain": "shop.example"}, key=limited
        )
        t.assertEqual(smtp_denied.status, 403)
        subset = await web.call("POST", "/credentials", {"kind": "api_key", "scopes": ["stats:read"]}, key=limited)
        t.assertEqual(subset.status, 201)
        t.assertEqual((await web.call("POST", "/credentials", {"kind": "api_key", "scopes": ["root"]})).status, 422)
        t.assertEqual(
            (await web.call("POST", "/credentials", {"kind": "smtp_user", "domain": "else.example"})).status, 404
        )
        t.assertEqual((await web.call("GET", "/me", key=secret["key"])).status, 200)
        t.assertEqual((await web.call("DELETE", f"/credentials/{key.json()['id']}")).status, 204)
        t.assertEqual((await web.call("GET", "/me", key=secret["key"])).status, 401)
        t.assertEqual((await web.call("DELETE", f"/credentials/{key.json()['id']}")).status, 404)
        kinds = {c["kind"] for c in (await web.call("GET", "/credentials?kind=smtp_user")).json()["data"]}
        t.assertEqual(kinds, {"smtp_user"})

    # -- webhooks -----------------------------------------------------------------

    async def test_webhooks(self) -> None:
        """CRUD: the secret only at creation and rotation, private URLs refused, re-enable, attempts paged."""
        web = await self.web()
        t: Any = self
        created = await web.call(
            "POST", "/webhooks", {"url": "https://hooks.example.com/in", "event_types": ["bounced", "opened"]}
        )
        t.assertEqual(created.status, 201)
        hook = created.json()
        t.assertTrue(hook["secret"].startswith("whsec_"))
        t.assertEqual(hook["event_types"], ["bounced", "opened"])
        got = await web.call("GET", f"/webhooks/{hook['id']}")
        t.assertNotIn("secret", got.json())
        t.assertNotIn(hook["secret"], got.body.decode())
        for url in (
            "http://127.0.0.1/x",
            "http://10.1.2.3/",
            "http://localhost:8080/",
            "ftp://example.com/",
            "http://[::1]/",
        ):
            refused = await web.call("POST", "/webhooks", {"url": url})
            t.assertEqual(refused.status, 422, url)
        t.assertEqual(
            (await web.call("POST", "/webhooks", {"url": "https://x.example/", "event_types": ["sent"]})).status, 422
        )
        await web.webhooks.set_failing(hook["id"], True)
        t.assertFalse((await web.call("GET", f"/webhooks/{hook['id']}")).json()["enabled"])
        patched = await web.call("PATCH", f"/webhooks/{hook['id']}", {"enabled": True, "event_types": []})
        t.assertEqual((patched.json()["enabled"], patched.json()["event_types"]), (True, []))
        rotated = await web.call("POST", f"/webhooks/{hook['id']}/secret")
        t.assertNotEqual(rotated.json()["secret"], hook["secret"])
        stored = await web.webhooks.get(web.account_id, hook["id"])
        t.assertEqual(stored.secret, rotated.json()["secret"])
        for i in range(3):
            await web.webhooks.record_attempt(
                hook["id"], 1000.0 + i, 500 if i < 2 else 200, "HTTP 500: oops" if i < 2 else None, 4
            )
        first = (await web.call("GET", f"/webhooks/{hook['id']}/attempts?limit=2")).json()
        t.assertEqual([a["ok"] for a in first["data"]], [True, False])
        rest = await web.call("GET", f"/webhooks/{hook['id']}/attempts?limit=2&cursor={first['next_cursor']}")
        t.assertEqual([a["error"] for a in rest.json()["data"]], ["HTTP 500: oops"])
        t.assertEqual((await web.call("DELETE", f"/webhooks/{hook['id']}")).status, 204)
        t.assertEqual((await web.call("GET", f"/webhooks/{hook['id']}")).status, 404)
        t.assertEqual((await web.call("GET", "/webhooks/abc")).status, 404)

    async def test_webhook_limit(self) -> None:
        """An account has at most ten webhooks; the eleventh is a 409."""
        web = await self.web()
        for i in range(10):
            await web.call("POST", "/webhooks", {"url": f"https://hooks.example.com/{i}"})
        answer = await web.call("POST", "/webhooks", {"url": "https://hooks.example.com/11"})
        self.assertEqual(answer.status, 409)  # type: ignore[attr-defined]

    # -- statistics, events, message history ----------------------------------------

    async def _emit(self, web: Web, events: list[Event]) -> None:
        directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        sink = EventSink(web.store.pool, reactor, reactor, directory)  # type: ignore[arg-type]
        await sink.start()
        for e in events:
            sink.emit(e)
        await sink.stop()

    async def test_stats_events_and_history(self) -> None:
        """Stored events show in statistics, in filtered and paged event lists, and in message histories."""
        web = await self.web()
        t: Any = self
        campaign = await web.store.campaigns.create(web.account_id, "Spring", guid="spring")
        other = await web.store.accounts.create("other", None)
        child = await web.store.accounts.create("billing", None, parent="shop")
        ts = 1_700_000_000.0  # 2023-11-14
        a = web.account_id
        events = [
            Event(
                EventType.QUEUED,
                ts,
                a,
                queue_id="q1",
                transmission_id="t1",
                recipient="a@x.example",
                campaign_id=campaign.id,
                tags=("welcome",),
            ),
            Event(EventType.QUEUED, ts, a, queue_id="q2", transmission_id="t1", recipient="b@x.example"),
            Event(
                EventType.DELIVERED,
                ts + 1,
                a,
                queue_id="q1",
                transmission_id="t1",
                recipient="a@x.example",
                campaign_id=campaign.id,
                tags=("welcome",),
            ),
            Event(
                EventType.BOUNCED,
                ts + 2,
                a,
                queue_id="q2",
                transmission_id="t1",
                recipient="b@x.example",
                detail={"class": "hard"},
            ),
            Event(
                EventType.OPENED,
                ts + 3,
                a,
                queue_id="q1",
                recipient="a@x.example",
                campaign_id=campaign.id,
                detail={"first": True},
            ),
            Event(
                EventType.OPENED,
                ts + 4,
                a,
                queue_id="q1",
                recipient="a@x.example",
                campaign_id=campaign.id,
                detail={"first": False},
            ),
            Event(EventType.QUEUED, ts, other.id, queue_id="q9", recipient="z@x.example"),
            Event(EventType.QUEUED, ts, child.id, queue_id="q5", recipient="c@x.example"),
        ]
        await self._emit(web, events)
        stats = await web.call("GET", "/stats?since=2023-11-01&until=2023-11-30")
        totals = stats.json()["totals"]
        # The parent's totals include its sub-account's.
        t.assertEqual((totals["sent"], totals["delivered"], totals["hard_bounced"]), (3, 1, 1))
        sub = await web.call("GET", "/stats?since=2023-11-01&until=2023-11-30&subaccount=billing")
        t.assertEqual(sub.json()["totals"]["sent"], 1)
        t.assertEqual((await web.call("GET", "/stats?subaccount=other")).status, 404)
        subs = await web.call("GET", "/stats/breakdown?since=2023-11-01&until=2023-11-30&by=subaccount")
        t.assertEqual([(r["key"], r["sent"]) for r in subs.json()["data"]], [("billing", 1)])
        two = await web.call("GET", "/stats?campaign=spring&tag=welcome")
        t.assertEqual(two.status, 400)
        t.assertEqual((totals["opens"], totals["unique_opens"]), (2, 1))
        by_campaign = await web.call("GET", "/stats?since=2023-11-01&until=2023-11-30&campaign=spring&by_day=true")
        t.assertEqual(by_campaign.json()["totals"]["sent"], 1)
        t.assertEqual(len(by_campaign.json()["days"]), 30)
        tagged = await web.call("GET", "/stats?since=2023-11-14&until=2023-11-14&tag=welcome")
        t.assertEqual(tagged.json()["totals"]["delivered"], 1)
        breakdown = await web.call("GET", "/stats/breakdown?since=2023-11-01&until=2023-11-30&by=campaign")
        t.assertEqual([r["key"] for r in breakdown.json()["data"]], ["spring"])
        t.assertEqual((await web.call("GET", "/stats?since=2023-11-30&until=2023-11-01")).status, 400)
        t.assertEqual((await web.call("GET", "/stats?since=2020-01-01&until=2023-01-01")).status, 400)
        t.assertEqual((await web.call("GET", "/stats?campaign=nope")).status, 404)

        everything = (await web.call("GET", "/events?order=asc&limit=1000")).json()
        t.assertEqual(len(everything["data"]), 6)
        t.assertNotIn("z@x.example", [e["recipient"] for e in everything["data"]])
        opened = (await web.call("GET", "/events?type=opened,bounced&order=asc")).json()["data"]
        t.assertEqual([e["type"] for e in opened], ["bounced", "opened", "opened"])
        t.assertEqual(opened[1]["detail"], {"first": True})
        recipient = (await web.call("GET", "/events?recipient=b%40x.example")).json()["data"]
        t.assertEqual([e["type"] for e in recipient], ["bounced", "queued"])
        tag = (await web.call("GET", "/events?tag=welcome&order=asc")).json()["data"]
        t.assertEqual([e["type"] for e in tag], ["queued", "delivered"])
        t.assertEqual(len((await web.call("GET", "/events?campaign=spring")).json()["data"]), 4)
        window = (await web.call("GET", f"/events?since={ts + 1}&until={ts + 3}")).json()["data"]
        t.assertEqual(sorted(e["type"] for e in window), ["bounced", "delivered"])
        pages, ids, path = 0, [], "/events?limit=4"
        while path:
            page = (await web.call("GET", path)).json()
            ids += [e["id"] for e in page["data"]]
            pages += 1
            path = f"/events?limit=4&cursor={page['next_cursor']}" if page["next_cursor"] else ""
        t.assertEqual((len(ids), len(set(ids)), pages), (6, 6, 2))
        t.assertEqual(ids, sorted(ids, reverse=True))
        t.assertEqual((await web.call("GET", "/events?type=exploded")).status, 400)

        history = (await web.call("GET", "/messages/q1")).json()
        t.assertEqual([e["type"] for e in history["events"]], ["queued", "delivered", "opened", "opened"])
        transmission = (await web.call("GET", "/transmissions/t1")).json()
        t.assertEqual(len(transmission["events"]), 4)
        t.assertEqual((await web.call("GET", "/messages/q9")).status, 404)


class SQLiteApiTests(ApiTestsMixin, TestCase):
    engine = "sqlite"


class PostgresApiTests(ApiTestsMixin, TestCase):
    engine = "postgresql"
