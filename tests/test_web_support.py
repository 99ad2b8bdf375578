"""
Helpers of the HTTP tests (no tests here): the whole resource tree over a
real store, driven through ``StubTreq``, and every JSON answer checked
against docs/openapi.yaml.

The store runs on the real reactor (SQLite's thread, txpostgres), so a
resource answers asynchronously; ``Web.call`` pumps ``StubTreq`` until the
answer is complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailrelay import secrets
from mailrelay.events.model import Event
from mailrelay.events.queries import EventQueries
from mailrelay.events.stats import Stats
from mailrelay.interfaces import IEventSink
from mailrelay.metrics import Metrics
from mailrelay.processing import dkim
from mailrelay.processing.tokens import TokenSigner
from mailrelay.storage.credentials import SCOPES
from mailrelay.storage.model import SendingDomain
from mailrelay.storage.store import Store
from mailrelay.storage.webhooks import Webhooks
from mailrelay.web.site import make_root
from tests.support.db import fresh_store

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
SECRET = b"0123456789abcdef0123456789abcdef"
BASE = "http://relay.test"

_spec: dict[str, Any] | None = None


def spec() -> dict[str, Any]:
    global _spec
    if _spec is None:
        _spec = yaml.safe_load(SPEC_PATH.read_text())
    return _spec


def _template_regex(template: str) -> re.Pattern[str]:
    parts = [("[^/]+" if p.startswith("{") else re.escape(p)) for p in template.strip("/").split("/")]
    return re.compile("^/" + "/".join(parts) + "$")


def find_operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """The spec's (template, operation) for a request path under /api/v1, literal segments first."""
    candidates = []
    for template, item in spec()["paths"].items():
        if method.lower() in item and _template_regex(template).match(path):
            candidates.append((template.count("{"), template, item[method.lower()]))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1], candidates[0][2]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec()
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


class SpecMismatch(AssertionError):
    pass


def check_response(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """
    The answer must be one the spec documents for this operation and
    status, and a JSON body must validate against its schema.
    """
    found = find_operation(method, path)
    if found is None:
        raise SpecMismatch(f"{method} {path} is not in docs/openapi.yaml")
    template, operation = found
    responses = operation["responses"]
    if str(status) not in responses:
        raise SpecMismatch(f"{method} {template} answered {status}, not documented ({sorted(responses)})")
    response = _resolve(responses[str(status)])
    content = response.get("content")
    if not content:
        if body:
            raise SpecMismatch(f"{method} {template} {status} has a body but the spec documents none")
        return
    media = content_type.split(";")[0].strip()
    if media not in content:
        raise SpecMismatch(f"{method} {template} {status}: content type {media}, documented {sorted(content)}")
    if media != "application/json":
        return
    schema = {**content[media]["schema"], "components": spec()["components"]}
    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    errors = sorted(validator.iter_errors(json.loads(body)), key=lambda e: list(e.absolute_path))
    if errors:
        raise SpecMismatch(f"{method} {template} {status}: {errors[0].message} at {list(errors[0].absolute_path)}")


def check_schema(name: str, value: Any) -> None:
    """``value`` validates against ``components.schemas[name]``."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec()["components"]}
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(value)


@implementer(IEventSink)
class ListSink:
    """An ``IEventSink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


@attrs.define
class Answer:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def domain_records(d: SendingDomain) -> tuple[dkim.DNSRecord, ...]:
    """What the wiring passes (cli/domains.py ``_records``), with a fixed bounce host."""
    ed = d.dkim_ed25519_key.encode("ascii") if d.dkim_ed25519_key else None
    return dkim.dns_records(
        d.domain,
        d.dkim_selector,
        d.dkim_private_key.encode("ascii"),
        bounce_domain=f"rp.{d.domain}",
        return_path_target="bounces.relay.test",
        ed25519_public_key=ed,
    )


_RSA_KEY: bytes | None = None


def shared_rsa_key() -> bytes:
    """One RSA key for the whole run (2048-bit generation takes a while)."""
    global _RSA_KEY
    if _RSA_KEY is None:
        _RSA_KEY = dkim.generate_rsa_key()
    return _RSA_KEY


async def _keygen() -> bytes:
    return shared_rsa_key()


class Web:
    """One relay's HTTP tree over a fresh store, with an account and a key that has every scope."""

    def __init__(self, case: TestCase, store: Store, **options: Any) -> None:
        self.case = case
        self.store = store
        self.sink = ListSink()
        self.metrics = Metrics()
        self.signer = TokenSigner(SECRET)
        self.webhooks = Webhooks(store.pool, reactor)
        self.events = EventQueries(store.pool)
        parts: dict[str, Any] = dict(
            store=store,
            webhooks=self.webhooks,
            signer=self.signer,
            sink=self.sink,
            stats=Stats(store.pool),
            events=self.events,
            clock=reactor,
            metrics=self.metrics,
            domain_records=domain_records,
            dkim_keygen=_keygen,
        )
        parts.update(options)
        self.root = make_root(**parts)
        self.stub: Any = StubTreq(self.root)
        self.key = ""
        self.account_id = 0
        self.checked = 0

    @classmethod
    async def create(cls, case: TestCase, engine: str, **options: Any) -> Web:
        store = await fresh_store(case, engine)
        web = cls(case, store, **options)
        account = await store.accounts.create("shop", None)
        web.account_id = account.id
        web.key = await web.new_key(account.id, SCOPES)
        return web

    async def new_key(self, account_id: int, scopes: Any) -> str:
        key = secrets.new_secret("api_key")
        await self.store.credentials.create(account_id, "api_key", secrets.secret_hash(key), scopes=scopes)
        return key

    async def request(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, Any] | None = None
    ) -> Answer:
        """Any request to the tree, pumped until answered."""
        d = self.stub.request(method, BASE + path, data=body, headers=headers or {}, allow_redirects=False)
        response = await self._pump(d)
        content = await self._pump(self.stub.content(response))
        await self.root.tracker.drain()
        return Answer(response.code, response.headers, content)

    async def _pump(self, d: Any) -> Any:
        """Flush StubTreq's connections while the real reactor runs the store, until ``d`` has a result."""
        done: list[bool] = []

        def mark(result: Any) -> Any:
            done.append(True)
            return result

        d.addBoth(mark)
        for _ in range(5000):
            if done:
                break
            self.stub.flush()
            await deferLater(reactor, 0.001, lambda: None)
        return await d

    async def call(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        key: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Answer:
        """An API call (``path`` under /api/v1), its answer checked against the OpenAPI file."""
        all_headers: dict[str, Any] = {"Authorization": [f"Bearer {self.key if key is None else key}"]}
        if key == "":
            all_headers = {}
        body = raw
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            all_headers["Content-Type"] = ["application/json"]
        all_headers.update(headers or {})
        answer = await self.request(method, "/api/v1" + path, body=body, headers=all_headers)
        content_type = answer.header("content-type") or ""
        check_response(method, path.split("?")[0], answer.status, content_type, answer.body)
        self.checked += 1
        return answer
