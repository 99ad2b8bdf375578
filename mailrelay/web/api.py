"""
The JSON API's machinery: routing, API-key authentication, scopes, request
bodies, pagination cursors and errors.  The endpoints are in
``mailrelay.web.api_v1``; docs/openapi.yaml describes them and the tests
check every response against it.

A small router rather than a framework (klein): the API is a fixed table
of ``(method, path pattern, scope, handler)``, which is also what the
OpenAPI file lists, and keeping it a table lets the tests compare the two.

Keys are looked up by their SHA-256 (they carry 256 bits of randomness,
so no slow hash) and successful lookups are cached for ``cache_seconds``;
a revocation through this API clears the cache at once, one made through
another node or the CLI takes effect within that time.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from mailrelay.interfaces import ICredentialStore
from mailrelay.metrics import Metrics
from mailrelay.secrets import secret_hash
from mailrelay.storage.errors import Conflict, NotFound, StorageError
from mailrelay.storage.model import LoginRecord
from mailrelay.web.common import BodyTooLarge, finish, header_text, read_body, run_async

log = Logger()

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_JSON_BODY = 1024 * 1024
MAX_CSV_BODY = 10 * 1024 * 1024


class ApiError(Exception):
    """An answer other than success: an HTTP status, a stable ``code`` and a sentence."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def invalid(message: str, code: str = "invalid_field") -> ApiError:
    return ApiError(422, code, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


@attrs.define
class Response:
    """What a handler returns: a status and a JSON body, or raw bytes with their content type."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = attrs.Factory(dict)


class Call:
    """One API request, authenticated: what handlers read."""

    def __init__(
        self, request: Request, login: LoginRecord, params: dict[str, str], query: dict[str, list[str]]
    ) -> None:
        self.request = request
        self.login = login
        self.account_id = login.account_id
        self.params = params
        self.query = query
        self._json: Any = None

    # -- query parameters ------------------------------------------------------

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise bad_request(f"the query parameter {name!r} is given more than once", "invalid_parameter")
        return values[0]

    def int_arg(
        self, name: str, default: int | None = None, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.arg(name)
        if value is None:
            return default
        if not re.fullmatch(r"-?\d{1,18}", value):
            raise bad_request(f"the query parameter {name!r} must be an integer", "invalid_parameter")
        number = int(value)
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise bad_request(
                f"the query parameter {name!r} must be between {minimum} and {maximum}", "invalid_parameter"
            )
        return number

    def float_arg(self, name: str) -> float | None:
        value = self.arg(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            raise bad_request(f"the query parameter {name!r} must be a number (Unix seconds)", "invalid_parameter")
        if number != number or number in (float("inf"), float("-inf")):
            raise bad_request(f"the query parameter {name!r} must be a finite number", "invalid_parameter")
        return number

    def bool_arg(self, name: str, default: bool = False) -> bool:
        value = self.arg(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise bad_request(f"the query parameter {name!r} must be true or false", "invalid_parameter")

    def limit(self) -> int:
        value = self.int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE)
        assert value is not None
        return value

    def cursor(self) -> dict[str, Any] | None:
        text = self.arg("cursor")
        return None if text is None else decode_cursor(text)

    def cursor_position(self, key: str) -> int | None:
        """
        A row id kept in the cursor, or None without a cursor.  A cursor is
        the client's to send back, so what it holds is checked like input.
        """
        cursor = self.cursor()
        value = None if cursor is None else cursor.get(key)
        if value is None:
            return None
        if type(value) is not int or not 0 <= value <= MAX_ROW_ID:
            raise bad_request("the cursor is not one this API returned", "invalid_cursor")
        return value

    # -- bodies ----------------------------------------------------------------

    def raw_body(self, limit: int = MAX_JSON_BODY) -> bytes:
        try:
            return read_body(self.request, limit)
        except BodyTooLarge as e:
            raise ApiError(413, "body_too_large", f"the request body is larger than {e.limit} bytes")

    def body(self) -> Fields:
        """The JSON object sent (``400 invalid_json`` when it is not one)."""
        if self._json is None:
            data = self.raw_body()
            try:
                self._json = json.loads(data.decode("utf-8")) if data.strip() else {}
            except (UnicodeDecodeError, ValueError) as e:
                raise bad_request(f"the body is not valid JSON: {e}", "invalid_json")
            if not isinstance(self._json, dict):
                raise bad_request("the body must be a JSON object", "invalid_json")
        return Fields(self._json)


class Fields:
    """Typed access to a JSON object's members, with 422 for wrong ones."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def only(self, *names: str) -> None:
        unknown = sorted(set(self.data) - set(names))
        if unknown:
            raise invalid(f"unknown field {unknown[0]!r}; this request takes: {', '.join(names)}", "unknown_field")

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.data or self.data[name] is None:
            if required:
                raise invalid(f"the field {name!r} is required", "missing_field")
            return None
        return self.data[name]

    def text(self, name: str, required: bool = False, max_length: int = 1000) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise invalid(f"the field {name!r} must be a string")
        if len(value) > max_length:
            raise invalid(f"the field {name!r} is longer than {max_length} characters")
        return value

    def flag(self, name: str) -> bool | None:
        value = self._get(name, False)
        if value is not None and not isinstance(value, bool):
            raise invalid(f"the field {name!r} must be true or false")
        return value

    def number(self, name: str) -> float | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"the field {name!r} must be a number")
        return float(value)

    def strings(
        self, name: str, required: bool = False, max_items: int = 1000, max_length: int = 320
    ) -> list[str] | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise invalid(f"the field {name!r} must be a list of strings")
        if len(value) > max_items:
            raise invalid(f"the field {name!r} has more than {max_items} items")
        if any(len(v) > max_length for v in value):
            raise invalid(f"an item of {name!r} is longer than {max_length} characters")
        return value


def encode_cursor(data: Mapping[str, Any]) -> str:
    """An opaque page cursor (clients pass it back as is; its content is not part of the API)."""
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


#: Row ids are 64-bit signed integers in both engines.
MAX_ROW_ID = 2**63 - 1


def row_id(text: str) -> int | None:
    """A row id from a path segment, or None when it cannot be one (the caller answers 404)."""
    if not re.fullmatch(r"[0-9]{1,19}", text):
        return None
    number = int(text)
    return number if number <= MAX_ROW_ID else None


def decode_cursor(text: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the cursor is not one this API returned", "invalid_cursor")
    if not isinstance(data, dict):
        raise bad_request("the cursor is not one this API returned", "invalid_cursor")
    return data


Handler = Callable[[Call], Awaitable[Response]]


@attrs.frozen
class Route:
    method: str
    pattern: tuple[str, ...]
    scope: str | None
    handler: Handler

    @property
    def path(self) -> str:
        """The OpenAPI spelling: ``/lists/{list}/members``."""
        return "/" + "/".join(self.pattern)

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params: dict[str, str] = {}
        for part, segment in zip(self.pattern, segments, strict=True):
            if part.startswith("{"):
                if not segment:
                    return None
                params[part[1:-1]] = segment
            elif part != segment:
                return None
        return params


class Router:
    """The route table; ``add`` is used by ``api_v1``."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, path: str, scope: str | None, handler: Handler) -> None:
        self.routes.append(Route(method, tuple(path.strip("/").split("/")), scope, handler))

    def find(self, method: str, segments: Sequence[str]) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            raise ApiError(
                405,
                "method_not_allowed",
                f"{method} is not allowed here; use {', '.join(allowed)}",
                {"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise not_found("there is no such API endpoint")


class KeyAuthenticator:
    """``Authorization: Bearer <API key>`` to the key's ``LoginRecord``, with a short positive cache."""

    def __init__(
        self,
        credentials: ICredentialStore,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        cache_seconds: float = 30.0,
        cache_size: int = 10000,
    ) -> None:
        self._credentials = credentials
        self._clock = clock
        self._metrics = metrics
        self.cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._cache: dict[str, tuple[float, LoginRecord]] = {}
        #: Moves on ``forget_all``: a key checked before it is not kept after it.
        self._epoch = 0

    def forget_all(self) -> None:
        """After a revocation (here, or seen by ``ChangeWatcher``): every key is checked again."""
        self._cache.clear()
        self._epoch += 1

    async def authenticate(self, request: Request) -> LoginRecord:
        header = request.getHeader(b"authorization")
        if not header:
            raise ApiError(
                401,
                "missing_api_key",
                "send the API key as 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": 'Bearer realm="mailrelay"'},
            )
        scheme, _, key = header_text(header).strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > 200:
            raise ApiError(
                401,
                "missing_api_key",
                "send the API key as 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": 'Bearer realm="mailrelay"'},
            )
        digest = secret_hash(key)
        now = self._clock.seconds()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        epoch = self._epoch
        login = await self._credentials.token_login("api_key", digest)
        if login is None:
            if self._metrics is not None:
                self._metrics.auth_failures.labels(mechanism="api_key").inc()
            raise ApiError(
                401,
                "invalid_api_key",
                "the API key is not valid (unknown or revoked)",
                {"WWW-Authenticate": 'Bearer realm="mailrelay", error="invalid_token"'},
            )
        if epoch != self._epoch:
            return login
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[digest] = (now + self.cache_seconds, login)
        return login


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class ApiResource(Resource):
    """Everything under ``/api/v1``: authenticate, route, check the scope, run, answer JSON."""

    isLeaf = True

    def __init__(self, router: Router, authenticator: KeyAuthenticator, metrics: Metrics | None = None) -> None:
        super().__init__()
        self._router = router
        self._auth = authenticator
        self._metrics = metrics

    def render(self, request: Request) -> object:
        return run_async(request, lambda: self._handle(request))

    async def _handle(self, request: Request) -> None:
        try:
            response = await self._dispatch(request)
        except ApiError as e:
            response = Response(e.status, {"error": {"code": e.code, "message": e.message}}, headers=e.headers)
        except NotFound as e:
            response = Response(404, {"error": {"code": "not_found", "message": str(e)}})
        except Conflict as e:
            response = Response(409, {"error": {"code": "conflict", "message": str(e)}})
        except StorageError as e:
            response = Response(422, {"error": {"code": "invalid_field", "message": str(e)}})
        self._write(request, response)

    async def _dispatch(self, request: Request) -> Response:
        method = (request.method or b"GET").decode("ascii", "replace").upper()
        segments = [unquote(s.decode("utf-8", "replace")) for s in (request.postpath or [])]
        while segments and segments[-1] == "":
            segments.pop()
        login = await self._auth.authenticate(request)
        route, params = self._router.find("GET" if method == "HEAD" else method, segments)
        if route.scope is not None and route.scope not in login.scopes:
            raise ApiError(403, "missing_scope", f"this API key lacks the scope {route.scope!r}")
        query: dict[str, list[str]] = {}
        for key, values in (request.args or {}).items():
            query[key.decode("utf-8", "replace")] = [v.decode("utf-8", "replace") for v in values]
        return await route.handler(Call(request, login, params, query))

    def _write(self, request: Request, response: Response) -> None:
        request.setResponseCode(response.status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        for name, value in response.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("utf-8"))
        if response.status == 413:
            request.setHeader(b"connection", b"close")
        if self._metrics is not None:
            self._metrics.api_requests.labels(status=_status_class(response.status)).inc()
        if response.status == 204:
            if not request.finished and not request._disconnected:
                request.finish()
            return
        if response.raw is not None:
            body = response.raw
        else:
            body = json.dumps(response.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        request.setHeader(b"content-type", (response.content_type + "; charset=utf-8").encode("ascii"))
        finish(request, body)
