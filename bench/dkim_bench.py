"""
DKIM signing cost per message: mailrelay's signer (dkimpy canonicalisation,
RSA through cryptography/OpenSSL) against dkimpy's own pure-Python RSA.

    .venv/bin/python bench/dkim_bench.py [--seconds 1.0]

Prints milliseconds per message for 5 KB and 100 KB messages.  The two
signers produce identical bytes (tests/test_processing_dkim.py checks it).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import dkim

from mailrelay.processing.dkim import DKIMSigner, generate_ed25519_key, generate_rsa_key

HEADERS = (
    b"From: Shop <orders@example.com>\r\n"
    b"To: Customer <c@example.org>\r\n"
    b"Subject: Your order #1234\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1234@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
)


def message(size: int) -> bytes:
    line = b"<p>Thank you for your order; it ships tomorrow.  Tracking follows.</p>\r\n"
    return HEADERS + line * (size // len(line) + 1)


def per_message(fn: Callable[[], object], seconds: float) -> float:
    """Milliseconds per call, repeating for about ``seconds``."""
    fn()
    count = 0
    start = time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    key = generate_rsa_key()
    signer = DKIMSigner("example.com", "s1", key)
    both = DKIMSigner("example.com", "s1", key, generate_ed25519_key())
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type", b"from"]
    print(f"{'size':>8} {'mailrelay rsa':>14} {'+ed25519':>10} {'dkimpy rsa':>11} {'speed-up':>9}")
    for size in (5_000, 100_000):
        msg = message(size)
        ours = per_message(functools.partial(signer.sign, msg), args.seconds)
        two = per_message(functools.partial(both.sign, msg), args.seconds)
        theirs = per_message(
            functools.partial(
                dkim.sign,
                msg,
                b"s1",
                b"example.com",
                key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            ),
            args.seconds,
        )
        print(f"{len(msg):>8} {ours:>11.2f} ms {two:>7.2f} ms {theirs:>8.2f} ms {theirs / ours:>8.1f}x")


if __name__ == "__main__":
    main()
