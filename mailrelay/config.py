"""
The one TOML configuration file, loaded into frozen attrs classes.

Everything is validated at load time so a bad value stops the service
before it listens, with a sentence naming the file, the key and the reason
(``mailrelay.toml: listeners.submission[0]: not a valid endpoint: ...``).
With no file at all, every section has a default that runs on the embedded
SQLite database and a local data directory.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

T = TypeVar("T")

DEFAULT_DATA_DIR = "mailrelay-data"


class ConfigError(Exception):
    """A configuration value is wrong; ``str()`` is the sentence to print."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + reason)


@attrs.frozen
class ServerConfig:
    hostname: str
    data_dir: Path


@attrs.frozen
class ListenersConfig:
    smtp: tuple[str, ...] = ("tcp:25",)
    submission: tuple[str, ...] = ("tcp:587", "tcp:2525")
    submissions: tuple[str, ...] = ("tcp:465",)
    http: tuple[str, ...] = ("tcp:8080",)


@attrs.frozen
class TLSConfig:
    certificate: Path
    private_key: Path
    # Generate a self-signed certificate when both files are missing.
    self_signed: bool = True
    allow_plaintext_auth: bool = False
    # How often the files are checked for a renewed certificate (0: only on SIGHUP).
    reload_interval: float = 60.0


@attrs.frozen
class DatabaseConfig:
    url: str
    pool_size: int = 5
    #: Seconds between reads of the admin change counter (``mailrelay.storage.changes``); 0: never.
    change_poll_interval: float = 1.0


@attrs.frozen
class DNSConfig:
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0


@attrs.frozen
class SMTPConfig:
    max_message_size: int = 31457280
    max_recipients: int = 1000
    command_timeout: float = 300.0
    data_block_timeout: float = 180.0
    data_end_timeout: float = 600.0
    max_errors: int = 10
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    injection_user: str = "smtp_injection"
    sandbox_domain: str = "sandbox.mailrelay.test"
    auth_failures_before_delay: int = 3
    auth_failures_before_block: int = 10
    auth_block_seconds: float = 900.0
    login_cache_seconds: float = 60.0


@attrs.frozen
class DeliveryConfig:
    remote_port: int = 25
    smarthost: str | None = None
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    smarthost_tls: str = "opportunistic"  # "opportunistic" | "required" | "none"
    source_address: str | None = None
    retry_min: float = 300.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    concurrency_per_destination: int = 20
    active_window: int = 10000
    queue_high_water: int = 100000
    delay_notice_after: float | None = None


@attrs.frozen
class TrackingConfig:
    base_url: str
    secret: str | None = None  # None: generated once into the data directory


@attrs.frozen
class DomainsConfig:
    bounce_domain: str
    lists_domain: str


@attrs.frozen
class WebhooksConfig:
    # Webhook URLs on loopback or private networks are refused unless allowed (a relay must not be
    # turned into a probe of its own network); allow them for an on-premises receiver.
    allow_private: bool = False
    retry_base: float = 30.0


@attrs.frozen
class Config:
    source: str
    server: ServerConfig
    listeners: ListenersConfig
    tls: TLSConfig
    database: DatabaseConfig
    dns: DNSConfig
    smtp: SMTPConfig
    delivery: DeliveryConfig
    tracking: TrackingConfig
    domains: DomainsConfig
    webhooks: WebhooksConfig = WebhooksConfig()


def _check_endpoint(description: str) -> str | None:
    """Why ``description`` is not a server endpoint string, or None."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parser raises several unrelated types
        return str(e) or type(e).__name__
    return None


class _Reader:
    """Typed access to one table of the TOML document, with precise errors."""

    def __init__(self, source: str, table: Mapping[str, Any], prefix: str) -> None:
        self.source = source
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML integers are fine where a float is wanted; bools are not ints.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail(name, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
        return value

    def positive(self, name: str, kind: type, default: Any, minimum: float = 0) -> Any:
        value = self.get(name, kind, default)
        if value is not None and value <= minimum:
            raise self.fail(name, f"must be greater than {minimum:g}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, (list, str), None)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(self.source, f"{self.key(name)}[{i}]", "expected a string")
        return tuple(value)

    def finish(self) -> None:
        for name in self.table:
            if name not in self.used:
                raise ConfigError(self.source, self.key(name), "unknown setting")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _section(source: str, doc: Mapping[str, Any], name: str) -> _Reader:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(source, name, "expected a table ([" + name + "])")
    return _Reader(source, table, name)


def _host_port(source: str, key: str, value: str, default_port: int) -> tuple[str, int]:
    if value.count(":") > 1 and not value.startswith("["):
        host, port = value, str(default_port)  # a bare IPv6 address
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = value, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(source, key, f"expected host or host:port, got {value!r}")
    return host, int(port)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """
    Read and validate the configuration file at ``path``; ``None`` gives
    the embedded default (data under ``./mailrelay-data``).
    """
    if path is None:
        return parse_config({}, source="(defaults)", base=Path.cwd())
    p = Path(path)
    source = p.name
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read the file: {e.strerror or e}")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "", "the file is not UTF-8 text")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}")
    return parse_config(doc, source=source, base=p.resolve().parent)


def parse_config(doc: Mapping[str, Any], source: str, base: Path) -> Config:
    """Validate an already parsed TOML document; relative paths are taken from ``base``."""
    known = {"server", "listeners", "tls", "database", "dns", "smtp", "delivery", "tracking", "domains", "webhooks"}
    for name in doc:
        if name not in known:
            raise ConfigError(source, name, "unknown section")

    def path_of(value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else base / p

    r = _section(source, doc, "server")
    hostname = r.get("hostname", str, None) or socket.getfqdn() or "localhost"
    data_dir = path_of(r.get("data_dir", str, DEFAULT_DATA_DIR))
    r.finish()
    server = ServerConfig(hostname=hostname.lower(), data_dir=data_dir)

    r = _section(source, doc, "listeners")
    defaults = ListenersConfig()
    lists = {}
    for mode in ("smtp", "submission", "submissions", "http"):
        endpoints = r.strings(mode, getattr(defaults, mode))
        for i, description in enumerate(endpoints):
            problem = _check_endpoint(description)
            if problem:
                raise ConfigError(source, f"listeners.{mode}[{i}]", f"not a valid endpoint: {problem}")
        lists[mode] = endpoints
    r.finish()
    listeners = ListenersConfig(**lists)

    r = _section(source, doc, "tls")
    cert = r.get("certificate", str, None)
    key = r.get("private_key", str, None)
    if (cert is None) != (key is None):
        raise r.fail("certificate" if cert is None else "private_key",
                     "set both certificate and private_key, or neither (self-signed)")
    tls = TLSConfig(
        certificate=path_of(cert) if cert else data_dir / "tls" / "cert.pem",
        private_key=path_of(key) if key else data_dir / "tls" / "key.pem",
        self_signed=r.get("self_signed", bool, cert is None),
        allow_plaintext_auth=r.get("allow_plaintext_auth", bool, False),
        reload_interval=r.get("reload_interval", float, 60.0),
    )
    if tls.reload_interval < 0:
        raise r.fail("reload_interval", "must be 0 (check on SIGHUP only) or a number of seconds")
    r.finish()

    r = _section(source, doc, "database")
    url = r.get("url", str, None)
    if url is None:
        url = "sqlite:///" + str(data_dir / "mailrelay.sqlite3")
    from mailrelay.storage.engines import UnknownDatabaseURL, parse_database_url

    try:
        parse_database_url(url)
    except UnknownDatabaseURL as e:
        raise r.fail("url", str(e))
    database = DatabaseConfig(url=url, pool_size=r.positive("pool_size", int, 5),
                              change_poll_interval=r.get("change_poll_interval", float, 1.0))
    if database.change_poll_interval < 0:
        raise r.fail("change_poll_interval", "must be 0 (caches expire on their own) or a number of seconds")
    r.finish()

    r = _section(source, doc, "dns")
    nameservers = tuple(
        _host_port(source, f"dns.nameservers[{i}]", ns, 53)
        for i, ns in enumerate(r.strings("nameservers", ()))
    )
    dns = DNSConfig(nameservers=nameservers, timeout=r.positive("timeout", float, 5.0))
    r.finish()

    r = _section(source, doc, "smtp")
    d = SMTPConfig()
    smtp = SMTPConfig(
        max_message_size=r.positive("max_message_size", int, d.max_message_size, 1023),
        max_recipients=r.positive("max_recipients", int, d.max_recipients),
        command_timeout=_timeout(r, "command_timeout", d.command_timeout),
        data_block_timeout=_timeout(r, "data_block_timeout", d.data_block_timeout),
        data_end_timeout=_timeout(r, "data_end_timeout", d.data_end_timeout),
        max_errors=r.positive("max_errors", int, d.max_errors),
        max_connections=r.positive("max_connections", int, d.max_connections),
        max_connections_per_ip=r.positive("max_connections_per_ip", int, d.max_connections_per_ip),
        injection_user=r.get("injection_user", str, d.injection_user),
        sandbox_domain=r.get("sandbox_domain", str, d.sandbox_domain).lower(),
        auth_failures_before_delay=r.positive("auth_failures_before_delay", int, d.auth_failures_before_delay),
        auth_failures_before_block=r.positive("auth_failures_before_block", int, d.auth_failures_before_block),
        auth_block_seconds=r.positive("auth_block_seconds", float, d.auth_block_seconds),
        login_cache_seconds=r.get("login_cache_seconds", float, d.login_cache_seconds),
    )
    r.finish()

    r = _section(source, doc, "delivery")
    dd = DeliveryConfig()
    smarthost = r.get("smarthost", str, None) or None
    if smarthost:
        _host_port(source, "delivery.smarthost", smarthost, 25)
    smarthost_tls = r.get("smarthost_tls", str, dd.smarthost_tls)
    if smarthost_tls not in ("opportunistic", "required", "none"):
        raise r.fail("smarthost_tls", "expected one of opportunistic, required, none")
    port = r.get("remote_port", int, dd.remote_port)
    if not 0 < port < 65536:
        raise r.fail("remote_port", "expected a TCP port number (1-65535)")
    retry_min = r.positive("retry_min", float, dd.retry_min)
    retry_max = r.positive("retry_max", float, dd.retry_max)
    if retry_max < retry_min:
        raise r.fail("retry_max", "must not be smaller than delivery.retry_min")
    delivery = DeliveryConfig(
        remote_port=port,
        smarthost=smarthost,
        smarthost_username=r.get("smarthost_username", str, None),
        smarthost_password=r.get("smarthost_password", str, None),
        smarthost_tls=smarthost_tls,
        source_address=r.get("source_address", str, None),
        retry_min=retry_min,
        retry_max=retry_max,
        max_age=r.positive("max_age", float, dd.max_age),
        concurrency_per_destination=r.positive("concurrency_per_destination", int,
                                               dd.concurrency_per_destination),
        active_window=r.positive("active_window", int, dd.active_window),
        queue_high_water=r.positive("queue_high_water", int, dd.queue_high_water),
        delay_notice_after=r.positive("delay_notice_after", float, None),
    )
    r.finish()

    r = _section(source, doc, "tracking")
    base_url = r.get("base_url", str, f"http://{hostname}:8080").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise r.fail("base_url", "expected an http:// or https:// URL")
    secret = r.get("secret", str, None)
    if secret is not None and len(secret) < 16:
        raise r.fail("secret", "too short: use at least 16 characters (32 random bytes recommended)")
    tracking = TrackingConfig(base_url=base_url, secret=secret)
    r.finish()

    r = _section(source, doc, "domains")
    domains = DomainsConfig(
        bounce_domain=r.get("bounce_domain", str, f"bounces.{hostname}").lower(),
        lists_domain=r.get("lists_domain", str, f"lists.{hostname}").lower(),
    )
    r.finish()

    r = _section(source, doc, "webhooks")
    webhooks = WebhooksConfig(allow_private=r.get("allow_private", bool, False),
                              retry_base=r.positive("retry_base", float, 30.0))
    r.finish()

    return Config(source=source, server=server, listeners=listeners, tls=tls, database=database,
                  dns=dns, smtp=smtp, delivery=delivery, tracking=tracking, domains=domains, webhooks=webhooks)


def _timeout(r: _Reader, name: str, default: float) -> float:
    value: float = r.get(name, float, default)
    if value < 60:
        raise r.fail(name, "must be at least 60 seconds (RFC 5321 §4.5.3.2)")
    return value
