"""
The tracking secret: the key behind tracking tokens and VERP return paths.

Configured as ``[tracking] secret``, or else generated once into
``<data_dir>/tracking.secret`` (mode 0600) and reused on every start, so
links and return paths in mail already sent keep working after a restart.
Several worker processes sharing a data directory race to create it; the
file is created exclusively and the losers read the winner's.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

from mailrelay.config import Config

FILE_NAME = "tracking.secret"


def load_or_create_secret(path: Path, randbytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """
    The secret stored at ``path``, created (32 random bytes, base64url text,
    mode 0600) when it does not exist yet.  Raises ``OSError`` when it can be
    neither read nor created, and ``ValueError`` when the file is too short
    to be a secret (someone truncated it: refusing beats signing with it).
    """
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    text = base64.urlsafe_b64encode(randbytes(32)).rstrip(b"=") + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process got there first: then use theirs.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read(path)


def _read(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"{path} holds no usable secret (at least 16 characters are needed)")
    return secret


def tracking_secret(config: Config) -> bytes:
    """``[tracking] secret`` if configured, else the one in the data directory."""
    if config.tracking.secret is not None:
        return config.tracking.secret.encode("utf-8")
    return load_or_create_secret(config.server.data_dir / FILE_NAME)
