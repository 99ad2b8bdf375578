"""
``mailrelay domain|smtp-user|api-token|api-key ...``: sending domains and
the credentials that send from them.  Generated secrets are printed once
and stored only as SHA-256.
"""

from __future__ import annotations

import secrets as stdlib_secrets
from typing import Any

from mailrelay import secrets
from mailrelay.cli.main import CLIError, Context, table
from mailrelay.config import Config
from mailrelay.processing import dkim
from mailrelay.storage.credentials import SCOPES
from mailrelay.storage.model import Credential, SendingDomain


def register(nouns: Any) -> None:
    domain = nouns.add_parser("domain", help="sending domains, their DKIM keys and DNS records")
    verbs = domain.add_subparsers(dest="verb_name", metavar="VERB", required=True)
    add = verbs.add_parser("add", help="add a sending domain: generates its DKIM key, prints the DNS records")
    add.add_argument("account")
    add.add_argument("domain")
    add.add_argument("--selector", help="DKIM selector (default: mr + a date stamp)")
    add.add_argument("--ed25519", action="store_true", help="also sign with an Ed25519 key (RFC 8463)")
    add.set_defaults(verb=add_domain)
    ls = verbs.add_parser("list", help="list sending domains")
    ls.add_argument("--account")
    ls.set_defaults(verb=list_domains)
    show = verbs.add_parser("show", help="show a domain and the DNS records to publish")
    show.add_argument("domain")
    show.set_defaults(verb=show_domain)
    verify = verbs.add_parser("verify", help="check the DNS records and mark the domain verified")
    verify.add_argument("domain")
    verify.add_argument("--force", action="store_true", help="mark it verified without looking at DNS")
    verify.set_defaults(verb=verify_domain)
    sign = verbs.add_parser("dkim", help="turn DKIM signing of a domain's mail on (the default) or off")
    sign.add_argument("domain")
    switch = sign.add_mutually_exclusive_group(required=True)
    switch.add_argument("--on", dest="dkim_signing", action="store_true", default=None,
                        help="sign the domain's mail with its DKIM key")
    switch.add_argument("--off", dest="dkim_signing", action="store_false",
                        help="do not sign it (the application signs with its own key)")
    sign.set_defaults(verb=set_domain_dkim)
    remove = verbs.add_parser("remove", help="remove a sending domain (revokes its credentials)")
    remove.add_argument("domain")
    remove.set_defaults(verb=remove_domain)

    for noun, kind, text in (("smtp-user", "smtp_user", "generated SMTP users of a sending domain"),
                             ("api-token", "api_token", "per-domain API tokens, used as SMTP user and password")):
        p = nouns.add_parser(noun, help=text)
        v = p.add_subparsers(dest="verb_name", metavar="VERB", required=True)
        c = v.add_parser("create", help="generate one (printed once)")
        c.add_argument("domain")
        c.add_argument("--label")
        c.set_defaults(verb=create_domain_credential, kind=kind)
        ls = v.add_parser("list", help="list them")
        ls.add_argument("domain")
        ls.set_defaults(verb=list_domain_credentials, kind=kind)
        d = v.add_parser("delete", help="revoke one")
        d.add_argument("domain")
        d.add_argument("id", help="the user name (smtp-user) or the id shown by list")
        d.set_defaults(verb=delete_domain_credential, kind=kind)

    key = nouns.add_parser("api-key", help="API keys with scopes (smtp:send for the SMTP injection user)")
    kv = key.add_subparsers(dest="verb_name", metavar="VERB", required=True)
    c = kv.add_parser("create", help="create a key (printed once)")
    c.add_argument("account")
    c.add_argument("--scope", action="append", required=True, choices=sorted(SCOPES), metavar="SCOPE",
                   help="a permission (repeat for several): " + ", ".join(sorted(SCOPES)))
    c.add_argument("--label")
    c.set_defaults(verb=create_api_key)
    ls = kv.add_parser("list", help="list an account's keys")
    ls.add_argument("account")
    ls.set_defaults(verb=list_api_keys)
    r = kv.add_parser("revoke", help="revoke a key")
    r.add_argument("account")
    r.add_argument("id", type=int)
    r.set_defaults(verb=revoke_api_key)


def _records(config: Config, d: SendingDomain) -> tuple[dkim.DNSRecord, ...]:
    return dkim.sending_domain_records(d.domain, d.dkim_selector, d.dkim_private_key, d.dkim_ed25519_key,
                                       config.domains.bounce_domain)


def _describe(config: Config, d: SendingDomain, account: str) -> tuple[dict[str, Any], list[str]]:
    records = _records(config, d)
    data = {"domain": d.domain, "account": account, "verified": d.verified, "dkim_selector": d.dkim_selector,
            "dkim_signing": d.dkim_signing, "created_at": d.created_at, "verified_at": d.verified_at,
            "dns_records": [{"name": r.name, "type": r.type, "value": r.value, "purpose": r.purpose}
                            for r in records]}
    text = [f"domain {d.domain} (account {account}): {'verified' if d.verified else 'not verified'}",
            f"DKIM signing: {_signing(d)}",
            "DNS records to publish:"]
    for r in records:
        text.append(f"  {r.purpose}: {r.name} {r.type} {r.value}")
    return data, text


def _signing(d: SendingDomain) -> str:
    if not d.dkim_signing:
        return "off"
    return "on" if d.verified else "on (once verified)"


async def add_domain(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    selector = ctx.args.selector or "mr" + stdlib_secrets.token_hex(3)
    rsa_key = (await ctx.in_thread(dkim.generate_rsa_key)).decode("ascii")
    ed_key = dkim.generate_ed25519_key().decode("ascii") if ctx.args.ed25519 else None
    d = await ctx.store.domains.add(account.id, ctx.args.domain, selector, rsa_key, ed_key)
    ctx.emit(*_describe(ctx.config, d, account.login))


async def list_domains(ctx: Context) -> None:
    account_id = (await ctx.account(ctx.args.account)).id if ctx.args.account else None
    found = await ctx.store.domains.list(account_id)
    names = {a.id: a.login for a in await ctx.store.accounts.list()}
    rows = [(d.domain, names.get(d.account_id, d.account_id), "yes" if d.verified else "no", d.dkim_selector,
             "on" if d.dkim_signing else "off") for d in found]
    ctx.emit([{"domain": d.domain, "account": names.get(d.account_id), "verified": d.verified,
               "dkim_selector": d.dkim_selector, "dkim_signing": d.dkim_signing} for d in found],
             table(rows, ["DOMAIN", "ACCOUNT", "VERIFIED", "SELECTOR", "DKIM"]))


async def _domain_and_owner(ctx: Context, name: str) -> tuple[SendingDomain, str]:
    d = await ctx.store.domains.get(name)
    owner = await ctx.store.accounts.by_id(d.account_id)
    return d, owner.login


async def show_domain(ctx: Context) -> None:
    d, owner = await _domain_and_owner(ctx, ctx.args.domain)
    ctx.emit(*_describe(ctx.config, d, owner))


async def verify_domain(ctx: Context) -> None:
    d, owner = await _domain_and_owner(ctx, ctx.args.domain)
    checks: list[dict[str, Any]] = []
    if not ctx.args.force:
        for record in _records(ctx.config, d):
            if not dkim.is_dkim_record(record):
                continue
            found = await ctx.in_thread(_lookup_txt, ctx.config, record.name)
            ok = found is not None and any(_same_txt("".join(record.strings), value) for value in found)
            checks.append({"name": record.name, "type": record.type, "purpose": record.purpose,
                           "required": True, "found": found, "ok": ok})
        missing = [c for c in checks if c["required"] and not c["ok"]]
        if missing:
            lines = [f"{c['purpose']}: {c['name']} TXT: " + ("not found" if not c["found"] else
                     "does not match (found " + "; ".join(c["found"]) + ")") for c in missing]
            raise CLIError(f"{d.domain} is not verified: " + " / ".join(lines))
    d = await ctx.store.domains.set_verified(d.domain, True)
    data, text = _describe(ctx.config, d, owner)
    data["checks"] = checks
    ctx.emit(data, text if not ctx.args.force else [*text, "(marked verified with --force, DNS not checked)"])


def _lookup_txt(config: Config, name: str) -> list[str] | None:
    """TXT strings at ``name`` (joined per record), None when there are none. Runs in a thread."""
    import dns.exception
    import dns.nameserver
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=not config.dns.nameservers)
    if config.dns.nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in config.dns.nameservers]
    resolver.lifetime = config.dns.timeout
    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.DNSException as e:
        raise CLIError(f"cannot look up {name} TXT: {e}")
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


def _same_txt(expected: str, found: str) -> bool:
    def norm(v: str) -> str:
        return "".join(v.replace('"', "").split()).rstrip(";").lower()

    return norm(expected) == norm(found)


async def set_domain_dkim(ctx: Context) -> None:
    d, owner = await _domain_and_owner(ctx, ctx.args.domain)
    d = await ctx.store.domains.set_dkim_signing(d.domain, ctx.args.dkim_signing)
    data, text = _describe(ctx.config, d, owner)
    note = (f"DKIM signing of {d.domain} is now {'on' if d.dkim_signing else 'off'}"
            " (running relays pick it up within a minute)")
    ctx.emit(data, [note, *text])


async def remove_domain(ctx: Context) -> None:
    d, owner = await _domain_and_owner(ctx, ctx.args.domain)
    await ctx.store.domains.remove(d.domain)
    ctx.emit({"domain": d.domain, "removed": True}, f"removed {d.domain} (account {owner})")


def _credential_rows(found: list[Credential]) -> list[tuple[Any, ...]]:
    return [(c.id, c.username or "-", c.domain or "-", " ".join(sorted(c.scopes)) or "-", c.label or "")
            for c in found]


async def create_domain_credential(ctx: Context) -> None:
    d, owner = await _domain_and_owner(ctx, ctx.args.domain)
    secret = secrets.new_secret(ctx.args.kind)
    username = secrets.new_username(d.domain) if ctx.args.kind == "smtp_user" else None
    cred = await ctx.store.credentials.create(d.account_id, ctx.args.kind, secrets.secret_hash(secret),
                                              username=username, scopes=["smtp:send"], domain_id=d.id,
                                              label=ctx.args.label)
    user = username if username else secret
    data = {"id": cred.id, "kind": cred.kind, "domain": d.domain, "account": owner, "username": user,
            "password": secret}
    ctx.emit(data, [f"{cred.kind.replace('_', ' ')} for {d.domain} (id {cred.id}), shown only once:",
                    f"  username: {user}", f"  password: {secret}"])


async def list_domain_credentials(ctx: Context) -> None:
    d, _ = await _domain_and_owner(ctx, ctx.args.domain)
    found = await ctx.store.credentials.list(d.account_id, kind=ctx.args.kind, domain_id=d.id)
    ctx.emit(found, table(_credential_rows(found), ["ID", "USERNAME", "DOMAIN", "SCOPES", "LABEL"]))


async def delete_domain_credential(ctx: Context) -> None:
    d, _ = await _domain_and_owner(ctx, ctx.args.domain)
    if ctx.args.kind == "smtp_user" and not ctx.args.id.isdigit():
        cred = await ctx.store.credentials.revoke(d.account_id, username=ctx.args.id)
    elif ctx.args.id.isdigit():
        cred = await ctx.store.credentials.revoke(d.account_id, credential_id=int(ctx.args.id))
    else:
        raise CLIError(f"not an id: {ctx.args.id!r}")
    ctx.emit({"id": cred.id, "revoked": True}, f"revoked {cred.kind.replace('_', ' ')} {cred.username or cred.id}")


async def create_api_key(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    secret = secrets.new_secret("api_key")
    cred = await ctx.store.credentials.create(account.id, "api_key", secrets.secret_hash(secret),
                                              scopes=ctx.args.scope, label=ctx.args.label)
    data = {"id": cred.id, "account": account.login, "scopes": sorted(cred.scopes), "key": secret,
            "smtp_username": ctx.config.smtp.injection_user if "smtp:send" in cred.scopes else None}
    text = [f"API key {cred.id} for {account.login} ({', '.join(sorted(cred.scopes))}), shown only once:",
            f"  {secret}"]
    if "smtp:send" in cred.scopes:
        text.append(f"  SMTP: user {ctx.config.smtp.injection_user}, password: the key")
    ctx.emit(data, text)


async def list_api_keys(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    found = await ctx.store.credentials.list(account.id, kind="api_key")
    ctx.emit(found, table(_credential_rows(found), ["ID", "USERNAME", "DOMAIN", "SCOPES", "LABEL"]))


async def revoke_api_key(ctx: Context) -> None:
    account = await ctx.account(ctx.args.account)
    cred = await ctx.store.credentials.revoke(account.id, credential_id=ctx.args.id)
    ctx.emit({"id": cred.id, "revoked": True}, f"revoked API key {cred.id}")
