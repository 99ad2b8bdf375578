"""
SMTP AUTH: which credential a login names, whether it is right, and who it is.

A ``twisted.cred`` ``Portal`` holds one checker per credential form and a
realm whose avatar is a ``mailrelay.types.Principal``.  ``Authenticator`` sits
in front of the portal and adds what SMTP needs on top of it: choosing the form
from the user name, a short login cache (so a client that reconnects for every
message does not pay argon2 every time), one check shared by identical logins
that arrive together, and a per-client failure throttle.

The forms, decided from the user name alone, in this order (``form_of``):

1. the injection user (``SMTPConfig.injection_user``, compared
   case-insensitively, so ``SMTP_Injection`` is ``smtp_injection``; only the
   configured name is accepted: an operator migrating from Mailtarget sets
   ``injection_user = "smtp_mt_injection"``) with an API key as password.  The
   key needs the ``smtp:send`` scope, or the login fails like a wrong password;
2. ``parent\\child``: a sub-account and its password (Moosend);
3. user name == password and starting with ``mrt_``: an API token (MailPace);
4. a user name containing ``@`` with a password starting with ``mrs_``: a
   generated SMTP user of a sending domain (MailerSend).  The password prefix
   is what tells it apart, because ``<hex>@domain`` is also a legal account
   name;
5. anything else: an account name and its password (argon2id, verified in a
   thread pool, never on the reactor thread).

Generated secrets are looked up by their SHA-256 only; no KDF.

A suspended or unapproved account can still authenticate: the policy refuses
its mail with a precise reply ("Account is not allowed to send"), which tells
the customer far more than ``535``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from mailrelay import secrets
from mailrelay.config import SMTPConfig
from mailrelay.interfaces import ICredentialStore
from mailrelay.storage.model import LoginRecord
from mailrelay.types import Principal, Reply, SMTPReplyError

log = Logger()

TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed login attempts, try again later")
# RFC 4954's reply for "cannot check now": too many password checks queued.
AUTH_BUSY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")

SEND_SCOPE = "smtp:send"

# The form names are the credential kinds of LoginRecord and Principal.
PASSWORD = "password"
SMTP_USER = "smtp_user"
API_TOKEN = "api_token"
API_KEY = "api_key"

_SECRET_PREFIXES = tuple(secrets.PREFIXES.values())


def form_of(username: str, password: str, injection_user: str) -> str:
    """Which credential form a login uses (see the module docstring)."""
    if username.casefold() == injection_user.casefold():
        return API_KEY
    if "\\" in username:
        return PASSWORD
    if username == password and username.startswith(secrets.PREFIXES[API_TOKEN]):
        return API_TOKEN
    if "@" in username and password.startswith(secrets.PREFIXES[SMTP_USER]):
        return SMTP_USER
    return PASSWORD


# --- credentials: one interface per form, so the portal picks the checker ----------


class IAccountPassword(ICredentials):
    login = Attribute("The account name, or parent\\child for a sub-account.")
    password = Attribute("The password as typed.")


class ISMTPUserSecret(ICredentials):
    username = Attribute("The generated SMTP user name.")
    secret = Attribute("Its generated password.")


class IAPIToken(ICredentials):
    token = Attribute("A domain API token (sent as both user name and password).")


class IInjectionKey(ICredentials):
    key = Attribute("An API key given as the injection user's password.")


class IPrincipal(Interface):
    """The avatar interface: the avatar is a ``mailrelay.types.Principal``."""


@implementer(IAccountPassword)
@attrs.frozen
class AccountPassword:
    login: str
    password: str = attrs.field(repr=False)


@implementer(ISMTPUserSecret)
@attrs.frozen
class SMTPUserSecret:
    username: str
    secret: str = attrs.field(repr=False)


@implementer(IAPIToken)
@attrs.frozen
class APIToken:
    token: str = attrs.field(repr=False)


@implementer(IInjectionKey)
@attrs.frozen
class InjectionKey:
    key: str = attrs.field(repr=False)


# --- password verification off the reactor thread --------------------------------

_dummy_hash: str | None = None


def _verify_in_thread(stored_hash: str | None, password: str) -> bool:
    """
    argon2 verification, run in a pool thread.  Unknown accounts and accounts
    without a password verify against a dummy hash, so their answer takes as
    long as a wrong password's and does not tell which account names exist.
    """
    global _dummy_hash
    if stored_hash is None:
        if _dummy_hash is None:
            _dummy_hash = secrets.hash_password(os.urandom(16).hex())
        secrets.verify_password(_dummy_hash, password)
        return False
    return secrets.verify_password(stored_hash, password)


class PasswordVerifier:
    """
    Runs argon2 in ``threadpool`` (argon2 releases the GIL, so it uses other
    cores) and bounds the checks waiting there: beyond ``max_pending`` a login
    is answered ``454`` at once instead of queueing behind a flood.
    """

    def __init__(self, reactor: IReactorFromThreads, threadpool: ThreadPool, max_pending: int = 64) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._max_pending = max_pending
        self.pending = 0

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        if self.pending >= self._max_pending:
            raise SMTPReplyError(AUTH_BUSY)
        self.pending += 1
        try:
            return await deferToThreadPool(self._reactor, self._threadpool, _verify_in_thread, stored_hash, password)
        finally:
            self.pending -= 1


# --- checkers and realm -----------------------------------------------------------


@implementer(ICredentialsChecker)
class AccountPasswordChecker:
    """Account (or ``parent\\child`` sub-account) name and argon2id password."""

    credentialInterfaces = (IAccountPassword,)

    def __init__(self, store: ICredentialStore, verifier: PasswordVerifier) -> None:
        self._store = store
        self._verifier = verifier

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: AccountPassword) -> LoginRecord:
        record: LoginRecord | None = await self._store.account_login(credentials.login)
        stored = record.password_hash if record is not None else None
        # No password set means no login with any password, but the same work is done.
        if not await self._verifier.verify(stored, credentials.password) or record is None:
            raise UnauthorizedLogin()
        return record


async def _token_record(store: ICredentialStore, kind: str, secret: str) -> LoginRecord:
    record: LoginRecord | None = await store.token_login(kind, secrets.secret_hash(secret))
    if record is None:
        raise UnauthorizedLogin()
    return record


@implementer(ICredentialsChecker)
class SMTPUserChecker:
    """A generated SMTP user: found by its secret's SHA-256, then the name must match."""

    credentialInterfaces = (ISMTPUserSecret,)

    def __init__(self, store: ICredentialStore) -> None:
        self._store = store

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: SMTPUserSecret) -> LoginRecord:
        record = await _token_record(self._store, SMTP_USER, credentials.secret)
        # Generated names are lower case; mail clients may not keep the case.
        if not secrets.constant_time_equal((record.username or "").lower(), credentials.username.lower()):
            raise UnauthorizedLogin()
        return record


@implementer(ICredentialsChecker)
class APITokenChecker:
    """A domain API token used as user name and password."""

    credentialInterfaces = (IAPIToken,)

    def __init__(self, store: ICredentialStore) -> None:
        self._store = store

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(_token_record(self._store, API_TOKEN, credentials.token))


@implementer(ICredentialsChecker)
class InjectionKeyChecker:
    """An API key for the injection user; without ``smtp:send`` it is a wrong password."""

    credentialInterfaces = (IInjectionKey,)

    def __init__(self, store: ICredentialStore) -> None:
        self._store = store

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: InjectionKey) -> LoginRecord:
        record = await _token_record(self._store, API_KEY, credentials.key)
        if SEND_SCOPE not in record.scopes:
            raise UnauthorizedLogin()
        return record


def principal_of(record: LoginRecord) -> Principal:
    return Principal(
        account_id=record.account_id,
        account_name=record.account_name,
        credential_kind=record.kind,
        credential_id=record.credential_id,
        parent_id=record.parent_id,
        scopes=record.scopes,
        domain=record.domain,
    )


@implementer(IRealm)
class PrincipalRealm:
    """Turns the checker's ``LoginRecord`` (the avatar id) into a ``Principal``."""

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> tuple[Any, object, Callable[[], None]]:
        if IPrincipal not in interfaces:
            raise NotImplementedError("the SMTP realm only gives IPrincipal avatars")
        return IPrincipal, principal_of(avatarId), lambda: None


def make_portal(store: ICredentialStore, verifier: PasswordVerifier) -> Portal:
    return Portal(
        PrincipalRealm(),
        [
            AccountPasswordChecker(store, verifier),
            SMTPUserChecker(store),
            APITokenChecker(store),
            InjectionKeyChecker(store),
        ],
    )


# --- login cache and failure throttle ----------------------------------------------


class LoginCache:
    """
    Successful logins for ``ttl`` seconds from the check (a hit does not extend
    it), so a revoked credential or changed password stops working within
    ``ttl`` in every process at worst; ``ChangeWatcher`` clears it within
    about a second of a change.  Keys are an HMAC of user name and password under
    a per-process random key: neither is kept in memory in plaintext (an API
    token's user name is the secret).  At most ``max_entries``; the oldest,
    which expires first, goes first.
    """

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int = 10_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        #: Moves on ``clear``: a login checked before it is not kept after it.
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, username: str, password: str) -> bytes:
        name = username.encode("utf-8")
        message = len(name).to_bytes(4, "big") + name + password.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[key]

    def get(self, key: bytes) -> Principal | None:
        self._expire(self._clock.seconds())
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def put(self, key: bytes, principal: Principal, epoch: int) -> None:
        """Keep ``principal``, checked when ``self.epoch`` was ``epoch`` (not if a ``clear`` came since)."""
        if self._ttl <= 0 or self._max_entries <= 0 or epoch != self.epoch:
            return
        now = self._clock.seconds()
        self._expire(now)
        self._entries.pop(key, None)
        self._entries[key] = (now + self._ttl, principal)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget_account(self, account_id: int) -> None:
        """Drop an account's cached logins at once (when this process revokes or suspends)."""
        for key in [k for k, (_, p) in self._entries.items() if p.account_id == account_id]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()
        self.epoch += 1


def client_key(client_ip: str) -> str:
    """
    Whose failures count together: one IPv4 address, or one IPv6 /64 (a single
    host usually owns the whole /64, so per-address counting would not bind).
    """
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.define
class _Failures:
    count: int
    last: float
    blocked: bool = False


class FailureThrottle:
    """
    Failed logins per client.  After ``before_delay`` failures each further
    failure's answer waits 1, 2, 4… seconds (at most ``max_delay``); the
    ``before_block``-th failure is answered ``421`` and the client is refused
    for ``block_seconds``.  A client's record is forgotten ``block_seconds``
    after its last failure, which also lifts a block; a success forgets it at
    once.  At most ``max_entries`` clients are tracked (oldest forgotten
    first), so memory stays bounded under a distributed attack.
    """

    def __init__(
        self,
        clock: IReactorTime,
        before_delay: int,
        before_block: int,
        block_seconds: float,
        max_delay: float = 5.0,
        max_entries: int = 100_000,
    ) -> None:
        self._clock = clock
        self._before_delay = before_delay
        self._before_block = before_block
        self._block_seconds = block_seconds
        self._max_delay = max_delay
        self._max_entries = max_entries
        # In order of last failure, so the expired ones are at the front.
        self._clients: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def _expire(self, now: float) -> None:
        while self._clients:
            key, record = next(iter(self._clients.items()))
            if record.last + self._block_seconds > now:
                break
            del self._clients[key]

    def failures(self, client_ip: str) -> int:
        self._expire(self._clock.seconds())
        record = self._clients.get(client_key(client_ip))
        return record.count if record is not None else 0

    def check(self, client_ip: str) -> None:
        """Raise the ``421`` while ``client_ip`` is blocked."""
        self._expire(self._clock.seconds())
        record = self._clients.get(client_key(client_ip))
        if record is not None and record.blocked:
            raise SMTPReplyError(TOO_MANY_FAILURES, close=True)

    def failed(self, client_ip: str) -> float:
        """Count a failure; returns how long to delay its answer, or raises the ``421``."""
        now = self._clock.seconds()
        self._expire(now)
        key = client_key(client_ip)
        record = self._clients.pop(key, None) or _Failures(0, now)
        record.count += 1
        record.last = now
        self._clients[key] = record
        while len(self._clients) > self._max_entries:
            self._clients.popitem(last=False)
        if record.count >= self._before_block:
            if not record.blocked:
                log.warn(
                    "AUTH: blocking {client} for {seconds:.0f}s after {count} failed logins",
                    client=key,
                    seconds=self._block_seconds,
                    count=record.count,
                )
            record.blocked = True
            raise SMTPReplyError(TOO_MANY_FAILURES, close=True)
        if record.count > self._before_delay:
            return float(min(self._max_delay, 2 ** (record.count - self._before_delay - 1)))
        return 0.0

    def succeeded(self, client_ip: str) -> None:
        self._clients.pop(client_key(client_ip), None)


def loggable_username(username: str, password: str) -> str:
    """
    The user name as it may appear in logs: an API token (user name ==
    password) or anything shaped like a generated secret is a secret itself,
    so only a prefix of its SHA-256 is shown (it matches the stored hash).
    """
    if username == password or username.startswith(_SECRET_PREFIXES):
        return f"<secret sha256:{secrets.secret_hash(username)[:12]}>"
    return username[:128]


class Authenticator:
    """
    What ``ISMTPDelegate.authenticate`` calls.

    ``clock`` times the cache and the throttle; ``reactor`` and ``threadpool``
    run argon2 off the reactor thread (``deferToThreadPool``).  The wiring
    passes the reactor for both, and a started ``ThreadPool`` of its own
    (stopped at shutdown) so password checks do not wait behind database work.
    """

    def __init__(
        self,
        store: ICredentialStore,
        config: SMTPConfig,
        clock: IReactorTime,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        *,
        cache_size: int = 10_000,
        tracked_clients: int = 100_000,
        max_failure_delay: float = 5.0,
        max_pending_verifications: int = 64,
    ) -> None:
        self._clock = clock
        self._injection_user = config.injection_user
        self.verifier = PasswordVerifier(reactor, threadpool, max_pending_verifications)
        self.portal = make_portal(store, self.verifier)
        self.cache = LoginCache(clock, config.login_cache_seconds, cache_size)
        # Logins being checked, by cache epoch and key, with the sessions waiting for the same answer.
        self._checking: dict[tuple[int, bytes], list[Deferred[Principal]]] = {}
        self.throttle = FailureThrottle(
            clock,
            config.auth_failures_before_delay,
            config.auth_failures_before_block,
            config.auth_block_seconds,
            max_failure_delay,
            tracked_clients,
        )

    def blocked(self, client_ip: str) -> bool:
        """True while ``client_ip`` is refused (the delegate may refuse it at connect)."""
        try:
            self.throttle.check(client_ip)
        except SMTPReplyError:
            return True
        return False

    def authenticate(self, client_ip: str, mechanism: str, username: str, password: str) -> Deferred[Principal]:
        """
        A ``Principal``, or ``UnauthorizedLogin`` (``535``), or
        ``SMTPReplyError`` (``421`` while the client is blocked, ``454`` when
        too many password checks are queued).  Cancelling it cancels a
        pending failure delay.
        """
        return Deferred.fromCoroutine(self._authenticate(client_ip, mechanism, username, password))

    def _credentials(self, username: str, password: str) -> ICredentials:
        form = form_of(username, password, self._injection_user)
        if form == API_KEY:
            return InjectionKey(password)
        if form == API_TOKEN:
            return APIToken(password)
        if form == SMTP_USER:
            return SMTPUserSecret(username, password)
        return AccountPassword(username, password)

    async def _authenticate(self, client_ip: str, mechanism: str, username: str, password: str) -> Principal:
        self.throttle.check(client_ip)
        key = self.cache.key(username, password)
        cached = self.cache.get(key)
        if cached is not None:
            self.throttle.succeeded(client_ip)
            return cached
        try:
            principal = await self._check_once(key, username, password)
        except UnauthorizedLogin:
            log.info(
                "AUTH {mechanism} failed from {client_ip} for user {username!r}",
                mechanism=mechanism,
                client_ip=client_ip,
                username=loggable_username(username, password),
            )
            delay = self.throttle.failed(client_ip)
            if delay:
                await deferLater(self._clock, delay)
            raise UnauthorizedLogin() from None
        # Parallel connections may have got the client blocked meanwhile.
        self.throttle.check(client_ip)
        self.throttle.succeeded(client_ip)
        return principal

    def _check_once(self, key: bytes, username: str, password: str) -> Deferred[Principal]:
        """
        The store's (and argon2's) answer for these credentials.  Logins with
        the same name and password that arrive while one is being checked
        wait for that answer instead of starting their own: an application
        that opens 50 connections at once costs one argon2 check, not 50
        (about 25 ms of CPU each).  Each caller gets its own Deferred, so one
        that gives up (a dropped connection) does not touch the others.
        """
        mine: Deferred[Principal] = Deferred()
        epoch = self.cache.epoch
        # A login after a revocation or password change (the cache's epoch
        # moved) does not join a check that started before it.
        checking = (epoch, key)
        waiting = self._checking.get(checking)
        if waiting is not None:
            waiting.append(mine)
            return mine
        waiting = self._checking[checking] = [mine]

        def answered(result: Principal | Failure) -> None:
            del self._checking[checking]
            if not isinstance(result, Failure):
                self.cache.put(key, result, epoch)
            for waiter in waiting:
                if waiter.called:  # cancelled by its session
                    continue
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        Deferred.fromCoroutine(self._check(username, password)).addBoth(answered)
        return mine

    async def _check(self, username: str, password: str) -> Principal:
        if not username or not password:
            raise UnauthorizedLogin()
        _, avatar, _ = await self.portal.login(self._credentials(username, password), None, IPrincipal)
        return cast(Principal, avatar)
