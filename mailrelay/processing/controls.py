"""
Control headers: the instructions a client puts in its message's header
block, in every dialect mailrelay accepts, turned into one value.

Dialects (the vendor pages in ``shared/seeds`` are the specification):

- Mailtarget ``X-MT-ATTR``: a JSON object.  ``options`` (or the page's own
  spelling ``optionsAttributes``) holds ``openTracking``/``clickTracking``
  (``open_tracking``/``click_tracking`` accepted too) as JSON booleans;
  ``cc``, ``bcc`` and ``archive`` are arrays of addresses, each either a
  string (``"a@example.com"`` or ``"Ann <a@example.com>"``) or an object
  ``{"email": "a@example.com"}`` / ``{"address": "a@example.com"}`` /
  ``{"address": {"email": "a@example.com"}}`` (the recipient shapes
  people copy from REST APIs); ``tags`` (array of strings), ``campaign_id``
  (string) and ``metadata`` (object of scalars) are read as well.  Unknown
  keys are ignored so messages written for Mailtarget (or SparkPost, whose
  format it follows) keep working; a known key with the wrong type is
  refused, because silently ignoring it would send mail the client did not
  ask for.
- MailPace ``X-MailPace-Tags`` (one tag, or a comma-separated list) and
  ``X-List-Unsubscribe`` (used as the List-Unsubscribe value).
- Moosend ``campaign_guid`` and ``mailing_list_id``.
- mailrelay's own, all under ``X-Mailrelay-``: ``-Tags``, ``-Campaign``,
  ``-List`` and ``-Track`` (``opens=yes, clicks=no, unsubscribe=no``).
  These take precedence over the vendor dialects when both are given.

Every header whose name starts with ``X-Mailrelay-`` is a control header and
is stripped before delivery, so a client can never leak one to a recipient;
an unknown one is refused, since a misspelt header would otherwise be
ignored without anyone noticing.
"""

from __future__ import annotations

import email.errors
import email.header
import email.message
import email.policy
import email.utils
import json
import re
from collections.abc import Mapping, Sequence
from email.errors import NonASCIILocalPartDefect
from email.parser import HeaderParser
from typing import Any, Literal

import attrs

from mailrelay.processing.headers import Field, parse_fields, remove_fields
from mailrelay.types import Reply, SMTPReplyError, unique

MT_ATTR = "x-mt-attr"
MAILPACE_TAGS = "x-mailpace-tags"
LIST_UNSUBSCRIBE = "x-list-unsubscribe"
MOOSEND_CAMPAIGN = "campaign_guid"
MOOSEND_LIST = "mailing_list_id"
OWN_PREFIX = "x-mailrelay-"
OWN_TAGS = OWN_PREFIX + "tags"
OWN_CAMPAIGN = OWN_PREFIX + "campaign"
OWN_LIST = OWN_PREFIX + "list"
OWN_TRACK = OWN_PREFIX + "track"

#: Limits that keep one message's attributes a reasonable size in the
#: spool, the event tables and the statistics.
MAX_TAGS = 32
MAX_TAG_LENGTH = 128
MAX_ID_LENGTH = 200
MAX_COPIES = 100
MAX_METADATA = 50
MAX_MT_ATTR_BYTES = 64 * 1024

_NAMED = (MT_ATTR, MAILPACE_TAGS, LIST_UNSUBSCRIBE, MOOSEND_CAMPAIGN, MOOSEND_LIST)


def control_header_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """
    The control headers, lowercased: ``(names, prefixes)``.  A field is a
    control header when its name is in ``names`` or starts with a prefix.
    """
    return _NAMED, (OWN_PREFIX,)


def is_control_header(name: str) -> bool:
    lname = name.lower()
    return lname in _NAMED or lname.startswith(OWN_PREFIX)


def strip_control_headers(header_block: bytes) -> bytes:
    """The header block without any control header (continuation lines included)."""
    return remove_fields(header_block, _NAMED, (OWN_PREFIX,))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _printable(text: str, limit: int = 60) -> str:
    """``text`` made safe for one SMTP reply line: printable ASCII, bounded length."""
    cleaned = "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


class ControlHeaderError(SMTPReplyError):
    """
    A control header is malformed; the message is refused with a ``550
    5.6.0`` that names the header and says what is wrong, so the sender can
    fix it instead of finding out from missing statistics later.
    """

    def __init__(self, header: str, detail: str) -> None:
        self.header = header
        self.detail = detail
        if header.lower() == MT_ATTR:
            text = f"JSON parsing error in X-MT-ATTR: {detail}"
        else:
            text = f"Invalid {_display_name(header)} header: {detail}"
        super().__init__(Reply(550, "5.6.0", text))


def _display_name(lname: str) -> str:
    special = {
        MT_ATTR: "X-MT-ATTR",
        MAILPACE_TAGS: "X-MailPace-Tags",
        MOOSEND_CAMPAIGN: "campaign_guid",
        MOOSEND_LIST: "mailing_list_id",
    }
    return special.get(lname, "-".join(part.capitalize() for part in lname.split("-")))


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_LOCAL = rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[^"\\\r\n]|\\[ -~])*")'
_LABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})+|\[[^\[\]\\\s]+\])"
_ADDR_SPEC = re.compile(rf"{_LOCAL}@{_DOMAIN}")


def is_valid_address(address: str) -> bool:
    """
    Whether ``address`` is a mailbox a relay can send to: one RFC 5321
    ``local@domain`` with a dotted domain (or an address literal), UTF-8
    allowed (RFC 6531), local part at most 64 octets.
    """
    if not _ADDR_SPEC.fullmatch(address) or len(address.encode("utf-8")) > 254:
        return False
    local = address.rpartition("@")[0]
    return len(local.encode("utf-8")) <= 64


_NAME_ADDR = re.compile(r"^[^<>]*<([^<>]*)>\s*$")


def _address_from_string(text: str) -> str | None:
    text = text.strip()
    match = _NAME_ADDR.match(text)
    if match:
        text = match.group(1).strip()
    return text if is_valid_address(text) else None


# ---------------------------------------------------------------------------
# The value
# ---------------------------------------------------------------------------

Role = Literal["to", "cc", "bcc", "archive"]


@attrs.frozen
class ControlAttributes:
    """
    What the control headers asked for.  ``None`` means "not said": the
    account's or domain's default applies.

    ``cc``/``bcc``/``archive`` are Mailtarget's copy lists (duplicates
    removed within each list); ``copies`` gives the recipients with the
    duplicates across lists removed.
    """

    open_tracking: bool | None = None
    click_tracking: bool | None = None
    unsubscribe: bool | None = None
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    archive: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    campaign: str | None = None
    mailing_list: str | None = None
    list_unsubscribe: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict, for the spool's envelope record."""
        return {
            key: [list(v) for v in value] if key == "metadata" else list(value) if isinstance(value, tuple) else value
            for key, value in attrs.asdict(self, recurse=False).items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ControlAttributes:
        """The inverse of ``to_json``."""

        def strings(key: str) -> tuple[str, ...]:
            return tuple(str(x) for x in data.get(key, ()))

        return cls(
            open_tracking=data.get("open_tracking"),
            click_tracking=data.get("click_tracking"),
            unsubscribe=data.get("unsubscribe"),
            cc=strings("cc"),
            bcc=strings("bcc"),
            archive=strings("archive"),
            tags=strings("tags"),
            campaign=data.get("campaign"),
            mailing_list=data.get("mailing_list"),
            list_unsubscribe=data.get("list_unsubscribe"),
            metadata=tuple((str(k), str(v)) for k, v in data.get("metadata", ())),
        )


@attrs.frozen
class RecipientCopy:
    """One copy to deliver: the envelope recipient and why it gets the copy."""

    address: str
    role: Role


def fan_out(rcpt_to: Sequence[str], controls: ControlAttributes) -> tuple[RecipientCopy, ...]:
    """
    The copies of one message: the envelope recipients, then Mailtarget's
    cc, bcc and archive lists.  Each address gets one copy only (the first
    role it appears with wins, compared case-insensitively), as the
    Mailtarget page promises.
    """
    seen: set[str] = set()
    out: list[RecipientCopy] = []
    roles: tuple[tuple[Role, Sequence[str]], ...] = (
        ("to", rcpt_to),
        ("cc", controls.cc),
        ("bcc", controls.bcc),
        ("archive", controls.archive),
    )
    for role, addresses in roles:
        for address in addresses:
            key = address.lower()
            if key not in seen:
                seen.add(key)
                out.append(RecipientCopy(address, role))
    return tuple(out)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _text(header: str, value: bytes, whole: bool = False) -> str:
    """
    A header value as text: UTF-8 (RFC 6532), RFC 2047 encoded words decoded
    (with ``whole``, only when the value is one: JSON may contain ``=?``).
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlHeaderError(header, "not valid UTF-8")
    if text.lstrip().startswith("=?") if whole else "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
            raise ControlHeaderError(header, "undecodable RFC 2047 encoded word")
    return text.strip()


def _identifier(header: str, text: str) -> str:
    if not text:
        raise ControlHeaderError(header, "empty value")
    if len(text) > MAX_ID_LENGTH:
        raise ControlHeaderError(header, f"longer than {MAX_ID_LENGTH} characters")
    if any(not ch.isprintable() for ch in text):
        raise ControlHeaderError(header, "contains control characters")
    return text


def _tag(header: str, tag: str) -> str:
    if len(tag) > MAX_TAG_LENGTH:
        raise ControlHeaderError(header, f"tag longer than {MAX_TAG_LENGTH} characters: {_printable(tag)!r}")
    if any(not ch.isprintable() for ch in tag):
        raise ControlHeaderError(header, "tag contains control characters")
    return tag


def _split_tags(header: str, text: str) -> list[str]:
    return [_tag(header, t.strip()) for t in text.split(",") if t.strip()]


_UNSUB_URI = re.compile(r"<\s*([^<>\s]+)\s*>")


def _list_unsubscribe(header: str, text: str) -> str:
    """
    Check an RFC 2369 List-Unsubscribe value: one or more ``<uri>`` with
    an ``http``, ``https`` or ``mailto`` scheme, separated by commas.
    """
    rest = _UNSUB_URI.sub("", text)
    if rest.replace(",", "").strip():
        raise ControlHeaderError(header, "expected <uri> items separated by commas")
    uris = _UNSUB_URI.findall(text)
    if not uris:
        raise ControlHeaderError(header, "no <uri> given")
    for uri in uris:
        scheme = uri.partition(":")[0].lower()
        if scheme not in ("http", "https", "mailto") or ":" not in uri:
            raise ControlHeaderError(header, f"unsupported URI {_printable(uri)!r} (http, https or mailto)")
    return ", ".join(f"<{uri}>" for uri in uris)


_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}
_TRACK_KEYS = {
    "opens": "open_tracking",
    "open": "open_tracking",
    "clicks": "click_tracking",
    "click": "click_tracking",
    "unsubscribe": "unsubscribe",
}


def _track(header: str, text: str) -> dict[str, bool]:
    """``opens=yes, clicks=no`` -> ``{"open_tracking": True, "click_tracking": False}``."""
    out: dict[str, bool] = {}
    for item in re.split(r"[,;]", text):
        if not item.strip():
            continue
        key, sep, value = (part.strip().lower() for part in item.partition("="))
        if not sep or key not in _TRACK_KEYS:
            raise ControlHeaderError(
                header, f"expected opens=, clicks= or unsubscribe= items, got {_printable(item.strip())!r}"
            )
        if value in _TRUE:
            out[_TRACK_KEYS[key]] = True
        elif value in _FALSE:
            out[_TRACK_KEYS[key]] = False
        else:
            raise ControlHeaderError(header, f"{key} must be yes or no, got {_printable(value)!r}")
    return out


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _mt_address(where: str, item: object) -> str:
    candidate: object = item
    if isinstance(item, dict):
        candidate = item.get("email", item.get("address"))
        if isinstance(candidate, dict):
            candidate = candidate.get("email")
        if candidate is None:
            raise ControlHeaderError(MT_ATTR, f'{where} must have an "email" field')
    if not isinstance(candidate, str):
        raise ControlHeaderError(MT_ATTR, f"{where} must be an email address, got {_json_type(candidate)}")
    address = _address_from_string(candidate)
    if address is None:
        raise ControlHeaderError(MT_ATTR, f"{where} is not a valid email address: {_printable(candidate)!r}")
    return address


_OPTION_KEYS = {
    "openTracking": "open_tracking",
    "open_tracking": "open_tracking",
    "clickTracking": "click_tracking",
    "click_tracking": "click_tracking",
}


def parse_mt_attr(value: bytes) -> dict[str, Any]:
    """
    Parse one ``X-MT-ATTR`` value into ``ControlAttributes`` keyword
    arguments; raise ``ControlHeaderError`` with a detail a person can act on.
    """
    if len(value) > MAX_MT_ATTR_BYTES:
        raise ControlHeaderError(MT_ATTR, f"longer than {MAX_MT_ATTR_BYTES} bytes")
    text = _text(MT_ATTR, value, whole=True)
    if not text:
        raise ControlHeaderError(MT_ATTR, "empty value")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ControlHeaderError(MT_ATTR, f"{e.msg} at character {e.pos + 1}")
    except (RecursionError, ValueError):
        raise ControlHeaderError(MT_ATTR, "not valid JSON")
    if not isinstance(data, dict):
        raise ControlHeaderError(MT_ATTR, f"expected a JSON object, got {_json_type(data)}")

    out: dict[str, Any] = {}
    for options_key in ("options", "optionsAttributes"):
        if options_key not in data:
            continue
        options = data[options_key]
        if not isinstance(options, dict):
            raise ControlHeaderError(MT_ATTR, f"{options_key} must be an object, got {_json_type(options)}")
        for key, attribute in _OPTION_KEYS.items():
            if key not in options:
                continue
            flag = options[key]
            if not isinstance(flag, bool):
                raise ControlHeaderError(MT_ATTR, f"{options_key}.{key} must be true or false, got {_json_type(flag)}")
            if out.get(attribute, flag) != flag:
                raise ControlHeaderError(MT_ATTR, f"{options_key}.{key} contradicts an earlier setting")
            out[attribute] = flag

    for key in ("cc", "bcc", "archive"):
        if key not in data:
            continue
        items = data[key]
        if not isinstance(items, list):
            raise ControlHeaderError(MT_ATTR, f"{key} must be an array, got {_json_type(items)}")
        if len(items) > MAX_COPIES:
            raise ControlHeaderError(MT_ATTR, f"{key} has more than {MAX_COPIES} addresses")
        out[key] = unique([_mt_address(f"{key}[{i}]", item) for i, item in enumerate(items)])

    if "tags" in data:
        tags = data["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ControlHeaderError(MT_ATTR, "tags must be an array of strings")
        out["tags"] = [_tag(MT_ATTR, t.strip()) for t in tags if t.strip()]

    if "campaign_id" in data:
        campaign = data["campaign_id"]
        if not isinstance(campaign, str):
            raise ControlHeaderError(MT_ATTR, f"campaign_id must be a string, got {_json_type(campaign)}")
        out["campaign"] = _identifier(MT_ATTR, campaign.strip())

    if "metadata" in data:
        metadata = data["metadata"]
        if not isinstance(metadata, dict):
            raise ControlHeaderError(MT_ATTR, f"metadata must be an object, got {_json_type(metadata)}")
        if len(metadata) > MAX_METADATA:
            raise ControlHeaderError(MT_ATTR, f"metadata has more than {MAX_METADATA} keys")
        pairs = []
        for key, item in metadata.items():
            if isinstance(item, (dict, list)) or item is None:
                raise ControlHeaderError(MT_ATTR, f"metadata.{_printable(key, 30)} must be a string, number or boolean")
            pairs.append((key, item if isinstance(item, str) else json.dumps(item)))
        out["metadata"] = tuple(pairs)
    return out


def _single(fields: list[Field], name: str) -> Field | None:
    found = [f for f in fields if f.name and f.lname == name]
    if len(found) > 1:
        raise ControlHeaderError(name, "given more than once")
    return found[0] if found else None


def parse_control_headers(header_block: bytes) -> ControlAttributes:
    """
    Read every control header of ``header_block`` (the message's bytes up
    to the first empty line) into one ``ControlAttributes``.

    Raises ``ControlHeaderError`` (an ``SMTPReplyError`` with ``550 5.6.0``)
    when one is malformed.  Headers that carry one value may appear once;
    tag headers may repeat and add up.
    """
    fields = [f for f in parse_fields(header_block) if f.name and is_control_header(f.lname)]
    if not fields:
        return ControlAttributes()
    values: dict[str, Any] = {}

    mt = _single(fields, MT_ATTR)
    if mt is not None:
        values.update(parse_mt_attr(mt.value))

    tags: list[str] = list(values.pop("tags", ()))
    for field in fields:
        if field.lname in (MAILPACE_TAGS, OWN_TAGS):
            tags.extend(_split_tags(field.lname, _text(field.lname, field.value)))
    tags_unique = unique(tags)
    if len(tags_unique) > MAX_TAGS:
        raise ControlHeaderError(OWN_TAGS, f"more than {MAX_TAGS} tags")
    values["tags"] = tags_unique

    # Later entries win: mailrelay's own headers over the vendors'.
    for name, attribute in (
        (MOOSEND_CAMPAIGN, "campaign"),
        (OWN_CAMPAIGN, "campaign"),
        (MOOSEND_LIST, "mailing_list"),
        (OWN_LIST, "mailing_list"),
    ):
        given = _single(fields, name)
        if given is not None:
            values[attribute] = _identifier(name, _text(name, given.value))

    unsub = _single(fields, LIST_UNSUBSCRIBE)
    if unsub is not None:
        values["list_unsubscribe"] = _list_unsubscribe(LIST_UNSUBSCRIBE, _text(LIST_UNSUBSCRIBE, unsub.value))

    track = _single(fields, OWN_TRACK)
    if track is not None:
        values.update(_track(OWN_TRACK, _text(OWN_TRACK, track.value)))

    known = {f.lname for f in fields}
    unknown = sorted(
        n for n in known if n.startswith(OWN_PREFIX) and n not in (OWN_TAGS, OWN_CAMPAIGN, OWN_LIST, OWN_TRACK)
    )
    if unknown:
        raise ControlHeaderError(
            unknown[0], "unknown control header (known: X-Mailrelay-Tags, -Campaign, -List, -Track)"
        )
    return ControlAttributes(**values)


# ---------------------------------------------------------------------------
# Headers the SMTP policy checks
# ---------------------------------------------------------------------------


class PolicyHeaderError(SMTPReplyError):
    """A header the relay needs is missing or unusable; carries the ``550`` to send."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(Reply(550, status, text))


@attrs.frozen
class PolicyHeaders:
    """
    What the session policy reads from the header block.  ``from_address``
    is the one author address (``from_domain`` lowercased); the rest is
    reported as found so the policy decides what to require.
    """

    from_address: str
    from_domain: str
    to_present: bool
    reply_to: tuple[str, ...]
    reply_to_valid: bool
    subject: str | None
    message_id: str | None
    date: str | None
    date_valid: bool

    def require_recipients_headers(self) -> None:
        """Refuse a message without a To header or with a bad Reply-To (the seeds' rules)."""
        if not self.to_present:
            raise PolicyHeaderError("5.6.0", "Message must have a To header")
        if not self.reply_to_valid:
            raise PolicyHeaderError("5.1.7", "Invalid Reply-To address")


_PARSER = HeaderParser(policy=email.policy.SMTP)
_PARSED = frozenset({"from", "reply-to", "subject"})


def parse_policy_headers(header_block: bytes) -> PolicyHeaders:
    """
    Read From, To, Reply-To, Subject, Message-ID and Date with the stdlib
    parser (UTF-8 header text allowed).  Raises ``PolicyHeaderError`` when
    there is no single From address, and only that, whatever the input.
    """
    try:
        return _parse_policy_headers(header_block)
    except PolicyHeaderError:
        raise
    except Exception:
        # The email package has raised odd exceptions on hostile input over
        # the years; the SMTP session must get a reply, not a traceback.
        raise PolicyHeaderError("5.6.0", "Message headers could not be parsed")


def _addresses(header: object) -> tuple[list[str], bool]:
    """The addr-specs of an address header, and whether it parsed without defects."""
    groups = getattr(header, "groups", ())
    out = []
    # Non-ASCII local parts are fine under SMTPUTF8 (RFC 6532).
    ok = not [d for d in getattr(header, "defects", ()) if not isinstance(d, NonASCIILocalPartDefect)]
    for group in groups:
        for address in group.addresses:
            spec = address.addr_spec
            out.append(spec)
            ok = ok and is_valid_address(spec)
    return out, ok


# A plain address header: ``Display Name <local@domain>`` or a bare ``local@domain`` in ASCII, with no
# comment, group, quoted pair or encoded word.  Most mail's From and Reply-To look like this, and reading
# them with one regex instead of the email package's address parser halves the policy's cost.
_SIMPLE_ADDRESS = re.compile(
    r'^\s*(?:(?:[A-Za-z0-9!#$%&\'*+/=?^_`{|}~ .-]*|"[^"\\\r\n=]*")\s*<([^<>\s(),;:"\\]+@[^<>\s(),;:"\\]+)>'
    r'|([^<>\s(),;:"\\]+@[^<>\s(),;:"\\]+))\s*$'
)


#: What the email package's parser gives for no header lines (the usual case: all fast).
_NO_HEADERS = email.message.Message()


def _simple_address(value: bytes) -> str | None:
    """The address of a plain one-address header value, or None when the email package must read it."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    match = _SIMPLE_ADDRESS.match(text)
    if match is None or "=?" in text:
        return None
    address = match.group(1) or match.group(2)
    return address if is_valid_address(address) else None


def _parse_policy_headers(header_block: bytes) -> PolicyHeaders:
    raw: dict[str, Field] = {}
    fields: dict[str, list[Field]] = {}
    for field in parse_fields(header_block):
        if not field.name:
            # DKIM signing and the receiving MTAs cannot read such a line: refuse it now, not at delivery.
            line = field.raw.splitlines()[0].decode("utf-8", "replace")
            raise PolicyHeaderError("5.6.0", f"Malformed header line (not a Name: value field): {_printable(line)!r}")
        raw.setdefault(field.lname, field)
        if field.lname in _PARSED:
            fields.setdefault(field.lname, []).append(field)
    froms = fields.get("from", [])
    if not froms:
        raise PolicyHeaderError("5.6.0", "Message must have a From header")
    if len(froms) > 1:
        raise PolicyHeaderError("5.6.0", "Message has more than one From header")
    fast_from = _simple_address(froms[0].value)
    fast_reply = [_simple_address(f.value) for f in fields.get("reply-to", [])]
    subject_field = fields.get("subject", [None])[0]
    fast_subject = subject_field is not None and b"=?" not in subject_field.raw and subject_field.raw.isascii()
    # Only what the fast path could not read goes through the (slow) email package.
    wanted = [f.raw for name in ("from", "reply-to", "subject") for f in fields.get(name, [])
              if not ((name == "from" and fast_from) or (name == "reply-to" and all(fast_reply))
                      or (name == "subject" and fast_subject))]
    message: email.message.Message = _NO_HEADERS
    if wanted:
        message = _PARSER.parsestr(b"".join(wanted).decode("utf-8", "surrogateescape"), headersonly=True)

    if fast_from:
        sender = fast_from
    else:
        senders, ok = _addresses(message.get("From"))
        if not senders:
            raise PolicyHeaderError("5.1.7", "From header has no address")
        if len(senders) > 1:
            raise PolicyHeaderError("5.1.7", "From header must have exactly one address")
        if not ok:
            raise PolicyHeaderError("5.1.7", f"Invalid From address: {_printable(senders[0])}")
        sender = senders[0]

    reply_to: list[str] = []
    reply_ok = True
    if fast_reply and all(fast_reply):
        reply_to = [a for a in fast_reply if a]
    else:
        for header in message.get_all("Reply-To") or []:
            found, ok = _addresses(header)
            reply_to.extend(found)
            reply_ok = reply_ok and ok and bool(found)

    def single(name: str) -> str | None:
        field = raw.get(name)
        return field.value.decode("utf-8", "replace") or None if field else None

    if subject_field is None:
        subject = None
    elif fast_subject:
        subject = subject_field.value.decode("ascii")
    else:
        subject = message.get("Subject")
    date = single("date")
    try:
        date_valid = date is not None and email.utils.parsedate_to_datetime(date) is not None
    except (TypeError, ValueError, IndexError):
        date_valid = False

    return PolicyHeaders(
        from_address=sender,
        from_domain=sender.rpartition("@")[2].lower(),
        to_present="to" in raw,
        reply_to=tuple(reply_to),
        reply_to_valid=reply_ok,
        subject=None if subject is None else str(subject).strip(),
        message_id=single("message-id"),
        date=date,
        date_valid=date_valid,
    )
