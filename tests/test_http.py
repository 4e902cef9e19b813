"""HTTP triggers (SPEC §7) over a real socket: routing, request shape, responses, errors."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, HttpConfig, QueueConfig, TriggerAction
from iii_embedded.testing import drain

pytestmark = pytest.mark.anyio


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"content-type": content_type} if data is not None else {}
    status, response_headers, payload = await anyio.to_thread.run_sync(
        request, port, method, path, data, headers
    )
    if response_headers.get("content-type", "").startswith("application/json"):
        return status, response_headers, json.loads(payload)
    return status, response_headers, payload.decode()


def make_app() -> III:
    config = Config(
        queues={"payment": QueueConfig(name="payment", type="fifo", message_group_field="orderId")},
        http=HttpConfig(host="127.0.0.1", port=0),
    )
    return III(config, shutdown_grace_ms=0)


def route_post_p(iii: III) -> None:
    """``POST /p`` calls the function ``p``."""
    iii.register_trigger(
        {"type": "http", "function_id": "p", "config": {"api_path": "/p", "http_method": "POST"}}
    )


def recording(calls: list[Any], key: str | None = None) -> Any:
    """A handler that records each request (or its ``key``) in ``calls`` and answers 200."""

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        calls.append(req if key is None else req[key])
        return {"status_code": 200}

    return handler


def echo_params(fid: str) -> Any:
    """A handler answering with its function id and the request's path parameters."""

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"fn": fid, **req["path_params"]}

    return handler


def route_orders_show(iii: III, show: Any) -> None:
    """``show`` as ``orders::show``, served at ``POST /orders/:id``."""
    iii.register_function("orders::show", show)
    iii.register_trigger(
        {
            "type": "http",
            "function_id": "orders::show",
            "config": {"api_path": "/orders/:id", "http_method": "POST"},
        }
    )


async def test_routes_path_and_query_params_and_json_bodies() -> None:
    iii = make_app()
    seen: list[dict[str, Any]] = []

    def show(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        return {
            "status_code": 200,
            "body": {"id": req["path_params"]["id"]},
            "headers": {"x-order": req["path_params"]["id"]},
        }

    route_orders_show(iii, show)
    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        status, headers, body = await call(
            port, "POST", "/orders/42?verbose=1&tag=a&tag=b", {"qty": 2}
        )
    assert (status, body, headers["x-order"]) == (200, {"id": "42"}, "42")
    [req] = seen
    assert req["path"] == "/orders/42"
    assert req["method"] == "POST"
    assert req["path_params"] == {"id": "42"}
    assert req["query_params"] == {"verbose": "1", "tag": ["a", "b"]}
    assert req["body"] == {"qty": 2}
    assert req["headers"]["content-type"] == "application/json"


async def asgi_messages(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[Any]:
    """What an ASGI app sends for one request whose ``body`` arrives whole."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def asgi_post(app: Any, path: str, root_path: str, body: Any) -> tuple[int, Any]:
    """One POST straight to an ASGI app, as a server or a framework's mount would make it."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    sent = await asgi_messages(app, scope, json.dumps(body).encode())
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(payload)


async def test_mounted_under_a_prefix_it_routes_on_the_path_below_the_mount() -> None:
    iii = III(shutdown_grace_ms=0)
    seen: list[str] = []

    def show(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["path"])
        return {"status_code": 200, "body": req["path_params"]}

    route_orders_show(iii, show)
    async with iii.running():
        # Starlette and FastAPI keep the prefix in `path` and set `root_path` to it.
        kept = await asgi_post(iii.asgi_app, "/iii/orders/7", "/iii", {})
        # Older frameworks took the prefix out of `path`.
        stripped = await asgi_post(iii.asgi_app, "/orders/8", "/iii/", {})
        outside = await asgi_post(iii.asgi_app, "/iiix/orders/9", "/iii", {})
    assert kept == (200, {"id": "7"})
    assert stripped == (200, {"id": "8"})
    assert outside[0] == 404
    assert seen == ["/orders/7", "/orders/8"]


async def test_the_seed_pipeline_answers_201_and_enqueues_the_payment() -> None:
    iii = make_app()
    paid: list[Any] = []

    async def create_order(req: dict[str, Any]) -> dict[str, Any]:
        order = {"orderId": "o-1", **req["body"]}
        await iii.trigger_async(
            {
                "function_id": "orders::process-payment",
                "payload": order,
                "action": TriggerAction.Enqueue(queue="payment"),
            }
        )
        return {"status_code": 201, "body": {"orderId": order["orderId"]}}

    iii.register_function("orders::process-payment", paid.append)
    fn = iii.register_function("orders::create", create_order)
    iii.register_trigger(
        {
            "type": "http",
            "function_id": fn.id,
            "config": {"api_path": "/orders", "http_method": "POST"},
        }
    )
    async with iii.running():
        assert iii.http_server is not None
        status, _, body = await call(iii.http_server.port, "POST", "/orders", {"total": 9.5})
        await drain(iii)
    assert (status, body) == (201, {"orderId": "o-1"})
    assert paid == [{"orderId": "o-1", "total": 9.5}]


async def test_errors_are_json_404_405_400_and_500_with_an_error_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    iii = make_app()

    def boom(_: Any) -> None:
        raise RuntimeError("handler exploded")

    iii.register_function("boom", boom)
    iii.register_trigger(
        {
            "type": "http",
            "function_id": "boom",
            "config": {"api_path": "/boom", "http_method": "POST"},
        }
    )
    iii.register_function("text", lambda req: {"status_code": 200, "body": f"got {req['body']}"})
    iii.register_trigger({"type": "http", "function_id": "text", "config": {"api_path": "/text"}})
    caplog.set_level(logging.ERROR, logger="iii_embedded.http")
    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        not_found = await call(port, "GET", "/nope")
        wrong_method = await call(port, "GET", "/boom")
        malformed = await call(port, "POST", "/boom", raw=b"{not json")
        failed = await call(port, "POST", "/boom", {"x": 1})
        text = await call(port, "GET", "/text")
    assert not_found[0] == 404 and not_found[2]["error"] == "not found"
    assert wrong_method[0] == 405 and wrong_method[1]["allow"] == "POST"
    assert malformed[0] == 400 and malformed[2]["error"] == "malformed JSON body"
    assert failed[0] == 500 and failed[2]["error"] == "internal server error"
    error_id = failed[2]["error_id"]
    assert any(
        error_id in r.getMessage() and "handler exploded" in (r.exc_text or "")
        for r in caplog.records
    )
    assert text[:1] == (200,) and text[2] == "got None"


async def test_the_asgi_app_answers_503_when_the_engine_is_not_running() -> None:
    iii = III()
    iii.register_function("f", lambda req: 1)
    iii.register_trigger({"type": "http", "function_id": "f", "config": {"api_path": "/f"}})
    scope = {"type": "http", "method": "GET", "path": "/f", "headers": []}
    sent = await asgi_messages(iii.asgi_app, scope)
    assert sent[0]["status"] == 503


def test_bad_http_triggers_are_refused() -> None:
    iii = III()
    with pytest.raises(ValueError, match="api_path"):
        iii.register_trigger({"type": "http", "function_id": "f", "config": {}})
    with pytest.raises(ValueError, match="unknown http_method 'FETCH'"):
        iii.register_trigger(
            {
                "type": "http",
                "function_id": "f",
                "config": {"api_path": "/x", "http_method": "FETCH"},
            }
        )
    iii.register_trigger({"type": "http", "function_id": "f", "config": {"api_path": "/x"}})
    with pytest.raises(ValueError, match="already bound"):
        iii.register_trigger({"type": "http", "function_id": "g", "config": {"api_path": "/x"}})


def test_the_engine_serves_http_in_every_lifecycle(tmp_path: Path) -> None:
    """start() (and `with iii:`) in this process; register_worker and run() in scripts
    configured by an iii-config.yaml that enables iii's http worker."""
    iii = make_app()
    iii.register_function("ping", lambda req: {"status_code": 200, "body": {"pong": 1}})
    iii.register_trigger({"type": "http", "function_id": "ping", "config": {"api_path": "/ping"}})
    with iii:
        assert iii.http_server is not None
        status, _, body = request(iii.http_server.port, "GET", "/ping")
    assert (status, json.loads(body)) == (200, {"pong": 1})

    (tmp_path / "iii-config.yaml").write_text(
        "workers:\n  - name: iii-http\n    config: {port: 0, host: 127.0.0.1}\n"
    )
    common = """
        import sys
        def ping(req):
            return {"status_code": 200, "body": {"pong": sys.argv[1]}}
        def announce(app, tg):  # once serving: tell the test the port
            print(app.http_server.port, flush=True)
    """
    scripts = {
        "register_worker": """
            from iii_embedded import register_worker
            iii = register_worker()
            iii.register_function("ping", ping)
            iii.register_trigger({"type": "http", "function_id": "ping",
                                  "config": {"api_path": "/ping"}})
            announce(iii, None)
        """,
        "run": """
            from iii_embedded import III
            iii = III.from_config("iii-config.yaml")
            iii.register_function("ping", ping)
            iii.register_trigger({"type": "http", "function_id": "ping",
                                  "config": {"api_path": "/ping"}})
            iii.lifecycle_hooks.append(announce)
            iii.run()
        """,
    }
    for name, script in scripts.items():
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(common) + textwrap.dedent(script))
        proc = subprocess.Popen(
            [sys.executable, str(path), name],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline() or 0)
            assert port, proc.stderr.read() if proc.stderr else ""
            status, _, body = request(port, "GET", "/ping")
            assert (status, json.loads(body)) == (200, {"pong": name}), name
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (name, err)


def nested(depth: int) -> list[Any]:
    """A list ``depth`` lists deep: deeper than ``json.dumps`` recurses for 100 000."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("response", "cause"),
    [
        (
            {"status_code": 200, "body": {1, 2}},
            "TypeError: Object of type set is not JSON serializable",
        ),
        (  # sent as it was, NaN would be a body that is not JSON, typed as JSON
            {"status_code": 200, "body": {"x": float("nan")}},
            "ValueError: Out of range float values are not JSON compliant",
        ),
        (
            {"status_code": 200, "body": nested(100_000)},
            "RecursionError: maximum recursion depth exceeded",
        ),
        ({"status_code": "abc"}, "ValueError: status_code 'abc' is not an integer"),
        # int() takes these; an HTTP status is three ASCII digits
        ({"status_code": "2_01"}, "ValueError: status_code '2_01' is not an integer"),
        ({"status_code": " 201"}, "ValueError: status_code ' 201' is not an integer"),
        (
            {"status_code": "\uff12\uff10\uff11"},
            "ValueError: status_code '\uff12\uff10\uff11' is not an integer",
        ),
        # str() of these is no header: "b'x-a'" is even an HTTP token
        (
            {"status_code": 200, "headers": {b"x-a": "1"}},
            "TypeError: header name b'x-a' is not a string",
        ),
        (
            {"status_code": 200, "headers": {"x-a": b"1"}},
            "TypeError: header 'x-a': value b'1' is not a string or a number",
        ),
        (
            {"status_code": 200, "headers": {"x-a": None}},
            "TypeError: header 'x-a': value None is not a string or a number",
        ),
        (
            {"status_code": 200, "headers": {"x-a": ["1", {"a": 1}]}},
            "TypeError: header 'x-a': value {'a': 1} is not a string or a number",
        ),
        ({"status_code": 2.5}, "TypeError: status_code 2.5 is not an integer"),
        ({"status_code": True}, "TypeError: status_code True is not an integer"),
        ({"status_code": 1200}, "ValueError: status_code 1200 is outside 200-599"),
        ({"status_code": 200, "headers": ["x"]}, "TypeError: headers ['x'] is not a mapping"),
        ({"status_code": 101}, "ValueError: status_code 101 is outside 200-599"),
        (
            {"status_code": 204, "body": {"x": 1}},
            "ValueError: status_code 204 is sent without a body, and one was given",
        ),
        (
            {"status_code": 304, "body": "cached"},
            "ValueError: status_code 304 is sent without a body, and one was given",
        ),
        (  # the log's reminder of the rules names every status sent without a body
            {"status_code": 205, "body": "reset"},
            "ValueError: status_code 205 is sent without a body, and one was given (a "
            "status_code must be an integer from 200 to 599, a body JSON-serialisable, str "
            "or bytes and none with 204, 205 or 304,",
        ),
        (
            {"status_code": 200, "body": "x", "headers": {"x-a": "1\r\nset-cookie: evil=1"}},
            "ValueError: header 'x-a': value '1\\r\\nset-cookie: evil=1' has a CR, LF or NUL",
        ),
        (
            {"status_code": 200, "headers": {"x-a": "1\x00"}},
            "ValueError: header 'x-a': value '1\\x00' has a CR, LF or NUL",
        ),
        (
            {"status_code": 200, "headers": {"x a:": "1"}},
            "ValueError: header name 'x a:' is not an HTTP token",
        ),
        (
            {"status_code": 200, "headers": {"x-a": "caf\u00e9 \u2603"}},
            "UnicodeEncodeError: 'latin-1' codec can't encode character '\\u2603'",
        ),
    ],
)
async def test_a_response_that_cannot_be_sent_is_a_json_500_with_an_error_id(
    caplog: pytest.LogCaptureFixture, response: dict[str, Any], cause: str
) -> None:
    iii = III(shutdown_grace_ms=0)
    iii.register_function("odd", lambda req: response)
    iii.register_trigger({"type": "http", "function_id": "odd", "config": {"api_path": "/odd"}})
    caplog.set_level(logging.ERROR, logger="iii_embedded.http")
    async with iii.running():
        scope = {"type": "http", "method": "GET", "path": "/odd", "headers": []}
        sent = await asgi_messages(iii.asgi_app, scope)
    start, body = sent
    answer = json.loads(body["body"])
    assert start["status"] == 500
    assert (b"content-type", b"application/json") in start["headers"]
    assert answer["error"] == "internal server error"
    assert any(
        answer["error_id"] in r.getMessage() and cause in r.getMessage() for r in caplog.records
    )


async def asgi_get(iii: III, path: str, raw_path: bytes | None = None) -> tuple[int, Any]:
    """One GET through ``iii.asgi_app`` (no server): the status and the decoded body."""
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": path, "headers": []}
    if raw_path is not None:
        scope["raw_path"] = raw_path
    sent = await asgi_messages(iii.asgi_app, scope)
    return sent[0]["status"], json.loads(sent[1]["body"])


async def test_a_fixed_segment_wins_over_a_parameter_whatever_the_order_of_registration() -> None:
    iii = III(shutdown_grace_ms=0)
    for fid, api_path in (
        ("show", "/orders/:id"),
        ("new", "/orders/new"),
        ("item", "/orders/:id/items/:n"),
        ("first_item", "/orders/:id/items/first"),
    ):
        iii.register_function(fid, lambda req, fid=fid: {"fn": fid, **req["path_params"]})
        iii.register_trigger({"type": "http", "function_id": fid, "config": {"api_path": api_path}})
    with pytest.raises(ValueError, match=r"GET /orders/:oid is already bound \(as /orders/:id\)"):
        iii.register_trigger(
            {"type": "http", "function_id": "show", "config": {"api_path": "/orders/:oid"}}
        )
    async with iii.running():
        new = await asgi_get(iii, "/orders/new")
        show = await asgi_get(iii, "/orders/42")
        first = await asgi_get(iii, "/orders/42/items/first")
        item = await asgi_get(iii, "/orders/42/items/3")
        slash = await asgi_get(iii, "/orders/a/b", raw_path=b"/orders/a%2Fb")
    assert new == (200, {"fn": "new"})
    assert show == (200, {"fn": "show", "id": "42"})
    assert first == (200, {"fn": "first_item", "id": "42"})
    assert item == (200, {"fn": "item", "id": "42", "n": "3"})
    assert slash == (200, {"fn": "show", "id": "a/b"})  # an encoded slash stays in its segment


async def test_an_encoded_slash_at_either_end_of_a_segment_stays_in_it() -> None:
    """``%2F`` first or last in a segment is part of the parameter too: the path it
    decodes to has an empty segment there, which must not make the route use the decoded
    path (and match ``/e/:id/:x`` for ``/e/a%2Fb/%2F`` with the wrong values)."""
    iii = III(shutdown_grace_ms=0)
    for fid, api_path in (("one", "/e/:id"), ("two", "/e/:id/:x")):
        iii.register_function(fid, echo_params(fid))
        iii.register_trigger({"type": "http", "function_id": fid, "config": {"api_path": api_path}})
    async with iii.running():
        trailing = await asgi_get(iii, "/e/a/", raw_path=b"/e/a%2F")
        leading = await asgi_get(iii, "/e//b", raw_path=b"/e/%2Fb")
        both = await asgi_get(iii, "/e/a/b//", raw_path=b"/e/a%2Fb/%2F")
        mounted = await asgi_messages(
            iii.asgi_app,
            {
                "type": "http",
                "method": "GET",
                "path": "/api/e//b",
                "root_path": "/api",
                "raw_path": b"/api/e/%2Fb",
                "headers": [],
            },
        )
    assert trailing == (200, {"fn": "one", "id": "a/"})
    assert leading == (200, {"fn": "one", "id": "/b"})
    assert both == (200, {"fn": "two", "id": "a/b", "x": "/"})
    assert json.loads(mounted[1]["body"]) == {"fn": "one", "id": "/b"}


async def test_a_taken_port_is_one_error_naming_it_and_serve_false_leaves_the_port_alone() -> None:
    import socket

    from iii_embedded._http import HttpListenError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        iii = III(Config(http=HttpConfig(host="127.0.0.1", port=port)), shutdown_grace_ms=0)
        iii.register_function("ping", lambda _: "pong")
        with pytest.raises(HttpListenError) as caught:
            async with iii.running():
                pass
        assert str(caught.value) == (
            f"the http server cannot listen on 127.0.0.1:{port}: address already in use"
        )
        assert isinstance(caught.value, OSError)
        async with iii.running(serve=False):  # as `iii-embedded trigger --app` starts it
            assert iii.http_server is None
            assert await iii.trigger_async("ping", None) == "pong"
    finally:
        holder.close()


@pytest.mark.parametrize(
    ("response", "headers"),
    [
        ({"status_code": 204}, []),
        ({"status_code": 204, "body": "", "headers": {"content-length": "5"}}, []),
        ({"status_code": 205}, []),
        ({"status_code": 304, "headers": {"etag": '"v1"'}}, [(b"etag", b'"v1"')]),
    ],
)
async def test_a_204_or_304_is_sent_with_no_body_and_no_content_length_of_ours(
    response: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    iii = III(shutdown_grace_ms=0)
    iii.register_function("none", lambda req: response)
    iii.register_trigger({"type": "http", "function_id": "none", "config": {"api_path": "/n"}})
    async with iii.running():
        scope = {"type": "http", "method": "GET", "path": "/n", "headers": []}
        sent = await asgi_messages(iii.asgi_app, scope)
    assert sent == [
        {"type": "http.response.start", "status": response["status_code"], "headers": headers},
        {"type": "http.response.body", "body": b""},
    ]


async def test_a_client_that_disconnects_mid_upload_does_not_call_the_function() -> None:
    iii = III(shutdown_grace_ms=0)
    calls: list[Any] = []
    iii.register_function("orders::create", lambda req: calls.append(req) or {"status_code": 201})
    iii.register_trigger(
        {
            "type": "http",
            "function_id": "orders::create",
            "config": {"api_path": "/orders", "http_method": "POST"},
        }
    )
    messages = [
        {"type": "http.request", "body": b'{"amount": 1000000, "note": "par', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "headers": [(b"content-type", b"text/plain")],
    }
    async with iii.running():
        await iii.asgi_app(scope, receive, send)
        # The same request sent whole is a call: the route and engine work.
        messages[:] = [{"type": "http.request", "body": b"whole", "more_body": False}]
        await iii.asgi_app(scope, receive, send)
    assert [c["body"] for c in calls] == ["whole"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [201]


async def test_an_unregistered_route_answers_404_and_one_being_served_finishes() -> None:
    """``register_trigger`` returns a handle: after ``unregister()`` the route answers 404
    (405 if another method still has the path); a request already in its handler gets its
    answer; the route can be registered again, even to another function."""
    iii = III(shutdown_grace_ms=0)
    inside, release = anyio.Event(), anyio.Event()

    async def show(req: dict[str, Any]) -> dict[str, Any]:
        if req["path_params"]["id"] == "slow":
            inside.set()
            await release.wait()
        return {"id": req["path_params"]["id"]}

    iii.register_function("show", show)
    iii.register_function("delete", lambda req: {"deleted": req["path_params"]["id"]})
    route = iii.register_trigger(
        {"type": "http", "function_id": "show", "config": {"api_path": "/orders/:id"}}
    )
    assert (route.type, route.function_id) == ("http", "show")
    async with iii.running():
        assert await asgi_get(iii, "/orders/1") == (200, {"id": "1"})
        async with anyio.create_task_group() as tg:
            answers: list[tuple[int, Any]] = []

            async def slow() -> None:
                answers.append(await asgi_get(iii, "/orders/slow"))

            tg.start_soon(slow)
            with anyio.fail_after(5):
                await inside.wait()
            route.unregister()
            release.set()
        assert answers == [(200, {"id": "slow"})]
        assert await asgi_get(iii, "/orders/1") == (
            404,
            {"error": "not found", "path": "/orders/1"},
        )
        route.unregister()  # twice: harmless
        deleting = iii.register_trigger(
            {
                "type": "http",
                "function_id": "delete",
                "config": {"api_path": "/orders/:id", "http_method": "DELETE"},
            }
        )
        assert await asgi_get(iii, "/orders/1") == (
            405,
            {"error": "method not allowed", "allowed": "DELETE"},
        )
        deleting.unregister()
        iii.register_trigger(
            {"type": "http", "function_id": "delete", "config": {"api_path": "/orders/:id"}}
        )
        assert await asgi_get(iii, "/orders/7") == (200, {"deleted": "7"})


async def test_head_on_a_get_route_answers_as_get_would_without_the_body() -> None:
    """HEAD runs the GET route's function (as Starlette and aiohttp do) and sends its
    status and headers, with the Content-Length of the body GET sends, and no body; a
    405's Allow lists HEAD beside GET."""
    iii = make_app()
    seen: list[str] = []

    def show(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["method"])
        return {"status_code": 200, "body": {"id": req["path_params"]["id"]}, "headers": {"x": "1"}}

    iii.register_function("show", show)
    iii.register_trigger({"type": "http", "function_id": "show", "config": {"api_path": "/o/:id"}})

    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        got = await anyio.to_thread.run_sync(request, port, "GET", "/o/42")
        head = await anyio.to_thread.run_sync(request, port, "HEAD", "/o/42")
        wrong = await anyio.to_thread.run_sync(request, port, "PUT", "/o/42")
        missing = await anyio.to_thread.run_sync(request, port, "HEAD", "/nope")
        scope = {"type": "http", "method": "HEAD", "path": "/o/7", "headers": []}
        sent = await asgi_messages(iii.asgi_app, scope)
    assert got[0] == 200 and got[2] == b'{"id": "42"}'
    assert head[0] == 200 and head[2] == b""
    assert head[1]["content-length"] == str(len(got[2]))
    assert (head[1]["content-type"], head[1]["x"]) == ("application/json", "1")
    assert (wrong[0], wrong[1]["allow"]) == (405, "GET, HEAD")
    assert missing[0] == 404 and missing[2] == b""
    assert seen == ["GET", "HEAD", "HEAD"]
    start, body = sent
    assert (start["status"], body["body"]) == (200, b"")
    assert (b"content-length", str(len(b'{"id": "7"}')).encode()) in start["headers"]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_repeated_request_headers_are_joined_and_a_list_value_sends_one_line_each() -> None:
    """A request header sent twice reaches the function once, its values joined with ", "
    in the order sent (``cookie`` with "; "); a response header given a list is sent as one
    line per item (``set-cookie``)."""
    iii = make_app()
    seen: list[dict[str, str]] = []

    def echo(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["headers"])
        # A number is sent as its text.
        return {"status_code": 200, "headers": {"set-cookie": ["a=1; Path=/", "b=2"], "age": 7}}

    iii.register_function("echo", echo)
    iii.register_trigger({"type": "http", "function_id": "echo", "config": {"api_path": "/e"}})
    async with iii.running():
        assert iii.http_server is not None
        answer = await anyio.to_thread.run_sync(
            raw_exchange,
            iii.http_server.port,
            b"GET /e HTTP/1.1\r\nHost: x\r\nX-Tag: a\r\nAccept: text/html\r\nx-tag: b, c\r\n"
            b"Cookie: s=1\r\nCookie: t=2\r\nConnection: close\r\n\r\n",
        )
    [headers] = seen
    assert headers["x-tag"] == "a, b, c"
    assert headers["accept"] == "text/html"
    assert headers["cookie"] == "s=1; t=2"
    head = answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert [h for h in head if h.startswith(b"set-cookie:")] == [
        b"set-cookie: a=1; path=/",
        b"set-cookie: b=2",
    ]
    assert b"age: 7" in head


async def test_a_binary_body_reaches_the_function_as_its_exact_bytes() -> None:
    """A body of a binary content type (neither JSON nor text) is passed as ``bytes``,
    unchanged; text is decoded with its charset (UTF-8 by default), and a text or JSON
    body that does not decode is a 400; an untyped body that is not UTF-8 stays bytes."""
    iii = make_app()
    seen: list[Any] = []

    def upload(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["body"])
        return {"status_code": 200, "body": {"ok": True}}

    iii.register_function("upload", upload)
    iii.register_trigger(
        {
            "type": "http",
            "function_id": "upload",
            "config": {"api_path": "/u", "http_method": "POST"},
        }
    )
    every_byte = bytes(range(256))
    cases = [
        (every_byte, {"content-type": "application/octet-stream"}),
        (b"\x89PNG\r\n\x1a\n\x00", {"content-type": "image/png"}),
        (b"caf\xe9", {"content-type": "text/plain; charset=latin-1"}),
        (b"caf\xc3\xa9", {"content-type": "text/plain"}),
        (b"\x00\xff", {}),
        (b"\xff\xfe", {"content-type": "text/plain"}),
        (b'{"a": "\xff"}', {"content-type": "application/json"}),
    ]
    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        answers = [
            await anyio.to_thread.run_sync(request, port, "POST", "/u", body, headers)
            for body, headers in cases
        ]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 200, 400, 400]
    assert seen == [every_byte, b"\x89PNG\r\n\x1a\n\x00", "caf\u00e9", "caf\u00e9", b"\x00\xff"]
    assert json.loads(answers[5][2])["error"] == "malformed text body"
    assert json.loads(answers[6][2])["error"] == "malformed JSON body"


async def test_json_nested_too_deep_to_parse_is_a_400_and_as_text_stays_text() -> None:
    """A JSON body nested deeper than the parser recurses (a few kilobytes of ``[``) is a
    malformed body, a JSON 400, not an exception out of the app (the server's plain-text
    500); the same bytes sent as text, or untyped, reach the function as the text."""
    iii = III(shutdown_grace_ms=0)
    seen: list[Any] = []
    iii.register_function("p", recording(seen, "body"))
    route_post_p(iii)
    deep = b"[" * 100_000 + b"]" * 100_000
    answers = []
    async with iii.running():
        for content_type in (b"application/json", b"text/plain", None):
            headers = [(b"content-type", content_type)] if content_type else []
            scope = {"type": "http", "method": "POST", "path": "/p", "headers": headers}
            answers.append(await asgi_messages(iii.asgi_app, scope, deep))
    start, body = answers[0]
    assert start["status"] == 400
    assert json.loads(body["body"])["error"] == "malformed JSON body"
    assert [a[0]["status"] for a in answers[1:]] == [200, 200]
    assert seen == [deep.decode()] * 2


async def test_json_lines_reach_the_function_as_text_and_a_json_suffix_type_is_parsed() -> None:
    """A type that names JSON but is many documents (NDJSON, JSON text sequences) is not
    one JSON parse (two lines would be a 400, one line a dict): its text, whatever it
    holds; ``application/<x>+json`` is JSON, parsed (a malformed one a 400)."""
    iii = III(shutdown_grace_ms=0)
    seen: list[Any] = []
    iii.register_function("p", recording(seen, "body"))
    route_post_p(iii)
    two_lines = b'{"n": 1}\n{"n": 2}\n'
    cases = [
        (b"application/x-ndjson", two_lines),
        (b"application/x-ndjson", b'{"n": 1}\n'),
        (b"application/json-seq", b'\x1e{"n": 1}\n'),
        (b"application/problem+json", b'{"title": "t"}'),
        (b"application/vnd.api+json", b"{broken"),
    ]
    answers = []
    async with iii.running():
        for content_type, raw in cases:
            scope = {
                "type": "http",
                "method": "POST",
                "path": "/p",
                "headers": [(b"content-type", content_type)],
            }
            answers.append(await asgi_messages(iii.asgi_app, scope, raw))
    assert [a[0]["status"] for a in answers] == [200, 200, 200, 200, 400]
    assert seen == [two_lines.decode(), '{"n": 1}\n', '\x1e{"n": 1}\n', {"title": "t"}]
    assert json.loads(answers[4][1]["body"])["error"] == "malformed JSON body"


async def test_a_body_over_max_body_bytes_is_a_413_before_it_is_read() -> None:
    """A Content-Length over the limit is refused without reading the body; a chunked body
    is counted as it arrives and refused once past the limit, before its end; bodies up to
    the limit, chunked or not, reach the function whole."""
    iii = III(
        Config(http=HttpConfig(host="127.0.0.1", port=0, max_body_bytes=1000)),
        shutdown_grace_ms=0,
    )
    seen: list[Any] = []

    def upload(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["body"])
        return {"status_code": 200, "body": {"size": len(req["body"])}}

    iii.register_function("upload", upload)
    iii.register_trigger(
        {
            "type": "http",
            "function_id": "upload",
            "config": {"api_path": "/u", "http_method": "POST"},
        }
    )
    head = b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        declared = await anyio.to_thread.run_sync(
            raw_exchange, port, head + b"Content-Length: 1000000000\r\n\r\n"
        )
        streamed = await anyio.to_thread.run_sync(
            raw_exchange,
            port,
            head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"a" * 600) + chunk(b"b" * 600),
        )
        at_limit = await anyio.to_thread.run_sync(
            request, port, "POST", "/u", b"c" * 1000, {"content-type": "image/png"}
        )
        chunked = await anyio.to_thread.run_sync(
            raw_exchange,
            port,
            head
            + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + chunk(b"d" * 400)
            + chunk(b"e" * 400)
            + b"0\r\n\r\n",
        )
    for answer in (declared, streamed):
        status_line, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status_line.startswith(b"HTTP/1.1 413 ")
        assert b"connection: close" in headers.lower()
        assert json.loads(body) == {"error": "request body too large", "max_body_bytes": 1000}
    assert at_limit[0] == 200
    assert chunked.startswith(b"HTTP/1.1 200 ") and chunked.endswith(b'{"size": 800}')
    assert seen == [b"c" * 1000, b"d" * 400 + b"e" * 400]


async def test_a_connection_that_does_not_send_a_whole_request_head_in_time_is_closed() -> None:
    """A client that opens a connection and sends nothing, or part of a request head
    (slowloris), is disconnected after ``header_timeout_ms``; a request whose head came in
    time is answered however long its function takes."""
    import socket

    iii = III(
        Config(http=HttpConfig(host="127.0.0.1", port=0, header_timeout_ms=200)),
        shutdown_grace_ms=0,
    )
    inside, release = anyio.Event(), anyio.Event()

    async def slow(req: dict[str, Any]) -> dict[str, Any]:
        inside.set()
        await release.wait()
        return {"status_code": 200, "body": "done"}

    iii.register_function("slow", slow)
    iii.register_trigger({"type": "http", "function_id": "slow", "config": {"api_path": "/s"}})

    def closed_by_server(port: int, data: bytes) -> bytes:
        """What the server sends before closing a connection that sent ``data``."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(data)
            return sock.recv(65536)  # b"" once the server closes; raises if it never does

    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        async with anyio.create_task_group() as tg:
            answers: list[tuple[int, dict[str, str], bytes]] = []

            async def answered() -> None:
                answers.append(await anyio.to_thread.run_sync(request, port, "GET", "/s"))

            tg.start_soon(answered)
            with anyio.fail_after(10):
                await inside.wait()
            # Opened after the slow request's head came: once this one is closed, the
            # slow request's connection has outlived its own head timeout too.
            partial = await anyio.to_thread.run_sync(
                closed_by_server, port, b"GET /s HTTP/1.1\r\nHost: x\r\nX-A: 1"
            )
            silent = await anyio.to_thread.run_sync(closed_by_server, port, b"")
            release.set()
    assert (partial, silent) == (b"", b"")
    assert [(status, body) for status, _, body in answers] == [(200, b"done")]


async def test_a_content_length_that_is_not_ascii_digits_is_no_crash() -> None:
    """A server that passes Content-Length unchecked (``"\u00b2"`` is a digit to
    ``str.isdigit``, not to ``int``): the body is counted as it comes instead."""
    iii = III(shutdown_grace_ms=0)
    iii.register_function("p", lambda req: {"status_code": 200, "body": {"got": req["body"]}})
    route_post_p(iii)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/p",
        "headers": [(b"content-length", "\u00b2".encode("latin-1"))],
    }
    async with iii.running():
        sent = await asgi_messages(iii.asgi_app, scope, b"hi")
    start, body = sent
    assert (start["status"], json.loads(body["body"])) == (200, {"got": "hi"})


async def test_a_malformed_request_line_is_a_400_and_calls_nothing() -> None:
    """What the docs promise of the engine's server: a request line or header that is not
    HTTP is answered 400 and the connection closed, before any route is looked at."""
    iii = make_app()
    calls: list[Any] = []
    iii.register_function("p", lambda req: calls.append(req) or {"status_code": 200})
    iii.register_trigger({"type": "http", "function_id": "p", "config": {"api_path": "/p"}})
    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        answers = [
            await anyio.to_thread.run_sync(raw_exchange, port, data)
            for data in (
                b"GARBAGE\r\n\r\n",
                b"GET /p HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                b"GET /p HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            )
        ]
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 400 Bad Request"] * 3
    # JSON, as every other error the server sends, and the connection closed.
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower()
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "malformed request"
    assert calls == []


async def test_an_http_version_the_server_does_not_speak_is_a_505_and_the_connection_closed() -> (
    None
):
    """h11 parses any ``HTTP/d.d`` request line; the engine's server speaks 1.0 and 1.1,
    and answers another version with a 505 and closes, calling nothing."""
    iii = make_app()
    calls: list[Any] = []
    iii.register_function("p", recording(calls))
    iii.register_trigger({"type": "http", "function_id": "p", "config": {"api_path": "/p"}})
    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        answers = [
            await anyio.to_thread.run_sync(raw_exchange, port, b"GET /p %s\r\nHost: x\r\n\r\n" % v)
            for v in (b"HTTP/9.9", b"HTTP/2.0", b"HTTP/1.0")
        ]
    for answer in answers[:2]:
        status_line, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status_line == b"HTTP/1.1 505 HTTP Version Not Supported"
        assert b"connection: close" in headers.lower()
        assert json.loads(body)["error"] == "http version not supported"
    assert answers[2].startswith(b"HTTP/1.1 200 ")
    assert len(calls) == 1


async def test_a_request_target_in_absolute_form_is_routed_by_its_path() -> None:
    """``GET http://host/p?q=1 HTTP/1.1`` (RFC 9112 §3.2.2: a server must accept it) is
    the request for ``/p``; uvicorn's h11 protocol passes the whole URL as the path."""
    iii = make_app()
    seen: list[Any] = []
    iii.register_function("p", recording(seen))
    iii.register_trigger({"type": "http", "function_id": "p", "config": {"api_path": "/p/:id"}})
    async with iii.running():
        assert iii.http_server is not None
        answer = await anyio.to_thread.run_sync(
            raw_exchange,
            iii.http_server.port,
            b"GET http://x:80/p/a%2Fb?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 200 ")
    [req] = seen
    assert (req["path"], req["path_params"], req["query_params"]) == (
        "/p/a/b",
        {"id": "a/b"},
        {"q": "1"},
    )


async def test_a_request_head_over_16_kib_is_a_431_whether_it_comes_whole_or_in_pieces() -> None:
    """h11 limits a head only while it is incomplete: one that came in one piece was
    served whatever its size. Both are a 431 now, with ``connection: close``; a head just
    under the limit is served."""
    import socket

    iii = make_app()
    calls: list[Any] = []
    iii.register_function("p", recording(calls))
    iii.register_trigger({"type": "http", "function_id": "p", "config": {"api_path": "/p"}})

    def head(value_size: int, end: bytes = b"\r\n\r\n") -> bytes:
        return b"GET /p HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * value_size + end

    def in_pieces(port: int) -> bytes:
        """A head sent a header at a time, past the limit before its end comes."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /p HTTP/1.1\r\nHost: x\r\n")
            for _ in range(5):
                sock.sendall(b"X-Part: " + b"b" * 4000 + b"\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    async with iii.running():
        assert iii.http_server is not None
        port = iii.http_server.port
        under = await anyio.to_thread.run_sync(
            raw_exchange, port, head(16_000, b"\r\nConnection: close\r\n\r\n")
        )
        whole = await anyio.to_thread.run_sync(raw_exchange, port, head(20_000))
        pieces = await anyio.to_thread.run_sync(in_pieces, port)
    assert under.startswith(b"HTTP/1.1 200 ")
    for answer in (whole, pieces):
        status_line, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert b"connection: close" in headers.lower()
        assert json.loads(body) == {"error": "request head too large", "max_head_bytes": 16384}
    assert len(calls) == 1


async def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_function_is_not_called() -> (
    None
):
    """A request whose body trickles in (or stops coming) would hold its connection and a
    task for as long as the client likes: after ``body_timeout_ms`` it is answered with a
    408 and ``connection: close``, and the function is not called. Through the ASGI app and
    through the engine's own server."""
    import socket

    iii = III(
        Config(http=HttpConfig(host="127.0.0.1", port=0, body_timeout_ms=500)),
        shutdown_grace_ms=0,
    )
    called: list[Any] = []
    iii.register_function("p", lambda req: called.append(req["body"]) or {"status_code": 200})
    route_post_p(iii)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/p",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"10")],
    }
    pieces = [{"type": "http.request", "body": b'{"a"', "more_body": True}]
    never = anyio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            return pieces.pop(0)
        await never.wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def trickled(port: int) -> bytes:
        """Send a head and part of its body, then nothing: what the server answers."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 10\r\n\r\n{"a"'
            )
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes
                answer += chunk
            return answer

    async with iii.running():
        with anyio.fail_after(10):
            await iii.asgi_app(scope, receive, send)
        assert iii.http_server is not None
        answer = await anyio.to_thread.run_sync(trickled, iii.http_server.port)
        # A body that comes in time is served as usual.
        served = await call(iii.http_server.port, "POST", "/p", {"b": 1})
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {
        "error": "request body timed out",
        "body_timeout_ms": 500,
    }
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {"error": "request body timed out", "body_timeout_ms": 500}
    assert served[0] == 200
    assert called == [{"b": 1}]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_a_json_body_with_nan_or_infinity_is_a_400(constant: str) -> None:
    """Python's ``json`` parses ``NaN`` and ``Infinity``, which JSON does not have: a
    function got a float no JSON response or file store could hold. A JSON body with
    one is malformed; a text body with one stays text."""
    from iii_embedded.testing import http_request

    iii = III(shutdown_grace_ms=0)
    iii.register_function(
        "echo", lambda req: {"status_code": 200, "body": {"got": repr(req["body"])}}
    )
    iii.register_trigger(
        {
            "type": "http",
            "function_id": "echo",
            "config": {"api_path": "/echo", "http_method": "POST"},
        }
    )
    async with iii.running():
        as_json = await http_request(
            iii,
            "POST",
            "/echo",
            body=f'{{"x": {constant}}}',
            headers={"content-type": "application/json"},
        )
        as_text = await http_request(
            iii, "POST", "/echo", body=constant, headers={"content-type": "text/plain"}
        )
        finite = await http_request(iii, "POST", "/echo", json={"x": 1.5})
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "malformed JSON body"
    assert f"{constant} is not a JSON value" in as_json.json()["detail"]
    assert (as_text.status_code, as_text.json()) == (200, {"got": repr(constant)})
    assert (finite.status_code, finite.json()) == (200, {"got": "{'x': 1.5}"})
