"""
The shared load generator (``smtpload.py``) with an HTML body, so open and
click tracking have work to do: the same load, options and output, but each
message is ``text/html`` with one link per ~400 octets (at least 5).

    SMTPLOAD_DIR=/path/to/shared/bench python bench/htmlload.py -p 5587 -s 20480 --starttls --auth plain ...

``smtpload.py`` is imported, not copied: only its message builder is
replaced.  Lines stay under 78 octets and never start with a dot.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench")
sys.path.insert(0, os.environ.get("SMTPLOAD_DIR", _SHARED))

import smtpload  # type: ignore[import-not-found]  # noqa: E402

_PLAIN = b"Content-Type: text/plain; charset=us-ascii\r\n"
_HTML = b"Content-Type: text/html; charset=us-ascii\r\n"


def html_body(size: int, seed: int) -> bytes:
    """About ``size`` octets of HTML: paragraphs of the shared filler text, and links between them."""
    links = max(5, size // 400)
    filler = smtpload.make_body(max(0, size - 60 * links - 60 - 7 * (size // 78)), seed=seed).split(b"\r\n")
    lines = [b"<html><body>"]
    per_link = max(1, len(filler) // links)
    for i in range(links):
        lines.extend(b"<p>" + line + b"</p>" for line in filler[i * per_link : (i + 1) * per_link] if line)
        lines.append(b'<a href="https://shop.example/item/%d?ref=mail&amp;n=%d">item %d</a>' % (seed, i, i))
    lines.extend(b"<p>" + line + b"</p>" for line in filler[links * per_link :] if line)
    lines.append(b"</body></html>")
    return b"\r\n".join(lines) + b"\r\n"


class HTMLMessage(smtpload.Message):  # type: ignore[misc]
    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.body = html_body(max(0, args.size - 300), seed=self.pid)

    def build(self) -> bytes:
        data: bytes = super().build()
        return data.replace(_PLAIN, _HTML, 1)


smtpload.Message = HTMLMessage

if __name__ == "__main__":
    sys.exit(smtpload.main())
