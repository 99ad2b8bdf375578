"""
Secrets: people's passwords and generated credentials.

Passwords typed by people are hashed with argon2id (slow on purpose, so it
runs off the reactor thread).  Generated SMTP passwords, API tokens and API
keys carry 256 bits of randomness, so SHA-256 is enough to store them and a
login costs microseconds, not 50 ms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP's minimum argon2id profile (19 MiB, 2 passes, 1 lane): ~20-30 ms here, where the
# library's default (64 MiB, 3 passes, 4 lanes) measured 118-143 ms per check on 2 cores.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)

PREFIXES = {"smtp_user": "mrs_", "api_token": "mrt_", "api_key": "mrk_"}


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def looks_generated(password: str) -> bool:
    """A password shaped like a generated secret would be taken for one at login."""
    return password.startswith(tuple(PREFIXES.values()))


def verify_password(stored_hash: str, password: str) -> bool:
    """True when ``password`` matches; slow (run it in a thread)."""
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_secret(kind: str) -> str:
    """A new 256-bit secret for a generated credential, with a prefix naming its kind."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return PREFIXES.get(kind, "mr_") + raw


def secret_hash(secret: str) -> str:
    """How a generated secret is stored and looked up: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def new_username(domain: str) -> str:
    """A generated SMTP user name for ``domain`` (MailerSend style)."""
    return f"{secrets.token_hex(6)}@{domain}"
