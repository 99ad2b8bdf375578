"""
The few HTML pages the relay shows to recipients (unsubscribe, errors).

Every value is HTML-escaped where it is inserted.  The only style is one
inline ``<style>`` allowed by its hash in the Content-Security-Policy, so
the pages run no script and load nothing from anywhere.
"""

from __future__ import annotations

from html import escape

from mailrelay.web.common import csp_hash

STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;padding:2rem 1rem;"
    "background:#f6f7f9;color:#1b1f24;line-height:1.5}"
    "main{max-width:32rem;margin:0 auto;background:#fff;border-radius:8px;padding:2rem;"
    "box-shadow:0 1px 3px rgba(0,0,0,.12)}"
    "h1{font-size:1.4rem;margin-top:0}"
    "button{font:inherit;font-size:1.05rem;padding:.6rem 1.4rem;border:2px solid #0b57d0;border-radius:6px;"
    "background:#0b57d0;color:#fff;cursor:pointer}"
    "button:focus-visible{outline:3px solid #1b1f24;outline-offset:2px}"
    "@media (prefers-color-scheme:dark){body{background:#111;color:#eee}main{background:#1e1e1e}}"
)

#: The policy for these pages: nothing but the style above, and forms that post back here.
PAGE_CSP = (
    f"default-src 'none'; style-src {csp_hash(STYLE)}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def page(title: str, body_html: str, lang: str = "en") -> bytes:
    """A complete page; ``body_html`` must already be escaped by the caller."""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{escape(lang)}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>{escape(title)}</h1>\n{body_html}\n</main>\n</body>\n</html>\n"
    ).encode()


def mask_address(address: str) -> str:
    """``j***n@example.com``: enough to recognise one's address, not to harvest it from a forwarded link."""
    local, _, domain = address.rpartition("@")
    if len(local) <= 2:
        shown = local[:1] + "***"
    else:
        shown = local[0] + "***" + local[-1]
    return f"{shown}@{domain.lower()}"


def unsubscribe_form(address: str, what: str) -> bytes:
    """The confirmation page: one button that POSTs the RFC 8058 field back to the same URL."""
    body = (
        f"<p>Stop receiving {escape(what)} at <strong>{escape(mask_address(address))}</strong>?</p>\n"
        '<form method="post">\n'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">\n'
        '<button type="submit">Unsubscribe</button>\n'
        "</form>"
    )
    return page("Unsubscribe", body)


def unsubscribed(address: str, what: str) -> bytes:
    body = (
        f'<p role="status">{escape(mask_address(address))} will no longer receive {escape(what)}.</p>\n'
        "<p>You can close this page.</p>"
    )
    return page("You are unsubscribed", body)


def invalid_link() -> bytes:
    body = (
        "<p>This link is not valid: it may have been copied incompletely, or the message it came from "
        "is too old.</p>\n<p>To stop receiving these messages, contact the sender.</p>"
    )
    return page("Link not valid", body)
