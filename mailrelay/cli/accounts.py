"""``mailrelay account ...``: accounts and sub-accounts."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from mailrelay import secrets
from mailrelay.cli.main import CLIError, Context, table
from mailrelay.storage.accounts import SETTINGS
from mailrelay.storage.model import Account


def register(nouns: Any) -> None:
    account = nouns.add_parser("account", help="create and manage accounts and sub-accounts")
    verbs = account.add_subparsers(dest="verb_name", metavar="VERB", required=True)

    create = verbs.add_parser("create", help="create an account (password read from stdin)")
    create.add_argument("name")
    create.add_argument("--parent", help="create a sub-account of this account (login: PARENT\\NAME)")
    create.add_argument("--daily-quota", type=_non_negative, help="messages per UTC day (default: no limit)")
    create.add_argument("--unapproved", action="store_true", help="create it unapproved (cannot send yet)")
    create.add_argument("--no-password", action="store_true",
                        help="no account password (send with generated credentials only)")
    create.set_defaults(verb=create_account)

    ls = verbs.add_parser("list", help="list accounts")
    ls.add_argument("--parent", help="only the sub-accounts of this account")
    ls.set_defaults(verb=list_accounts)

    show = verbs.add_parser("show", help="show one account")
    show.add_argument("name")
    show.set_defaults(verb=show_account)

    for name, flags, text in (
        ("suspend", {"suspended": True}, "stop an account from sending"),
        ("unsuspend", {"suspended": False}, "let a suspended account send again"),
        ("approve", {"approved": True}, "approve an account"),
        ("unapprove", {"approved": False}, "withdraw an account's approval"),
    ):
        p = verbs.add_parser(name, help=text)
        p.add_argument("name")
        p.set_defaults(verb=_flag_setter(flags))

    setp = verbs.add_parser("set", help="change an account's settings")
    setp.add_argument("name")
    for key, kind in SETTINGS.items():
        option = "--" + key.replace("_", "-")
        if kind is bool:
            setp.add_argument(option, choices=["on", "off"], default=argparse.SUPPRESS)
        elif kind is int:
            setp.add_argument(option, type=_non_negative_or_none, metavar="N|none", default=argparse.SUPPRESS)
        else:
            setp.add_argument(option, metavar="TEXT|''", default=argparse.SUPPRESS)
    setp.set_defaults(verb=set_account)

    password = verbs.add_parser("password", help="set an account's password (read from stdin)")
    password.add_argument("name")
    password.set_defaults(verb=set_password)


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}")
    if n < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return n


def _non_negative_or_none(value: str) -> int | None:
    return None if value.lower() == "none" else _non_negative(value)


def describe(a: Account) -> list[str]:
    status = "suspended" if a.suspended else ("approved" if a.approved else "not approved")
    return [
        f"account {a.login} (id {a.id}): {status}",
        f"  daily quota: {a.daily_quota if a.daily_quota is not None else 'none'}",
        f"  notification address: {a.notification_address or '-'}",
        f"  tracking: opens {'on' if a.open_tracking else 'off'}, clicks {'on' if a.click_tracking else 'off'},"
        f" unsubscribe link {'on' if a.unsubscribe_link else 'off'}",
    ]


async def read_password(ctx: Context, prompt: str) -> str:
    if ctx.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise CLIError("the passwords do not match")
        password = first
    else:
        password = ctx.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise CLIError("the password must have at least 8 characters (give it on stdin)")
    if secrets.looks_generated(password):
        raise CLIError("the password must not start with mrs_, mrt_ or mrk_ (those mark generated credentials)")
    return password


async def create_account(ctx: Context) -> None:
    if ctx.args.name.casefold() == ctx.config.smtp.injection_user.casefold():
        raise CLIError(f"{ctx.args.name!r} is the SMTP injection user name; choose another account name")
    password_hash = None
    if not ctx.args.no_password:
        password = await read_password(ctx, "Password: ")
        password_hash = await ctx.in_thread(secrets.hash_password, password)
    account = await ctx.store.accounts.create(ctx.args.name, password_hash, parent=ctx.args.parent,
                                              daily_quota=ctx.args.daily_quota, approved=not ctx.args.unapproved)
    ctx.emit(account, describe(account))


async def list_accounts(ctx: Context) -> None:
    found = await ctx.store.accounts.list(parent=ctx.args.parent)
    rows = [(a.id, a.login, "yes" if a.approved else "no", "yes" if a.suspended else "no",
             a.daily_quota if a.daily_quota is not None else "-") for a in found]
    ctx.emit(found, table(rows, ["ID", "LOGIN", "APPROVED", "SUSPENDED", "DAILY QUOTA"]))


async def show_account(ctx: Context) -> None:
    account = await ctx.account(ctx.args.name)
    ctx.emit(account, describe(account))


def _flag_setter(flags: dict[str, bool]) -> Any:
    async def setter(ctx: Context) -> None:
        account = await ctx.store.accounts.update(ctx.args.name, **flags)
        ctx.emit(account, describe(account))

    return setter


async def set_account(ctx: Context) -> None:
    changes: dict[str, Any] = {}
    given = vars(ctx.args)
    for key, kind in SETTINGS.items():
        if key in given:
            value = given[key]
            changes[key] = (value == "on") if kind is bool else (value if value != "" else None)
    if not changes:
        raise CLIError("nothing to change: give at least one setting, e.g. --daily-quota 1000")
    account = await ctx.store.accounts.update(ctx.args.name, **changes)
    ctx.emit(account, describe(account))


async def set_password(ctx: Context) -> None:
    password = await read_password(ctx, "New password: ")
    hashed = await ctx.in_thread(secrets.hash_password, password)
    account = await ctx.store.accounts.update(ctx.args.name, password_hash=hashed)
    ctx.emit({"account": account.login, "password": "changed"}, f"password of {account.login} changed")
