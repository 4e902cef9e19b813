"""HTTP triggers: an ASGI app routing requests to functions, and an optional server.

``register_trigger({"type": "http", "function_id": f, "config": {"api_path": "/orders/:id",
"http_method": "POST"}})`` routes a method and path (``:name`` segments are path
parameters) to a function. The handler gets ``{path, method, path_params, query_params,
headers, body}`` (a JSON body parsed, a text one as text, any other the bytes sent)
and returns
``{status_code, body, headers?}``.

``iii.asgi_app`` is a plain ASGI 3 application (no framework), so it mounts in any ASGI
server or framework. When the config enables iii's http worker, the engine serves it
itself with uvicorn, the optional ``http`` extra, imported only then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

import anyio
import anyio.abc

from ._errors import InvocationError
from ._triggers import Binding, register_trigger_type

if TYPE_CHECKING:
    from ._app import III

__all__ = ["HttpRouter", "install_http", "HttpServer", "HttpListenError"]

log = logging.getLogger("iii_embedded.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class _Route:
    __slots__ = ("function_id", "method", "parts", "path", "rank", "shape")

    def __init__(self, method: str, path: str, function_id: str) -> None:
        self.method = method
        self.path = path
        self.parts = [p for p in path.strip("/").split("/") if p]
        self.function_id = function_id
        self.shape = tuple(":" if p.startswith(":") else p for p in self.parts)
        """What the route matches: two routes of one shape match the same requests."""
        self.rank = tuple(p == ":" for p in self.shape)
        """Lower is more specific: a fixed segment wins over a parameter, from the left."""

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.parts):
            return None
        params: dict[str, str] = {}
        for pattern, actual in zip(self.parts, parts, strict=True):
            if pattern.startswith(":"):
                params[pattern[1:]] = actual
            elif pattern != actual:
                return None
        return params


class HttpRouter:
    """The ASGI application behind ``iii.asgi_app``."""

    def __init__(self, app: III) -> None:
        self._app = app
        self._routes: list[_Route] = []

    def add(self, method: str, api_path: str, function_id: str) -> _Route:
        """Route ``method api_path`` to ``function_id``; returns the route (for
        :meth:`remove`)."""
        method = method.upper()
        if method not in _METHODS:
            raise ValueError(f"http trigger of {function_id!r}: unknown http_method {method!r}")
        if not api_path.startswith("/"):
            raise ValueError(f"http trigger of {function_id!r}: api_path must start with '/'")
        new = _Route(method, api_path, function_id)
        for route in self._routes:
            if route.method == method and route.shape == new.shape:
                same = "" if route.path == api_path else f" (as {route.path})"
                raise ValueError(
                    f"http route {method} {api_path} is already bound{same} "
                    f"to {route.function_id!r}"
                )
        # Replaced, never changed in place (here and in ``remove``): a request being
        # routed on the loop keeps the list it started with.
        self._routes = [*self._routes, new]
        return new

    def remove(self, route: _Route) -> None:
        """Stop routing ``route``: its requests get a 404 (or a 405 if another route has
        the path) from now on; one already being served finishes."""
        self._routes = [r for r in self._routes if r is not route]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = _route_path(scope)
        parts = _segments(scope, path)
        method = str(scope.get("method", "GET")).upper()
        if method == "HEAD":
            send = _without_body(send)
        matches = [(r, params) for r in self._routes if (params := r.match(parts)) is not None]
        if not matches:
            await _respond(send, 404, {"error": "not found", "path": scope.get("path")})
            return
        chosen = [(r, p) for r, p in matches if r.method == method]
        if not chosen and method == "HEAD":  # a HEAD route of its own wins over GET's
            chosen = [(r, p) for r, p in matches if r.method == "GET"]
        if not chosen:
            methods = {r.method for r, _ in matches}
            if "GET" in methods:
                methods.add("HEAD")
            allowed = ", ".join(sorted(methods))
            await _respond(
                send,
                405,
                {"error": "method not allowed", "allowed": allowed},
                headers={"allow": allowed},
            )
            return
        route, path_params = min(chosen, key=lambda match: match[0].rank)
        headers = _request_headers(scope.get("headers", []))
        http = self._app.config.http
        limit = http.max_body_bytes if http is not None else _MAX_BODY_BYTES
        body_timeout_ms = http.body_timeout_ms if http is not None else _BODY_TIMEOUT_MS
        try:
            with anyio.fail_after(body_timeout_ms / 1000):
                raw = await _read_body(receive, headers.get("content-length", ""), limit)
        except TimeoutError:
            # A body that trickles in (a byte now and then, say) would hold the
            # connection and this task for as long as the client likes. The rest of it
            # is not read: "connection: close", as for a 413.
            log.info(
                "http %s %s: the body did not arrive within %d ms; %r is not called",
                method,
                path,
                body_timeout_ms,
                route.function_id,
            )
            await _respond(
                send,
                408,
                {"error": "request body timed out", "body_timeout_ms": body_timeout_ms},
                headers={"connection": "close"},
            )
            return
        except _BodyTooLarge:
            # Said with "connection: close": the rest of the body is not read, and the
            # connection cannot carry another request after it.
            await _respond(
                send,
                413,
                {"error": "request body too large", "max_body_bytes": limit},
                headers={"connection": "close"},
            )
            return
        if raw is None:
            # The client went away before its body was complete: a truncated body is not
            # the request it meant, and there is no one to answer.
            log.info(
                "http %s %s: the client disconnected before sending its whole body; "
                "%r is not called",
                method,
                path,
                route.function_id,
            )
            return
        try:
            body = _decode_body(raw, headers.get("content-type", ""))
        except _MalformedBody as exc:
            await _respond(send, 400, {"error": exc.error, "detail": exc.detail})
            return
        request = {
            "path": path,
            "method": method,
            "path_params": path_params,
            "query_params": _query(scope.get("query_string", b"")),
            "headers": headers,
            "body": body,
        }
        if not self._app.is_running:
            await _respond(send, 503, {"error": "the engine is not running"})
            return
        try:
            result = await self._app.trigger_async(route.function_id, request)
        except InvocationError as exc:
            if exc.code == "TIMEOUT":
                await _respond(send, 504, {"error": "the function timed out"})
                return
            error_id = str(uuid.uuid4())
            log.error(
                "http %s %s -> %r failed (error id %s): %s",
                method,
                request["path"],
                route.function_id,
                error_id,
                exc,
                exc_info=exc.__cause__ or exc,
            )
            await _respond(send, 500, {"error": "internal server error", "error_id": error_id})
            return
        try:
            status, payload, extra = _response_of(result)
            await _respond(send, status, payload, headers=extra)
        # Raised before anything was sent (a body nested too deeply is a RecursionError).
        except (TypeError, ValueError, RecursionError) as exc:
            error_id = str(uuid.uuid4())
            log.error(
                "http %s %s -> %r returned a response that cannot be sent (error id %s): "
                "%s: %s (a status_code must be an integer from 200 to 599, a body "
                "JSON-serialisable, str or bytes and none with 204, 205 or 304, header names "
                "HTTP tokens and values latin-1 text without CR, LF or NUL)",
                method,
                request["path"],
                route.function_id,
                error_id,
                type(exc).__name__,
                exc,
            )
            await _respond(send, 500, {"error": "internal server error", "error_id": error_id})

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def _without_body(send: Send) -> Send:
    """``send`` for a HEAD request: every response is sent as GET would send it, with its
    status and headers (its ``content-length`` too) and no body (RFC 9110 §9.3.2)."""

    async def send_head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


_MAX_BODY_BYTES = 10 * 1024 * 1024
_BODY_TIMEOUT_MS = 60_000
"""The request body's limits of an app whose config has no http worker (mounted elsewhere)."""


class _BodyTooLarge(Exception):
    """The request's body is longer than ``max_body_bytes``: a 413."""


async def _read_body(receive: Receive, content_length: str, limit: int) -> bytes | None:
    """The request's body; ``None`` if the client disconnected before sending all of it;
    ``_BodyTooLarge`` as soon as it is known to pass ``limit``: from its Content-Length
    before any of it is read, or, sent without one (chunked), once what came passes it."""
    if content_length.isascii() and content_length.isdigit() and int(content_length) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _MalformedBody(ValueError):
    """A body that does not decode as its content type says: a 400."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


_TEXT_TYPES = ("application/x-www-form-urlencoded", "application/xml")


def _not_json(constant: str) -> Any:
    """``json.loads`` takes ``NaN``, ``Infinity`` and ``-Infinity``; JSON (RFC 8259) has
    no such values, and a payload holding one could not be stored or sent back."""
    raise ValueError(f"{constant} is not a JSON value")


def _loads(raw: str | bytes) -> Any:
    return json.loads(raw, parse_constant=_not_json)


def _decode_body(raw: bytes, content_type: str) -> Any:
    """The body as the function gets it: ``None`` when empty; parsed JSON for a JSON
    type (``application/json``, ``*/*+json``); the text for a type of JSON lines
    (``application/x-ndjson``, ``application/json-seq``: many documents, which one parse
    would refuse); for a text type (``text/*``, form, XML) or none, parsed JSON if it
    parses, else the text (its charset, UTF-8 by default); for any other type the bytes
    as sent. A JSON or text body that does not decode is ``_MalformedBody``."""
    if not raw:
        return None
    media, _, params = content_type.lower().partition(";")
    media = media.strip()
    lines_of_json = "json" in media and not (media == "application/json" or media.endswith("+json"))
    if "json" in media and not lines_of_json:
        try:
            return _loads(raw)  # UTF-8 (or the UTF-16/32 JSON allows), else an error
        except ValueError as exc:
            raise _MalformedBody("malformed JSON body", str(exc)) from None
        except RecursionError:  # nested deeper than the parser recurses: "[[[[..."
            raise _MalformedBody("malformed JSON body", "nested too deeply") from None
    textual = media.startswith("text/") or media in _TEXT_TYPES or media.endswith("+xml")
    if media and not (textual or lines_of_json):
        return raw
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        text = raw.decode(charset)
    except (LookupError, UnicodeDecodeError) as exc:
        if not media:
            return raw  # no type claimed: bytes that are not text stay bytes
        raise _MalformedBody("malformed text body", str(exc)) from None
    if lines_of_json:  # one line would parse, two would not: the text, whatever it holds
        return text
    try:
        return _loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
        return text


def _request_headers(raw: Any) -> dict[str, str]:
    """The request's headers by lower-case name. A name sent more than once has its values
    joined in the order sent, with ", " (RFC 9110 §5.3: a list header means the same
    either way), ``cookie`` with "; " (its own separator, as HTTP/2 joins it)."""
    headers: dict[str, str] = {}
    for k, v in raw:
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        if name in headers:
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value
    return headers


def _query(query_string: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key in out:
            existing = out[key]
            out[key] = [*existing, value] if isinstance(existing, list) else [existing, value]
        else:
            out[key] = value
    return out


def _response_of(result: Any) -> tuple[int, Any, dict[str, list[str]]]:
    """The status, body and headers a handler's result asks for; ``ValueError`` or
    ``TypeError`` when they cannot make an HTTP response."""
    if isinstance(result, Mapping) and "status_code" in result:
        raw = result["status_code"]
        # An integer, or its ASCII digits as text ("201"); not a bool, a float, or text
        # that int() reads but is no status (" 201", "2_01", fullwidth digits).
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise TypeError(f"status_code {raw!r} is not an integer")
        if isinstance(raw, str) and not (raw.isascii() and raw.isdigit()):
            raise ValueError(f"status_code {raw!r} is not an integer")
        status = int(raw)
        # 1xx are interim responses, not an answer: an ASGI app cannot send them.
        if not 200 <= status <= 599:
            raise ValueError(f"status_code {status} is outside 200-599")
        headers = result.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise TypeError(f"headers {headers!r} is not a mapping")
        body = result.get("body")
        if status in _NO_BODY and body not in (None, "", b""):
            raise ValueError(f"status_code {status} is sent without a body, and one was given")
        return status, body, {_header_name(k): _header_values(k, v) for k, v in headers.items()}
    return 200, result, {}


_NO_BODY = {204, 205, 304}
"""Statuses whose response has no body (RFC 9110 §6.4.1): none is sent, nor a
content-length of ours (a 204 has none at all)."""
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _header_name(name: Any) -> str:
    if not isinstance(name, str):  # str(b"x-a") is "b'x-a'", an HTTP token
        raise TypeError(f"header name {name!r} is not a string")
    text = name.lower()
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"header name {text!r} is not an HTTP token")
    return text


def _header_values(name: Any, value: Any) -> list[str]:
    """The lines a header is sent as: one per item of a list or tuple (``set-cookie``,
    which cannot be joined into one), else one."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_header_value(name, item) for item in items]


def _header_value(name: Any, value: Any) -> str:
    """The header's value as text (a number as its digits); ``TypeError`` for another
    type (``None``, bytes: their ``str`` is no value meant), ``ValueError`` for a CR, LF or
    NUL (which would end the header and start another: response splitting) or a character
    outside latin-1."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(
            f"header {str(name).lower()!r}: value {value!r} is not a string or a number"
        )
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        raise ValueError(f"header {str(name).lower()!r}: value {text!r} has a CR, LF or NUL")
    text.encode("latin-1")  # UnicodeEncodeError, a ValueError, names the character
    return text


def _route_path(scope: Scope) -> str:
    """The request's path below where the app is mounted. A server or framework that
    mounts the app under a prefix sets ``root_path`` to it; Starlette (and so FastAPI)
    leaves the prefix in ``path`` too, older versions took it out."""
    path = str(scope.get("path") or "/")
    root = str(scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def _segments(scope: Scope, path: str) -> list[str]:
    """The path's segments, each percent-decoded on its own, so that an encoded slash
    (``%2F``) stays inside its segment (a parameter's value), as the raw path says."""
    decoded = [p for p in path.strip("/").split("/") if p]
    raw = scope.get("raw_path")
    if not raw or b"%2f" not in raw.lower():
        return decoded
    text = raw.decode("latin-1")
    root = str(scope.get("root_path") or "").rstrip("/")
    if root and (text == root or text.startswith(root + "/")):
        text = text[len(root) :]
    # Only if it is the same path as ``path`` (a framework may have rewritten that one).
    # Compared whole: an encoded slash first or last in a segment decodes to an empty
    # segment, which ``decoded`` has dropped.
    if unquote(text) != path:
        return decoded
    return [unquote(p) for p in text.strip("/").split("/") if p]


async def _respond(
    send: Send, status: int, body: Any, headers: Mapping[str, str | list[str]] | None = None
) -> None:
    extra = {k: [v] if isinstance(v, str) else v for k, v in (headers or {}).items()}
    if status in _NO_BODY:  # no body (_response_of refused one), no content-length
        data, content_type = b"", ""
    elif isinstance(body, bytes):
        data, content_type = body, "application/octet-stream"
    elif isinstance(body, str):
        data, content_type = body.encode(), "text/plain; charset=utf-8"
    else:
        # No NaN or Infinity: JSON has none, and a client's parser would refuse the body.
        data, content_type = json.dumps(body, allow_nan=False).encode(), "application/json"
    if content_type and "content-type" not in extra:
        extra["content-type"] = [content_type]
    if status not in _NO_BODY:
        extra["content-length"] = [str(len(data))]
    elif status == 204:
        extra.pop("content-length", None)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (k.encode("latin-1"), v.encode("latin-1")) for k, vs in extra.items() for v in vs
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class HttpListenError(OSError):
    """The engine's http server cannot listen on its host and port (taken, say): the
    engine does not start."""


class HttpServer:
    """The engine's own HTTP server (uvicorn), run inside the engine's task group."""

    def __init__(self, app: III, host: str, port: int, header_timeout_ms: int = 10_000) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.header_timeout_ms = header_timeout_ms
        self._server: Any = None
        self._done = anyio.Event()

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start serving; returns once the socket listens (or raises a clear error)."""
        try:
            import uvicorn
        except ImportError:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "the config enables the http worker, which needs uvicorn: "
                'pip install "iii-embedded[http]"'
            ) from None

        class _Server(uvicorn.Server):
            def capture_signals(self) -> Any:  # the engine owns SIGINT/SIGTERM
                import contextlib

                return contextlib.nullcontext()

        config = uvicorn.Config(
            _served(self.app.asgi_app),
            host=self.host,
            port=self.port,
            http=_with_head_timeout(self.header_timeout_ms / 1000),
            h11_max_incomplete_event_size=_MAX_HEAD_BYTES,
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        self._server = server = _Server(config)

        async def serve() -> None:
            try:
                await server.serve()
            except SystemExit:  # uvicorn's way to fail at start-up: start() raises
                pass
            finally:
                self._done.set()

        # uvicorn logs why it cannot listen (and exits): that reason goes into the error
        # raised here, one message, rather than a log line of its own beside it.
        reasons: list[str] = []

        def keep_reason(record: logging.LogRecord) -> bool:
            if record.levelno >= logging.ERROR:
                reasons.append(record.getMessage())
                return False
            return True

        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(keep_reason)
        try:
            tg.start_soon(serve, name="iii-http")
            while not server.started:
                if self._done.is_set():
                    # "[Errno 98] error while attempting to bind on address (...): address
                    # already in use": the cause is after the last colon.
                    why = f": {reasons[-1].rsplit(': ', 1)[-1]}" if reasons else ""
                    raise HttpListenError(
                        f"the http server cannot listen on {self.host}:{self.port}{why}"
                    )
                await anyio.sleep(0.005)
        finally:
            uvicorn_log.removeFilter(keep_reason)
        sockets = [s for srv in server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("serving http triggers on http://%s:%s", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting connections and finish the ones in flight."""
        if self._server is not None:
            self._server.should_exit = True
            with anyio.move_on_after(5):
                await self._done.wait()


_MAX_HEAD_BYTES = 16 * 1024
"""The largest request head (request line and headers) the engine's server reads: h11's
own limit for a head still arriving, applied to one that came whole too."""
_HTTP_VERSIONS = {"1.0", "1.1"}
"""The versions the engine's server speaks (h11 parses any ``HTTP/d.d``)."""
_HEAD_TOO_LARGE = {"error": "request head too large", "max_head_bytes": _MAX_HEAD_BYTES}


def _head_size(scope: Scope) -> int:
    """The size of the request's head as it was sent, near enough: its request line and
    headers (a server strips the spaces around a header's value)."""
    query = len(scope.get("query_string") or b"")
    target = len(scope.get("raw_path") or b"") + (query + 1 if query else 0)  # "?" + query
    line = len(scope.get("method", "")) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ())) + 2


def _origin_form(scope: Scope) -> Scope:
    """``scope`` with a target in absolute form (``http://host/p``, which a server must
    accept: RFC 9112 §3.2.2) cut to its path, as the router reads it; uvicorn's h11
    protocol leaves the whole URL in ``path``."""
    path, raw = str(scope.get("path", "")), bytes(scope.get("raw_path") or b"")
    if "://" not in path:
        return scope
    after = path.partition("://")[2]
    raw_after = raw.partition(b"://")[2]
    return {
        **scope,
        "path": after[after.find("/") :] if "/" in after else "/",
        "raw_path": raw_after[raw_after.find(b"/") :] if b"/" in raw_after else b"/",
    }


def _served(app: HttpRouter) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """``app`` as the engine's server runs it: a request in an HTTP version the server does
    not speak (h11 takes ``HTTP/9.9`` as it would 1.1) is a 505, and one whose head is
    over ``_MAX_HEAD_BYTES`` a 431 (h11 limits only a head that has not all arrived),
    each with ``connection: close`` and no route looked at."""

    async def served(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            version = scope.get("http_version", "1.1")
            if version not in _HTTP_VERSIONS:
                body = {"error": "http version not supported", "http_version": version}
                await _respond(send, 505, body, headers={"connection": "close"})
                return
            if _head_size(scope) > _MAX_HEAD_BYTES:
                await _respond(send, 431, _HEAD_TOO_LARGE, headers={"connection": "close"})
                return
            if not str(scope.get("path", "/")).startswith("/"):
                scope = _origin_form(scope)
        await app(scope, receive, send)

    return served


def _with_head_timeout(timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (h11 or httptools, as uvicorn picks), closing a connection
    that has not sent a whole request head ``timeout`` seconds after it opened or after
    its last response. uvicorn's own keep-alive timeout starts only after a response and
    stops at the first byte, so a client sending nothing, or a head a byte at a time,
    held a connection (and a file descriptor) for as long as it liked."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class _Protocol(base):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            cycle = self.cycle  # each request head gives a new one
            if cycle is None or cycle.response_complete:  # else a pipelined head came
                self._head_timer = self.loop.call_later(timeout, self._head_late, cycle)

        def _head_late(self, cycle: Any) -> None:
            self._head_timer = None
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers a request h11 refuses with a plain-text 400; every other
            # error of ours is JSON, so this one is too. A head that passes h11's limit
            # before it is complete is a 431, as a head that came whole gets (``_served``).
            # httptools' protocol has no ``conn``: its own answer stands.
            conn = getattr(self, "conn", None)
            if conn is None:
                super().send_400_response(msg)
                return
            import h11

            payload: dict[str, object] = {"error": "malformed request"}
            status, reason = 400, b"Bad Request"
            if len(conn.trailing_data[0]) > _MAX_HEAD_BYTES:
                status, reason = 431, b"Request Header Fields Too Large"
                payload = _HEAD_TOO_LARGE
            else:
                payload["detail"] = msg
            body = json.dumps(payload).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            response = h11.Response(status_code=status, headers=headers, reason=reason)
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(conn.send(event))
            self.transport.close()

    return _Protocol


def _register_http(app: III, trigger: Mapping[str, Any]) -> Binding:
    function_id = trigger.get("function_id")
    config = trigger.get("config") or {}
    if not isinstance(function_id, str) or not function_id:
        raise ValueError("an http trigger needs a 'function_id'")
    api_path = config.get("api_path") if isinstance(config, Mapping) else None
    if not isinstance(api_path, str) or not api_path:
        raise ValueError(f"the http trigger of {function_id!r} needs config.api_path")
    method = str(config.get("http_method", "GET"))
    route = app.http_router.add(method, api_path, function_id)
    router = app.http_router
    return Binding(key=("http", route), undo=lambda: router.remove(route))


def install_http(app: III) -> None:
    """Register the ``http`` trigger type and, if configured, the engine's own server."""
    register_trigger_type("http", _register_http)
