"""
SMTP AUTH: the four credential forms, the login cache and the failure throttle.

Unit tests use an in-memory ``ICredentialStore``, a ``Clock`` and a thread pool
that runs (or holds) jobs in the test's thread; the classes at the bottom run
the same logins against real storage on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from argon2 import PasswordHasher
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import secrets
from mailrelay.config import SMTPConfig
from mailrelay.interfaces import ICredentialStore
from mailrelay.smtp import auth
from mailrelay.smtp.auth import (
    API_KEY,
    API_TOKEN,
    PASSWORD,
    SMTP_USER,
    Authenticator,
    FailureThrottle,
    client_key,
    form_of,
)
from mailrelay.storage.model import LoginRecord
from mailrelay.types import Principal, SMTPReplyError
from tests.support.db import fresh_store

# Cheap argon2id parameters: verify_password reads them from the hash.
_cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
IP = "192.0.2.10"


@implementer(ICredentialStore)
class FakeCredentialStore:
    """Logins in dicts; counts every lookup."""

    def __init__(self) -> None:
        self.accounts: dict[str, LoginRecord] = {}
        self.tokens: dict[tuple[str, str], LoginRecord] = {}
        self.calls = 0

    def add_account(self, login: str, password: str | None, account_id: int = 1, **kw: Any) -> None:
        self.accounts[login] = LoginRecord(
            account_id=account_id,
            account_name=login,
            parent_id=kw.pop("parent_id", None),
            approved=kw.pop("approved", True),
            suspended=kw.pop("suspended", False),
            kind="password",
            password_hash=_cheap.hash(password) if password is not None else None,
        )

    def add_token(self, kind: str, secret: str, account_id: int = 1, **kw: Any) -> None:
        self.tokens[(kind, secrets.secret_hash(secret))] = LoginRecord(
            account_id=account_id,
            account_name=kw.pop("account_name", "shop"),
            parent_id=None,
            approved=True,
            suspended=False,
            kind=kind,
            credential_id=kw.pop("credential_id", 7),
            **kw,
        )

    def revoke(self, kind: str, secret: str) -> None:
        del self.tokens[(kind, secrets.secret_hash(secret))]

    def account_login(self, name: str) -> Deferred[LoginRecord | None]:
        self.calls += 1
        return succeed(self.accounts.get(name))

    def token_login(self, kind: str, secret_hash: str) -> Deferred[LoginRecord | None]:
        self.calls += 1
        return succeed(self.tokens.get((kind, secret_hash)))


@implementer(IReactorFromThreads)
class FakeReactor:
    """``callFromThread`` for jobs that ran in the test's thread."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


class FakeThreadPool(ThreadPool):
    """Runs jobs at once, or holds them (``hold``) until ``run_held``; counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs = 0
        self.hold = False
        self.held: list[Callable[[], None]] = []

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any, **kw: Any) -> None:
        self.jobs += 1

        def job() -> None:
            try:
                result = func(*args, **kw)
            except BaseException:
                onResult(False, Failure())
            else:
                onResult(True, result)

        if self.hold:
            self.held.append(job)
        else:
            job()

    def run_held(self) -> None:
        jobs, self.held = self.held, []
        for job in jobs:
            job()


KEY = "mrk_" + "k" * 43
TOKEN = "mrt_" + "t" * 43
USER_SECRET = "mrs_" + "s" * 43
USER = "0123456789ab@example.com"


class AuthTestMixin:
    def setUp(self) -> None:
        self.store = FakeCredentialStore()
        self.clock = Clock()
        self.pool = FakeThreadPool()
        self.config = SMTPConfig(
            auth_failures_before_delay=2,
            auth_failures_before_block=5,
            auth_block_seconds=100.0,
            login_cache_seconds=60.0,
        )
        self.store.add_account("shop", "correct horse")
        self.store.add_account("shop\\billing", "child pw", account_id=2, parent_id=1)
        self.store.add_token(SMTP_USER, USER_SECRET, username=USER, domain="example.com", credential_id=11)
        self.store.add_token(API_TOKEN, TOKEN, domain="example.com", credential_id=12)
        self.store.add_token(API_KEY, KEY, scopes=frozenset({"smtp:send", "stats:read"}), credential_id=13)
        self.store.add_token(API_KEY, "mrk_noscope", scopes=frozenset({"stats:read"}), credential_id=14)

    def make(self, config: SMTPConfig | None = None, **kw: Any) -> Authenticator:
        return Authenticator(self.store, config or self.config, self.clock, FakeReactor(), self.pool, **kw)

    def ok(self, authenticator: Authenticator, username: str, password: str, ip: str = IP) -> Principal:
        principal = self.successResultOf(authenticator.authenticate(ip, "PLAIN", username, password))  # type: ignore[attr-defined]
        self.assertIsInstance(principal, Principal)  # type: ignore[attr-defined]
        return principal  # type: ignore[no-any-return]

    def refused(self, authenticator: Authenticator, username: str, password: str, ip: str = IP) -> Failure:
        failure = self.failureResultOf(  # type: ignore[attr-defined]
            authenticator.authenticate(ip, "LOGIN", username, password), UnauthorizedLogin, SMTPReplyError
        )
        return failure  # type: ignore[no-any-return]


class FormTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """The user name (and for tokens the password) decides which checker runs."""
        cases = [
            (("smtp_injection", KEY), API_KEY),
            (("SMTP_Injection", KEY), API_KEY),
            (("shop\\billing", "pw"), PASSWORD),
            ((TOKEN, TOKEN), API_TOKEN),
            ((TOKEN, "other"), PASSWORD),
            (("abc", "abc"), PASSWORD),
            ((USER, USER_SECRET), SMTP_USER),
            ((USER, "a person's password"), PASSWORD),
            (("ops@example.com", "pw"), PASSWORD),
            (("shop", "pw"), PASSWORD),
        ]
        for (username, password), form in cases:
            self.assertEqual(form_of(username, password, "smtp_injection"), form, (username, password))

    def test_configured_injection_user_only(self) -> None:
        """Only the configured injection user name selects the API-key form."""
        self.assertEqual(form_of("SMTP_MT_Injection", KEY, "smtp_mt_injection"), API_KEY)
        self.assertEqual(form_of("smtp_injection", KEY, "smtp_mt_injection"), PASSWORD)

    def test_client_key(self) -> None:
        """IPv4 counts per address, IPv6 per /64, IPv4-mapped IPv6 as its IPv4 address."""
        self.assertEqual(client_key("192.0.2.1"), "192.0.2.1")
        self.assertEqual(client_key("2001:db8::1"), client_key("2001:db8::ffff:2"))
        self.assertNotEqual(client_key("2001:db8::1"), client_key("2001:db8:0:1::1"))
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(client_key("not an ip"), "not an ip")


class CredentialFormTests(AuthTestMixin, SynchronousTestCase):
    def test_fake_store_provides_interface(self) -> None:
        """The in-memory store provides ICredentialStore."""
        self.assertTrue(verifyObject(ICredentialStore, self.store))

    def test_account_password(self) -> None:
        """An account name and its password give a password Principal for the account."""
        principal = self.ok(self.make(), "shop", "correct horse")
        self.assertEqual(
            (principal.account_id, principal.account_name, principal.credential_kind, principal.credential_id),
            (1, "shop", "password", None),
        )
        self.assertIsNone(principal.domain)

    def test_account_wrong_password(self) -> None:
        """A wrong account password is UnauthorizedLogin (535)."""
        self.refused(self.make(), "shop", "battery staple")

    def test_account_unknown_costs_a_verification(self) -> None:
        """An unknown account fails after the same argon2 work, so it does not reveal which names exist."""
        self.refused(self.make(), "nobody", "pw")
        self.assertEqual(self.pool.jobs, 1)

    def test_account_without_password(self) -> None:
        """An account with no password set cannot log in with any password."""
        self.store.add_account("nopw", None)
        authenticator = self.make()
        for password in ("pw", "None", "x" * 64):
            self.refused(authenticator, "nopw", password, ip=f"192.0.2.{len(password)}")

    def test_suspended_account_authenticates(self) -> None:
        """A suspended, unapproved account still logs in: the policy refuses its mail later."""
        self.store.add_account("frozen", "pw", account_id=9, approved=False, suspended=True)
        self.assertEqual(self.ok(self.make(), "frozen", "pw").account_id, 9)

    def test_subaccount(self) -> None:
        """``parent\\child`` logs in as the sub-account with its own password, naming its parent."""
        principal = self.ok(self.make(), "shop\\billing", "child pw")
        self.assertEqual((principal.account_id, principal.parent_id), (2, 1))
        self.refused(self.make(), "shop\\billing", "correct horse")

    def test_password_verified_in_thread_pool(self) -> None:
        """argon2 runs in the thread pool: nothing is answered until the pool's job has run."""
        self.pool.hold = True
        d = self.make().authenticate(IP, "PLAIN", "shop", "correct horse")
        self.assertNoResult(d)
        self.assertEqual(len(self.pool.held), 1)
        self.pool.run_held()
        self.assertEqual(self.successResultOf(d).account_id, 1)

    def test_too_many_pending_verifications(self) -> None:
        """Beyond the bound of queued argon2 checks a login is answered 454 at once, not queued."""
        self.pool.hold = True
        authenticator = self.make(max_pending_verifications=1)
        first = authenticator.authenticate("192.0.2.1", "PLAIN", "shop", "correct horse")
        second = authenticator.authenticate("192.0.2.2", "PLAIN", "shop\\billing", "child pw")
        self.assertEqual(self.failureResultOf(second, SMTPReplyError).value.reply.code, 454)
        self.pool.run_held()
        self.successResultOf(first)
        self.assertEqual(authenticator.verifier.pending, 0)
        self.assertEqual(authenticator.throttle.failures("192.0.2.2"), 0)

    def test_smtp_user(self) -> None:
        """A generated SMTP user logs in with its secret and is restricted to its domain."""
        principal = self.ok(self.make(), USER.upper(), USER_SECRET)
        self.assertEqual((principal.credential_kind, principal.credential_id), ("smtp_user", 11))
        self.assertEqual(principal.domain, "example.com")
        self.assertEqual(self.pool.jobs, 0)

    def test_smtp_user_wrong_secret_or_name(self) -> None:
        """A wrong secret, or the right secret under another user name, is refused."""
        authenticator = self.make()
        self.refused(authenticator, USER, "mrs_wrong")
        self.refused(authenticator, "ffffffffffff@example.com", USER_SECRET)

    def test_smtp_user_revoked(self) -> None:
        """A revoked SMTP user is refused."""
        self.store.revoke(SMTP_USER, USER_SECRET)
        self.refused(self.make(), USER, USER_SECRET)

    def test_api_token(self) -> None:
        """An API token as user name and password logs in, restricted to the token's domain."""
        principal = self.ok(self.make(), TOKEN, TOKEN)
        self.assertEqual((principal.credential_kind, principal.domain), ("api_token", "example.com"))

    def test_api_token_wrong_or_revoked(self) -> None:
        """An unknown or revoked API token is refused."""
        authenticator = self.make()
        self.refused(authenticator, "mrt_unknown", "mrt_unknown")
        self.store.revoke(API_TOKEN, TOKEN)
        self.refused(authenticator, TOKEN, TOKEN)

    def test_injection_user(self) -> None:
        """The injection user (any case) with an smtp:send API key logs in with the key's scopes."""
        principal = self.ok(self.make(), "SMTP_Injection", KEY)
        self.assertEqual((principal.credential_kind, principal.credential_id), ("api_key", 13))
        self.assertIn("smtp:send", principal.scopes)

    def test_injection_key_without_scope(self) -> None:
        """An API key without smtp:send fails exactly like a wrong key."""
        authenticator = self.make()
        self.assertIsInstance(self.refused(authenticator, "smtp_injection", "mrk_noscope").value, UnauthorizedLogin)
        self.assertIsInstance(self.refused(authenticator, "smtp_injection", "mrk_wrong").value, UnauthorizedLogin)

    def test_injection_key_revoked(self) -> None:
        """A revoked API key is refused."""
        self.store.revoke(API_KEY, KEY)
        self.refused(self.make(), "smtp_injection", KEY)

    def test_configured_injection_user(self) -> None:
        """With injection_user = smtp_mt_injection that name takes keys and the default name is an account."""
        authenticator = self.make(SMTPConfig(injection_user="smtp_mt_injection"))
        self.ok(authenticator, "SMTP_MT_INJECTION", KEY)
        self.refused(authenticator, "smtp_injection", KEY)
        self.assertEqual(self.pool.jobs, 1)

    def test_empty_credentials(self) -> None:
        """An empty user name or password fails without asking the store."""
        authenticator = self.make()
        self.refused(authenticator, "shop", "")
        self.refused(authenticator, "", "pw")
        self.assertEqual(self.store.calls, 0)

    def test_store_error_is_not_a_login_failure(self) -> None:
        """A storage failure propagates (451 from the protocol) and is not counted as a failed login."""

        def broken(name: str) -> Deferred[LoginRecord | None]:
            raise RuntimeError("database unavailable")

        self.store.account_login = broken  # type: ignore[method-assign]
        authenticator = self.make()
        self.failureResultOf(authenticator.authenticate(IP, "PLAIN", "shop", "pw"), RuntimeError)
        self.assertEqual(authenticator.throttle.failures(IP), 0)

    def test_failures_logged_without_secrets(self) -> None:
        """A failed login is logged with IP, mechanism and user name, never the password or a token."""
        events: list[dict[str, Any]] = []
        self.patch(auth, "log", Logger(observer=cast(ILogObserver, events.append)))
        authenticator = self.make()
        self.refused(authenticator, "shop", "hunter2-secret")
        self.refused(authenticator, "mrt_leaked", "mrt_leaked")
        self.assertEqual(len(events), 2)
        self.assertEqual((events[0]["client_ip"], events[0]["mechanism"], events[0]["username"]), (IP, "LOGIN", "shop"))
        text = repr(events)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("mrt_leaked", text)
        self.assertIn(secrets.secret_hash("mrt_leaked")[:12], events[1]["username"])


class LoginCacheTests(AuthTestMixin, SynchronousTestCase):
    def test_hit_skips_store_and_kdf(self) -> None:
        """A second identical login is answered from the cache: no store read, no argon2."""
        authenticator = self.make()
        first = self.ok(authenticator, "shop", "correct horse")
        calls, jobs = self.store.calls, self.pool.jobs
        for _ in range(5):
            self.assertEqual(self.ok(authenticator, "shop", "correct horse", ip="198.51.100.1"), first)
        self.assertEqual((self.store.calls, self.pool.jobs), (calls, jobs))

    def test_simultaneous_logins_share_one_check(self) -> None:
        """
        Identical logins that arrive while the first is checked wait for its
        answer: one store read, one argon2 check (an application opening 50
        connections at once used to cost 50).  Other credentials get their own.
        """
        self.pool.hold = True
        authenticator = self.make()
        same = [authenticator.authenticate(f"192.0.2.{i}", "PLAIN", "shop", "correct horse") for i in range(1, 4)]
        other = authenticator.authenticate(IP, "PLAIN", "shop\\billing", "child pw")
        self.assertEqual(len(self.pool.held), 2)
        for d in [*same, other]:
            self.assertNoResult(d)
        self.pool.run_held()
        principals = [self.successResultOf(d) for d in same]
        self.assertEqual({p.account_id for p in principals}, {1})
        self.assertEqual(self.successResultOf(other).account_id, 2)
        self.assertEqual((self.pool.jobs, len(authenticator.cache)), (2, 2))
        self.ok(authenticator, "shop", "correct horse")  # and later ones hit the cache
        self.assertEqual(self.pool.jobs, 2)

    def test_login_after_a_change_gets_its_own_check(self) -> None:
        """A login that arrives after the cache was cleared (a revocation) does not join a check started before."""
        self.pool.hold = True
        authenticator = self.make()
        first = authenticator.authenticate("192.0.2.1", "PLAIN", "shop", "correct horse")
        authenticator.cache.clear()
        second = authenticator.authenticate("192.0.2.2", "PLAIN", "shop", "correct horse")
        self.assertEqual(len(self.pool.held), 2)
        self.pool.run_held()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_simultaneous_wrong_logins_each_fail(self) -> None:
        """A shared check that fails refuses every login waiting on it, and each client's failure counts."""
        self.pool.hold = True
        authenticator = self.make()
        ds = [authenticator.authenticate(f"192.0.2.{i}", "PLAIN", "shop", "wrong") for i in (1, 2)]
        self.assertEqual(len(self.pool.held), 1)
        self.pool.run_held()
        for d in ds:
            self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual([authenticator.throttle.failures(f"192.0.2.{i}") for i in (1, 2)], [1, 1])
        self.assertEqual(len(authenticator.cache), 0)

    def test_abandoned_login_leaves_the_shared_check(self) -> None:
        """A session that goes away during the shared check (its login cancelled) leaves the others alone."""
        self.pool.hold = True
        authenticator = self.make()
        first = authenticator.authenticate("192.0.2.1", "PLAIN", "shop", "correct horse")
        second = authenticator.authenticate("192.0.2.2", "PLAIN", "shop", "correct horse")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.pool.run_held()
        self.assertEqual(self.successResultOf(second).account_id, 1)
        self.assertEqual(self.pool.jobs, 1)

    def test_other_password_not_a_hit(self) -> None:
        """A cached login does not make another password for the same name succeed."""
        authenticator = self.make()
        self.ok(authenticator, "shop", "correct horse")
        self.refused(authenticator, "shop", "correct horse ")

    def test_expires_after_ttl(self) -> None:
        """A cached login is checked again once login_cache_seconds have passed since the check."""
        authenticator = self.make()
        self.ok(authenticator, "shop", "correct horse")
        self.clock.advance(59)
        self.ok(authenticator, "shop", "correct horse")
        self.assertEqual(self.pool.jobs, 1)
        self.clock.advance(1)
        self.ok(authenticator, "shop", "correct horse")
        self.assertEqual(self.pool.jobs, 2)

    def test_revocation_within_ttl(self) -> None:
        """A revoked token keeps working from the cache at most until the TTL, then fails."""
        authenticator = self.make()
        self.ok(authenticator, TOKEN, TOKEN)
        self.store.revoke(API_TOKEN, TOKEN)
        self.clock.advance(30)
        self.ok(authenticator, TOKEN, TOKEN)
        self.clock.advance(30)
        self.refused(authenticator, TOKEN, TOKEN)

    def test_forget_account(self) -> None:
        """forget_account drops an account's cached logins at once."""
        authenticator = self.make()
        self.ok(authenticator, TOKEN, TOKEN)
        self.store.revoke(API_TOKEN, TOKEN)
        authenticator.cache.forget_account(1)
        self.refused(authenticator, TOKEN, TOKEN)

    def test_disabled(self) -> None:
        """login_cache_seconds = 0 caches nothing."""
        authenticator = self.make(SMTPConfig(login_cache_seconds=0))
        self.ok(authenticator, "shop", "correct horse")
        self.ok(authenticator, "shop", "correct horse")
        self.assertEqual((self.pool.jobs, len(authenticator.cache)), (2, 0))

    def test_bounded(self) -> None:
        """The cache holds at most cache_size logins; the oldest is checked again."""
        authenticator = self.make(cache_size=2)
        self.ok(authenticator, "shop", "correct horse")
        self.ok(authenticator, TOKEN, TOKEN)
        self.ok(authenticator, "smtp_injection", KEY)
        self.assertEqual(len(authenticator.cache), 2)
        self.ok(authenticator, "shop", "correct horse")
        self.assertEqual(self.pool.jobs, 2)

    def test_no_plaintext_in_cache(self) -> None:
        """The cache keeps neither the password nor a token user name in plaintext."""
        authenticator = self.make()
        self.ok(authenticator, "shop", "correct horse")
        self.ok(authenticator, TOKEN, TOKEN)
        text = repr(vars(authenticator.cache))
        for secret in ("correct horse", TOKEN, secrets.secret_hash(TOKEN)):
            self.assertNotIn(secret, text)


class FailureThrottleTests(AuthTestMixin, SynchronousTestCase):
    def test_delay_then_block(self) -> None:
        """Failures beyond the delay threshold answer late (1 s, 2 s); the fifth answers 421 and closes."""
        authenticator = self.make()
        self.refused(authenticator, "shop", "wrong1")
        self.refused(authenticator, "shop", "wrong2")
        for delay in (1, 2):
            d = authenticator.authenticate(IP, "LOGIN", "shop", "wrong")
            self.clock.advance(delay - 0.01)
            self.assertNoResult(d)
            self.clock.advance(0.01)
            self.failureResultOf(d, UnauthorizedLogin)
        blocked = self.refused(authenticator, "shop", "wrong5").value
        assert isinstance(blocked, SMTPReplyError)
        self.assertEqual((blocked.reply.code, blocked.reply.status, blocked.close), (421, "4.7.0", True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delay_capped(self) -> None:
        """The delay grows but never beyond max_failure_delay."""
        throttle = FailureThrottle(self.clock, 1, 100, 900.0, max_delay=3.0)
        self.assertEqual([throttle.failed(IP) for _ in range(6)], [0.0, 1.0, 2.0, 3.0, 3.0, 3.0])

    def block(self, authenticator: Authenticator, ip: str = IP) -> None:
        for i in range(5):
            d = authenticator.authenticate(ip, "LOGIN", "shop", f"wrong{i}")
            if not d.called:
                self.clock.advance(5)
            self.failureResultOf(d)
        self.assertTrue(authenticator.blocked(ip))

    def test_block_refuses_correct_credentials(self) -> None:
        """While blocked, even the right password gets 421 and neither store nor argon2 is asked."""
        authenticator = self.make()
        self.ok(authenticator, "shop", "correct horse")  # cached, and still refused below
        self.block(authenticator)
        calls, jobs = self.store.calls, self.pool.jobs
        refusal = self.refused(authenticator, "shop", "correct horse").value
        assert isinstance(refusal, SMTPReplyError)
        self.assertEqual(refusal.reply.code, 421)
        self.assertEqual((self.store.calls, self.pool.jobs), (calls, jobs))
        self.ok(authenticator, "shop", "correct horse", ip="192.0.2.99")

    def test_block_lifts(self) -> None:
        """The block lifts auth_block_seconds after the blocking failure, with a fresh count."""
        authenticator = self.make()
        self.block(authenticator)
        self.clock.advance(99)
        self.assertTrue(authenticator.blocked(IP))
        self.clock.advance(1)
        self.assertFalse(authenticator.blocked(IP))
        self.ok(authenticator, "shop", "correct horse")
        self.refused(authenticator, "shop", "wrong")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_success_resets(self) -> None:
        """A successful login forgets the client's failures: the next ones are answered at once."""
        authenticator = self.make()
        self.refused(authenticator, "shop", "wrong1")
        self.refused(authenticator, "shop", "wrong2")
        self.ok(authenticator, "shop", "correct horse")
        self.assertEqual(authenticator.throttle.failures(IP), 0)
        self.refused(authenticator, "shop", "wrong3")
        self.refused(authenticator, "shop", "wrong4")

    def test_clients_counted_apart(self) -> None:
        """One client's failures do not delay another's; an IPv6 /64 counts as one client."""
        authenticator = self.make()
        self.block(authenticator, "2001:db8::1")
        self.assertTrue(authenticator.blocked("2001:db8::2"))
        self.refused(authenticator, "shop", "wrong", ip="192.0.2.1")
        self.assertFalse(authenticator.blocked(IP))

    def test_failures_expire(self) -> None:
        """Failures older than auth_block_seconds are forgotten."""
        authenticator = self.make()
        self.refused(authenticator, "shop", "wrong1")
        self.refused(authenticator, "shop", "wrong2")
        self.clock.advance(100)
        self.assertEqual(authenticator.throttle.failures(IP), 0)
        self.assertEqual(len(authenticator.throttle), 0)
        self.refused(authenticator, "shop", "wrong3")

    def test_bounded(self) -> None:
        """At most tracked_clients clients are remembered."""
        authenticator = self.make(tracked_clients=3)
        for i in range(10):
            self.refused(authenticator, "shop", "wrong", ip=f"192.0.2.{i}")
        self.assertEqual(len(authenticator.throttle), 3)
        self.assertEqual(authenticator.throttle.failures("192.0.2.9"), 1)
        self.assertEqual(authenticator.throttle.failures("192.0.2.0"), 0)

    def test_cancel_delayed_failure(self) -> None:
        """Cancelling a delayed answer (connection lost) cancels its timer."""
        authenticator = self.make()
        self.refused(authenticator, "shop", "wrong1")
        self.refused(authenticator, "shop", "wrong2")
        d = authenticator.authenticate(IP, "LOGIN", "shop", "wrong3")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StorageAuthTestsMixin:
    """The four forms against real storage, with argon2 in a real thread pool."""

    engine: str
    clock: Clock

    async def authenticator(self) -> tuple[Any, Authenticator]:
        from twisted.internet import reactor

        self.clock = Clock()
        store = await fresh_store(self, self.engine)  # type: ignore[arg-type]
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-auth")
        pool.start()
        self.addCleanup(pool.stop)  # type: ignore[attr-defined]
        return store, Authenticator(store.credentials, SMTPConfig(), self.clock, reactor, pool)  # type: ignore[arg-type]

    async def test_forms(self) -> None:
        """Account, sub-account, SMTP user, API token and injection key log in; wrong and revoked ones do not."""
        store, authenticator = await self.authenticator()
        shop = await store.accounts.create("shop", _cheap.hash("pw"))
        child = await store.accounts.create("billing", _cheap.hash("child"), parent="shop")
        await store.accounts.create("nopw", None)
        domain = await store.domains.add(shop.id, "example.com", "mr1", "PEM")
        smtp_secret, token, key, weak = (
            secrets.new_secret(k) for k in ("smtp_user", "api_token", "api_key", "api_key")
        )
        username = secrets.new_username("example.com")
        user = await store.credentials.create(
            shop.id, "smtp_user", secrets.secret_hash(smtp_secret), username=username, domain_id=domain.id
        )
        await store.credentials.create(shop.id, "api_token", secrets.secret_hash(token), domain_id=domain.id)
        api_key = await store.credentials.create(shop.id, "api_key", secrets.secret_hash(key), scopes=["smtp:send"])
        await store.credentials.create(shop.id, "api_key", secrets.secret_hash(weak), scopes=["stats:read"])

        async def login(username: str, password: str, ip: str) -> Principal:
            return await authenticator.authenticate(ip, "PLAIN", username, password)

        p = await login("shop", "pw", "192.0.2.1")
        self.assertEqual((p.account_id, p.credential_kind), (shop.id, "password"))  # type: ignore[attr-defined]
        p = await login("shop\\billing", "child", "192.0.2.1")
        self.assertEqual((p.account_id, p.parent_id), (child.id, shop.id))  # type: ignore[attr-defined]
        p = await login(username, smtp_secret, "192.0.2.1")
        self.assertEqual((p.credential_id, p.domain), (user.id, "example.com"))  # type: ignore[attr-defined]
        p = await login(token, token, "192.0.2.1")
        self.assertEqual((p.credential_kind, p.domain), ("api_token", "example.com"))  # type: ignore[attr-defined]
        p = await login("SMTP_Injection", key, "192.0.2.1")
        self.assertEqual((p.credential_id, p.scopes), (api_key.id, frozenset({"smtp:send"})))  # type: ignore[attr-defined]

        await store.credentials.revoke(shop.id, username=username)
        self.clock.advance(SMTPConfig().login_cache_seconds)  # the cached login expires
        for i, (name, password) in enumerate(
            [
                ("shop", "wrong"),
                ("nopw", "anything"),
                ("shop\\billing", "pw"),
                (username, smtp_secret),
                (token + "x", token + "x"),
                ("smtp_injection", weak),
            ]
        ):
            with self.assertRaises(UnauthorizedLogin, msg=name):  # type: ignore[attr-defined]
                await login(name, password, f"198.51.100.{i}")


class SQLiteStorageAuthTests(StorageAuthTestsMixin, TestCase):
    engine = "sqlite"


class PostgresStorageAuthTests(StorageAuthTestsMixin, TestCase):
    engine = "postgresql"
