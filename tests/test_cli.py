"""
The ``mailrelay`` admin command, in-process, on SQLite and PostgreSQL.

Each verb is run through ``mailrelay.cli.main.run`` with the test's reactor
and string streams, exactly as the console script runs it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.cli.main import run
from tests.support.db import fresh_database_url
from tests.support.dns_server import start_dns_server


class CLITestsMixin:
    engine: str

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())  # type: ignore[attr-defined]
        self.dir.mkdir()
        self.config = self.dir / "mailrelay.toml"
        self.write_config()

    def write_config(self, extra: str = "") -> None:
        url = getattr(self, "url", None) or fresh_database_url(self, self.engine)  # type: ignore[arg-type]
        self.url = url
        self.config.write_text(
            f'[server]\nhostname = "relay.test"\ndata_dir = "{self.dir}/data"\n'
            f'[database]\nurl = "{url}"\n[domains]\nbounce_domain = "bounces.relay.test"\n' + extra
        )

    async def cli(self, *argv: str, stdin: str = "", code: int = 0) -> Any:
        out, err = io.StringIO(), io.StringIO()
        status = await run(["--config", str(self.config), "--json", *argv], reactor, io.StringIO(stdin), out, err)
        self.assertEqual(status, code, f"{argv}: {out.getvalue()} {err.getvalue()}")  # type: ignore[attr-defined]
        return json.loads(out.getvalue()) if out.getvalue() else None

    async def test_accounts(self) -> None:
        """account create/list/show/suspend/approve/set work and report errors as JSON with status 1."""
        created = await self.cli("account", "create", "shop", "--daily-quota", "100", stdin="longpassword\n")
        self.assertEqual(
            (created["name"], created["daily_quota"], created["approved"]),  # type: ignore[attr-defined]
            ("shop", 100, True),
        )
        self.assertNotIn("password_hash", created)  # type: ignore[attr-defined]
        sub = await self.cli("account", "create", "billing", "--parent", "shop", "--no-password")
        self.assertEqual(sub["parent_name"], "shop")  # type: ignore[attr-defined]
        listed = await self.cli("account", "list")
        self.assertEqual([a["name"] for a in listed], ["shop", "billing"])  # type: ignore[attr-defined]
        suspended = await self.cli("account", "suspend", "shop\\billing")
        self.assertTrue(suspended["suspended"])  # type: ignore[attr-defined]
        unapproved = await self.cli("account", "create", "new", "--unapproved", "--no-password")
        self.assertFalse(unapproved["approved"])  # type: ignore[attr-defined]
        approved = await self.cli("account", "approve", "new")
        self.assertTrue(approved["approved"])  # type: ignore[attr-defined]
        changed = await self.cli(
            "account", "set", "shop", "--daily-quota", "none", "--footer-text", "Bye", "--open-tracking", "on"
        )
        self.assertEqual(
            (changed["daily_quota"], changed["footer_text"], changed["open_tracking"]),  # type: ignore[attr-defined]
            (None, "Bye", True),
        )
        error = await self.cli("account", "show", "nobody", code=1)
        self.assertEqual(error, {"error": "no account called 'nobody'"})  # type: ignore[attr-defined]
        error = await self.cli("account", "create", "short", stdin="abc\n", code=1)
        self.assertIn("at least 8 characters", error["error"])  # type: ignore[attr-defined]
        error = await self.cli("account", "create", "shop", "--no-password", code=1)
        self.assertIn("already exists", error["error"])  # type: ignore[attr-defined]

    async def test_usage_error(self) -> None:
        """A missing argument is a usage error with status 2."""
        await self.cli("account", "create", code=2)

    async def test_domain_records_and_verify(self) -> None:
        """domain add prints the DKIM, return-path records; verify checks DKIM in DNS (or --force)."""
        await self.cli("account", "create", "shop", "--no-password")
        added = await self.cli("domain", "add", "shop", "Example.COM", "--selector", "s1")
        self.assertEqual(added["domain"], "example.com")  # type: ignore[attr-defined]
        self.assertFalse(added["verified"])  # type: ignore[attr-defined]
        records = {r["name"]: r for r in added["dns_records"]}
        dkim = records["s1._domainkey.example.com"]
        self.assertEqual(dkim["type"], "TXT")  # type: ignore[attr-defined]
        self.assertIn("v=DKIM1; k=rsa; p=", dkim["value"])  # type: ignore[attr-defined]
        self.assertEqual(records["rp.example.com"]["value"], "bounces.relay.test.")  # type: ignore[attr-defined]

        # The DKIM record is not published: verification fails with the reason.
        port, stop = start_dns_server(reactor, {})
        self.addCleanup(stop)  # type: ignore[attr-defined]
        self.write_config(f'[dns]\nnameservers = ["127.0.0.1:{port}"]\ntimeout = 2\n')
        error = await self.cli("domain", "verify", "example.com", code=1)
        self.assertIn("not verified", error["error"])  # type: ignore[attr-defined]
        self.assertIn("s1._domainkey.example.com TXT: not found", error["error"])  # type: ignore[attr-defined]

        # Published: it verifies.
        txt = "".join(part.strip('"') for part in dkim["value"].split('" "'))
        port2, stop2 = start_dns_server(reactor, {"s1._domainkey.example.com": {"TXT": [txt]}})
        self.addCleanup(stop2)  # type: ignore[attr-defined]
        self.write_config(f'[dns]\nnameservers = ["127.0.0.1:{port2}"]\ntimeout = 2\n')
        verified = await self.cli("domain", "verify", "example.com")
        self.assertTrue(verified["verified"])  # type: ignore[attr-defined]
        self.assertTrue(all(c["ok"] for c in verified["checks"]))  # type: ignore[attr-defined]

        await self.cli("domain", "add", "shop", "forced.example", "--selector", "s2")
        forced = await self.cli("domain", "verify", "forced.example", "--force")
        self.assertTrue(forced["verified"])  # type: ignore[attr-defined]
        listed = await self.cli("domain", "list", "--account", "shop")
        self.assertEqual([d["domain"] for d in listed], ["example.com", "forced.example"])  # type: ignore[attr-defined]

    async def test_domain_dkim_switch(self) -> None:
        """domain dkim --off/--on switches signing; show and list report it; the default is on."""
        await self.cli("account", "create", "shop", "--no-password")
        added = await self.cli("domain", "add", "shop", "example.com", "--selector", "s1")
        self.assertIs(added["dkim_signing"], True)  # type: ignore[attr-defined]
        off = await self.cli("domain", "dkim", "example.com", "--off")
        self.assertEqual((off["domain"], off["dkim_signing"]), ("example.com", False))  # type: ignore[attr-defined]
        self.assertIs((await self.cli("domain", "show", "example.com"))["dkim_signing"], False)  # type: ignore[attr-defined]
        listed = await self.cli("domain", "list")
        self.assertEqual([(d["domain"], d["dkim_signing"]) for d in listed],  # type: ignore[attr-defined]
                         [("example.com", False)])
        on = await self.cli("domain", "dkim", "Example.COM", "--on")
        self.assertIs(on["dkim_signing"], True)  # type: ignore[attr-defined]
        self.assertIs((await self.cli("domain", "show", "example.com"))["dkim_signing"], True)  # type: ignore[attr-defined]

        out = io.StringIO()
        status = await run(["--config", str(self.config), "domain", "dkim", "example.com", "--off"], reactor,
                           io.StringIO(), out, io.StringIO())
        self.assertEqual(status, 0)  # type: ignore[attr-defined]
        self.assertIn("DKIM signing of example.com is now off", out.getvalue())  # type: ignore[attr-defined]
        self.assertIn("DKIM signing: off", out.getvalue())  # type: ignore[attr-defined]

        error = await self.cli("domain", "dkim", "nowhere.example", "--off", code=1)
        self.assertIn("nowhere.example", error["error"])  # type: ignore[attr-defined]
        await self.cli("domain", "dkim", "example.com", code=2)
        await self.cli("domain", "dkim", "example.com", "--on", "--off", code=2)

    async def test_credentials(self) -> None:
        """smtp-user and api-key secrets are printed once and stored only as hashes."""
        await self.cli("account", "create", "shop", "--no-password")
        await self.cli("domain", "add", "shop", "example.com")
        user = await self.cli("smtp-user", "create", "example.com")
        self.assertTrue(user["username"].endswith("@example.com"))  # type: ignore[attr-defined]
        self.assertTrue(user["password"].startswith("mrs_"))  # type: ignore[attr-defined]
        token = await self.cli("api-token", "create", "example.com")
        self.assertEqual(token["username"], token["password"])  # type: ignore[attr-defined]
        users = await self.cli("smtp-user", "list", "example.com")
        self.assertEqual([u["username"] for u in users], [user["username"]])  # type: ignore[attr-defined]
        self.assertNotIn(user["password"], json.dumps(users))  # type: ignore[attr-defined]
        key = await self.cli("api-key", "create", "shop", "--scope", "smtp:send", "--scope", "stats:read")
        self.assertEqual(key["scopes"], ["smtp:send", "stats:read"])  # type: ignore[attr-defined]
        self.assertEqual(key["smtp_username"], "smtp_injection")  # type: ignore[attr-defined]
        keys = await self.cli("api-key", "list", "shop")
        self.assertEqual([k["id"] for k in keys], [key["id"]])  # type: ignore[attr-defined]
        await self.cli("api-key", "revoke", "shop", str(key["id"]))
        self.assertEqual(await self.cli("api-key", "list", "shop"), [])  # type: ignore[attr-defined]
        await self.cli("smtp-user", "delete", "example.com", user["username"])
        self.assertEqual(await self.cli("smtp-user", "list", "example.com"), [])  # type: ignore[attr-defined]
        await self.cli("api-key", "create", "shop", "--scope", "root", code=2)

    async def test_lists_campaigns_suppressions(self) -> None:
        """list, campaign and suppression verbs round-trip through storage."""
        await self.cli("account", "create", "shop", "--no-password")
        created = await self.cli("list", "create", "shop", "Customers")
        added = await self.cli("list", "add", "shop", "Customers", "a@x.com", "-", stdin="b@x.com\nA@X.com\n")
        self.assertEqual(added["added"], 2)  # type: ignore[attr-defined]
        shown = await self.cli("list", "show", "shop", created["guid"])
        self.assertEqual([m["address"] for m in shown["members"]], ["a@x.com", "b@x.com"])  # type: ignore[attr-defined]
        removed = await self.cli("list", "remove", "shop", "Customers", "a@x.com")
        self.assertEqual(removed["removed"], 1)  # type: ignore[attr-defined]
        all_lists = await self.cli("list", "show", "shop")
        self.assertEqual([(x["name"], x["members"]) for x in all_lists], [("Customers", 1)])  # type: ignore[attr-defined]
        campaign = await self.cli("campaign", "create", "shop", "Welcome", "--subject", "Hi", "--list", "Customers")
        self.assertEqual(campaign["subject"], "Hi")  # type: ignore[attr-defined]
        self.assertEqual(len(await self.cli("campaign", "list", "shop")), 1)  # type: ignore[attr-defined]
        s = await self.cli("suppression", "add", "shop", "Bad@X.com", "--reason", "hard_bounce", "--expires", "30")
        self.assertEqual((s["address"], s["reason"]), ("bad@x.com", "hard_bounce"))  # type: ignore[attr-defined]
        self.assertIsNotNone(s["expires_at"])  # type: ignore[attr-defined]
        self.assertEqual(len(await self.cli("suppression", "list", "shop")), 1)  # type: ignore[attr-defined]
        await self.cli("suppression", "remove", "shop", "bad@x.com")
        error = await self.cli("suppression", "remove", "shop", "bad@x.com", code=1)
        self.assertIn("not suppressed", error["error"])  # type: ignore[attr-defined]
        error = await self.cli("suppression", "add", "shop", "x@x.com", "--expires", "soon", code=1)
        self.assertIn("--expires", error["error"])  # type: ignore[attr-defined]

    async def test_webhooks(self) -> None:
        """webhook list and attempts show an account's endpoints and delivery attempts, never the secret."""
        from mailrelay.storage.store import open_store
        from mailrelay.storage.webhooks import Webhooks

        await self.cli("account", "create", "shop", "--no-password")
        await self.cli("account", "create", "other", "--no-password")
        account = (await self.cli("account", "show", "shop"))["id"]
        store = await open_store(self.url, reactor, pool_size=1)
        try:
            hooks = Webhooks(store.pool, reactor)
            hook = await hooks.create(account, "https://hooks.example.com/in", "s3cret-value-1234567890")
            await hooks.record_attempt(hook.id, 1_800_000_000.0, 500, "HTTP 500", 3)
            await hooks.record_attempt(hook.id, 1_800_000_060.0, 200, None, 3)
        finally:
            await store.close()
        listed = await self.cli("webhook", "list", "shop")
        self.assertEqual([w["url"] for w in listed], ["https://hooks.example.com/in"])  # type: ignore[attr-defined]
        self.assertNotIn("s3cret", json.dumps(listed))  # type: ignore[attr-defined]
        attempts = await self.cli("webhook", "attempts", "shop", str(hook.id))
        self.assertEqual([(a["status"], a["error"]) for a in attempts],  # type: ignore[attr-defined]
                         [(200, None), (500, "HTTP 500")])
        error = await self.cli("webhook", "attempts", "other", str(hook.id), code=1)
        self.assertIn("no webhook", error["error"])  # type: ignore[attr-defined]

    async def test_migrate(self) -> None:
        """migrate reports the schema version and is idempotent."""
        result = await self.cli("migrate")
        self.assertGreaterEqual(result["version"], 1)  # type: ignore[attr-defined]
        self.assertEqual((await self.cli("migrate"))["applied"], [])  # type: ignore[attr-defined]


class SQLiteCLITests(CLITestsMixin, TestCase):
    engine = "sqlite"


class PostgresCLITests(CLITestsMixin, TestCase):
    engine = "postgresql"


class CLIErrorTests(TestCase):
    async def test_bad_config(self) -> None:
        """A broken configuration file ends with its sentence and status 1."""
        path = Path(self.mktemp())
        path.write_text('[database]\nurl = "oracle://x"\n')
        err = io.StringIO()
        status = await run(["--config", str(path), "account", "list"], reactor, io.StringIO(), io.StringIO(), err)
        self.assertEqual(status, 1)
        self.assertIn("database.url: unknown database URL scheme 'oracle'", err.getvalue())

    async def test_unreachable_database(self) -> None:
        """An unreachable PostgreSQL is one sentence and status 1."""
        path = Path(self.mktemp())
        path.write_text('[database]\nurl = "postgresql://postgres@127.0.0.1:1/x?connect_timeout=2"\n')
        err = io.StringIO()
        status = await run(["--config", str(path), "account", "list"], reactor, io.StringIO(), io.StringIO(), err)
        self.assertEqual(status, 1)
        self.assertIn("mailrelay: error: cannot connect to PostgreSQL", err.getvalue())
