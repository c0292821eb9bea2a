"""Plain HTTP through the handler, and the handshakes the server refuses, over raw sockets."""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import re
from http import HTTPStatus
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

import brioche
from brioche import server, websocket
from conftest import Recorder, ServeFn, app_process, log_lines, ws_url
from rawws import poll_until

TIMEOUT = 5

HttpResult = tuple[int, dict[str, list[str]], bytes]


async def read_response(reader: asyncio.StreamReader) -> HttpResult:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, value = line.split(":", 1)
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    assert "transfer-encoding" not in headers, "these tests expect a Content-Length body"
    length = int(headers.get("content-length", ["0"])[0])
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT) if length else b""
    return int(status), headers, body


async def http(
    srv: brioche.Server[Any],
    target: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> HttpResult:
    """One request on a fresh connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request_bytes(srv, target, method, headers, body))
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def raw_head(srv: brioche.Server[Any], data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; the head of the answer, as it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    finally:
        writer.close()


def request_bytes(
    srv: brioche.Server[Any],
    target: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- response helpers ------------------------------------------------------------------------

ROUTES = {
    "/text": lambda: server.text("héllo ✓"),
    "/text-201": lambda: server.text("made", 201),
    "/html": lambda: server.html("<p>héllo</p>"),
    "/json": lambda: server.json({"a": 1, "b": [True, None], "c": "é"}),
    "/ok": server.ok,
    "/not_found": server.not_found,
    "/bad_request": server.bad_request,
    "/internal_error": server.internal_error,
}


async def route(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
    return ROUTES[request.path]()


@pytest.mark.parametrize(
    ("path", "status", "content_type", "body"),
    [
        ("/text", 200, "text/plain; charset=utf-8", "héllo ✓".encode()),
        ("/text-201", 201, "text/plain; charset=utf-8", b"made"),
        ("/html", 200, "text/html; charset=utf-8", "<p>héllo</p>".encode()),
        ("/json", 200, "application/json", '{"a":1,"b":[true,null],"c":"é"}'.encode()),
        ("/ok", 200, None, b""),
        ("/not_found", 404, "text/plain; charset=utf-8", b"Not Found"),
        ("/bad_request", 400, "text/plain; charset=utf-8", b"Bad Request"),
        ("/internal_error", 500, "text/plain; charset=utf-8", b"Internal Server Error"),
    ],
    ids=["text", "text-201", "html", "json", "ok", "not_found", "bad_request", "internal_error"],
)
async def test_response_helpers_give_exact_status_type_and_body(
    serve: ServeFn, path: str, status: int, content_type: str | None, body: bytes
) -> None:
    srv = await serve(handler=route)
    got_status, headers, got_body = await http(srv, path)
    assert got_status == status
    assert headers.get("content-type") == ([content_type] if content_type else None)
    assert headers["content-length"] == [str(len(body))]
    assert got_body == body


async def test_json_body_parses_back(serve: ServeFn) -> None:
    srv = await serve(handler=route)
    _, _, body = await http(srv, "/json")
    assert jsonlib.loads(body) == {"a": 1, "b": [True, None], "c": "é"}


async def test_custom_response_headers_are_sent(serve: ServeFn) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.text("x").with_header("x-one", "1").with_header("set-cookie", "a=1").with_header(
            "set-cookie", "b=2"
        )

    srv = await serve(handler=handler)
    status, headers, body = await http(srv, "/")
    assert (status, body) == (200, b"x")
    assert headers["x-one"] == ["1"]
    assert headers["set-cookie"] == ["a=1", "b=2"]


async def test_headers_may_be_a_mapping_and_a_lone_pair_is_a_clear_type_error(serve: ServeFn) -> None:
    """A ``dict`` of headers (as Starlette and aiohttp take) is its items, for a ``Response`` and
    for an upgrade's 101. Before, ``Response`` unpacked each key as a pair: a ``ValueError``
    ("too many values to unpack") for most names, and a two-letter name, ``{"ab": "x"}``, sent
    as the header ``a: b``."""

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.path == "/ws":
            return server.upgrade(srv, request, {"x-session": "s1"}, None, server.bad_request)
        return server.Response(200, {"ab": "x", "content-type": "text/plain"}, "hi")

    srv = await serve(websocket.init(), handler=handler)
    status, headers, body = await http(srv, "/")
    assert (status, body, headers["ab"], headers["content-type"]) == (200, b"hi", ["x"], ["text/plain"])
    assert "a" not in headers
    async with connect(ws_url(srv, "/ws")) as client:
        assert client.response is not None and client.response.headers["x-session"] == "s1"

    with pytest.raises(TypeError, match=r"^each header must be a \(name, value\) pair, got 'content-type'$"):
        server.Response(200, (("content-type", "text/plain")))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^headers must be \(name, value\) pairs or a mapping, got str$"):
        server.Response(200, "content-type: text/plain")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        # The authority form is CONNECT's, and CONNECT's only form (RFC 9112 3.2.3): the
        # handler got an empty path for the first, and took the second for a path.
        (b"GET other.example:80 HTTP/1.1\r\nHost: other.example:80\r\n\r\n", 400, b"Bad Request"),
        (b"CONNECT /x HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"Bad Request"),
        # `*` is OPTIONS's (3.2.4), and no target has a user (RFC 9110 4.2.4).
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"Bad Request"),
        (b"GET http://u:p@x/p HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"Bad Request"),
        # A coding the server does not undo (RFC 9112 6.1): the handler got the body still
        # encoded. And chunked twice, which no sender may do.
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
         501, b"Not Implemented"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
         400, b"Bad Request"),
        # A body whose last coding is not chunked has no end but the connection's (RFC 9112 6.3).
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400, b""),
        # Each form where it belongs reaches the handler, a CONNECT with its target.
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 200, b"OPTIONS *"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405, b"CONNECT example.com:443"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
         200, b"POST /a abc"),
    ],
)
async def test_request_targets_and_codings_their_method_may_not_use_are_refused(
    serve: ServeFn, raw: bytes, status: int, body: bytes
) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        answer = f"{request.method} {request.path}" + (f" {request.body.decode()}" if request.body else "")
        return server.text(answer, 405 if request.method == "CONNECT" else 200)

    srv = await serve(handler=handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(raw)
        await writer.drain()
        got_status, _, got_body = await read_response(reader)
    finally:
        writer.close()
    assert (got_status, got_body) == (status, body)


@pytest.mark.parametrize(
    ("raw", "status", "seen"),
    [(b"GET http://other.example:8080/p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n", 200,
      "/p q=1 other.example:8080"),
     (b"GET HTTPS://other.example/p HTTP/1.1\r\nHost: other.example\r\nHost-Like: y\r\n\r\n", 200,
      "/p  other.example"),
     (b"GET http://other.example/p HTTP/1.0\r\n\r\n", 200, "/p  other.example"),
     (b"GET ftp://other.example/p HTTP/1.1\r\nHost: other.example\r\n\r\n", 400, None),
     (b"GET http://other.example:x/p HTTP/1.1\r\nHost: x\r\n\r\n", 400, None)],
    ids=["absolute", "https", "1.0 without Host", "ftp", "bad port"],
)
async def test_a_target_in_the_absolute_form_gives_the_handler_its_host(
    serve: ServeFn, recorder: Recorder, raw: bytes, status: int, seen: str | None
) -> None:
    """RFC 9112 3.2.2: the host of a target in the absolute form is the request's, and the
    server MUST ignore ``Host``. The handler's ``host`` header is the target's authority: before,
    a route checking ``Host`` saw ``x`` where a proxy had routed on ``other.example``. A target of
    another scheme, or with an authority that is no host, is refused."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        hosts = request.headers.get_all("host")
        recorder.add("request", f"{request.path} {request.query} {','.join(hosts)}")
        return server.ok()

    srv = await serve(handler=handler)
    head = await raw_head(srv, raw)
    assert int(head.split(b" ", 2)[1]) == status, head  # (HTTP/1.0's answer is an HTTP/1.0 one)
    assert recorder.of("request") == ([(seen,)] if seen else [])


async def test_pending_requests_counts_the_requests_being_answered(serve: ServeFn) -> None:
    """Bun's ``pendingRequests``: a request counts from its head to its answer, a handshake while
    its handler runs, and an answered one no longer."""
    entered, release = asyncio.Event(), asyncio.Event()
    seen: list[int] = []

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        seen.append(srv.pending_requests)
        if request.path == "/slow":
            entered.set()
            await release.wait()
        return server.upgrade(srv, request, [], None, server.ok)

    srv = await serve(websocket.init(), handler=handler)
    assert srv.pending_requests == 0
    slow = asyncio.ensure_future(http(srv, "/slow"))
    await asyncio.wait_for(entered.wait(), TIMEOUT)
    assert srv.pending_requests == 1
    async with connect(ws_url(srv, "/ws")):
        assert srv.pending_requests == 1, "the 101 is answered"
    release.set()
    assert (await asyncio.wait_for(slow, TIMEOUT))[0] == 200
    assert (await http(srv, "/fast"))[0] == 200
    assert seen == [1, 2, 1]
    assert srv.pending_requests == 0


async def test_header_values_that_are_not_text_are_a_type_error() -> None:
    """An int is written in decimal; bytes or None made into text (``b'secret'``, ``None``) was
    a mistake sent to the client, so it is refused."""
    assert server.Response(200, (("x-count", 5),)).headers == (("x-count", "5"),)
    ok = server.Response(200, {"x-status": HTTPStatus.OK})
    assert ok.headers == (("x-status", "200"),), "not 'HTTPStatus.OK', as str() gives on 3.10"
    with pytest.raises(TypeError, match=r"^the value of header 'x-token' must be a str or an int, got bytes$"):
        server.Response(200, (("x-token", b"secret"),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^the value of header 'x-user' must be a str or an int, got NoneType$"):
        server.Response(200, {"x-user": None})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^the value of header 'x-flag' must be a str or an int, got bool$"):
        server.Response(200, {"x-flag": True})  # a bool is an int to a type checker
    with pytest.raises(TypeError, match=r"^a header's name must be a str, got b'x-name'$"):
        server.Response(200, ((b"x-name", "v"),))  # type: ignore[arg-type]


async def test_a_content_length_that_disagrees_with_the_body_is_a_logged_500(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """hyper writes a handler's content-length as given: "2" before a 5-byte body left "llo" at
    the head of the connection's next response. Now it is the handler's error, and the next
    response on the connection is read in step."""
    answers = {
        "/short": server.Response(200, (("content-length", "2"),), b"hello"),
        "/long": server.Response(200, (("Content-Length", "9"),), b"hello"),
        "/nan": server.Response(200, (("content-length", "abc"),), b"hello"),
        "/twice": server.Response(200, (("content-length", "5"), ("content-length", "5")), b"hello"),
        "/chunked": server.Response(200, (("transfer-encoding", "chunked"),), b"hello"),
        "/204": server.Response(204, (("content-length", "0"),)),
        "/exact": server.Response(200, (("content-length", "5"),), b"hello"),
        "/next": server.text("next"),
    }

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return answers[request.path]

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=handler)
    for path in ("/short", "/long", "/nan", "/twice", "/chunked", "/204"):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(request_bytes(srv, path) + request_bytes(srv, "/next"))
            await writer.drain()
            assert (await read_response(reader))[::2] == (500, b"Internal Server Error"), path
            assert (await read_response(reader))[::2] == (200, b"next"), path
        finally:
            writer.close()
    status, headers, body = await http(srv, "/exact")
    assert (status, headers["content-length"], body) == (200, ["5"], b"hello")
    logged = [str(r.exc_info[1]) for r in caplog.records if r.name == "brioche" and r.exc_info]
    assert logged == [
        "content-length 2 does not match the body's 5 bytes",
        "content-length 9 does not match the body's 5 bytes",
        'invalid content-length "abc"',
        "content-length set more than once",
        "a response may not set transfer-encoding: its body is sent whole, with its content-length",
        "a 204 response has no content-length",
    ]


async def test_a_head_or_304_may_give_the_length_of_the_body_it_leaves_out(serve: ServeFn) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        if request.path == "/304":
            return server.Response(304, (("content-length", "1234"),))
        if request.method == "HEAD":
            return server.Response(200, (("content-length", "1234"),))
        return server.text("x" * 1234)

    srv = await serve(handler=handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        # Neither carries a body: the next response follows the head at once.
        writer.write(request_bytes(srv, "/", "HEAD") + request_bytes(srv, "/304")
                     + request_bytes(srv, "/"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert b"\r\ncontent-length: 1234\r\n" in head, head
        # (hyper leaves a 304's content-length out: it is not the handler's error either.)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 304 Not Modified\r\n"), head
        assert (await read_response(reader))[::2] == (200, b"x" * 1234)
    finally:
        writer.close()


async def test_a_2xx_answer_to_connect_is_a_logged_500_and_an_error_is_sent_as_it_is(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """hyper sends a 2xx to CONNECT without its body and hands the socket over as a tunnel that
    nobody takes: a catch-all handler's "hi" reached a proxy client as "tunnel open", then EOF."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        if request.method == "CONNECT" and "x-refuse" in request.headers:
            return server.text("no tunnels here", 405)
        return server.text("hi")

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=handler)
    connect_head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
    status, _, body = await raw_exchange(srv, connect_head + b"\r\n")
    assert (status, body) == (500, b"Internal Server Error")
    status, _, body = await raw_exchange(srv, connect_head + b"X-Refuse: 1\r\n\r\n")
    assert (status, body) == (405, b"no tunnels here")
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == [
        "a 2xx answer to CONNECT opens a tunnel, which this server cannot serve"
    ]


@pytest.mark.parametrize("status", [204, 205, 304])
async def test_a_no_content_status_with_a_body_is_a_value_error(
    serve: ServeFn, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """As Bun's Response refuses a body with a null-body status."""
    with pytest.raises(ValueError, match=f"^a {status} response has no body$"):
        server.Response(status, body="gone")
    assert server.Response(status).body_bytes() == b""

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.text("gone", status)

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=handler)
    assert (await http(srv, "/"))[::2] == (500, b"Internal Server Error")
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == [
        f"a {status} response has no body"
    ]


# -- the request as the handler sees it ------------------------------------------------------


async def test_request_fields_method_path_query_headers_body(serve: ServeFn, recorder: Recorder) -> None:
    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add(
            "request",
            request.method,
            request.path,
            request.query,
            request.headers["X-Foo"],
            request.headers["x-foo"],
            request.headers["X-FOO"],
            "x-foo" in request.headers,
            "X-Missing" in request.headers,
            request.headers.get_all("x-multi"),
            request.body,
            request.remote_address,
            request.is_websocket,
        )
        return server.ok()

    srv = await serve(handler=handler)
    body = b"hello\x00world\xff"
    status, _, _ = await http(
        srv,
        "/some/path?a=1&b=two",
        method="POST",
        headers=[("X-Foo", "bar"), ("X-Multi", "1"), ("x-multi", "2")],
        body=body,
    )
    assert status == 200
    assert recorder.of("request") == [
        ("POST", "/some/path", "a=1&b=two", "bar", "bar", "bar", True, False, ["1", "2"], body, "127.0.0.1", False)
    ]


async def test_request_without_query_has_empty_query_and_body(serve: ServeFn, recorder: Recorder) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("request", request.method, request.path, request.query, request.body)
        return server.text(request.method)

    srv = await serve(handler=handler)
    status, _, body = await http(srv, "/plain")
    assert (status, body) == (200, b"GET")
    assert recorder.of("request") == [("GET", "/plain", "", b"")]


async def test_request_path_and_query_are_as_the_client_sent_them(serve: ServeFn, recorder: Recorder) -> None:
    # As documented on Request: percent-encoded, the query apart (websockets' path carries it).
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("request", request.path, request.query)
        return server.ok()

    srv = await serve(handler=handler)
    status, _, _ = await http(srv, "/rooms/caf%C3%A9?token=a%20b&x=%2F")
    assert status == 200
    assert recorder.of("request") == [("/rooms/caf%C3%A9", "token=a%20b&x=%2F")]


async def test_sync_handler_works(serve: ServeFn) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.text(f"sync {request.path}")

    srv = await serve(handler=handler)
    status, _, body = await http(srv, "/abc")
    assert (status, body) == (200, b"sync /abc")


async def test_keep_alive_connection_serves_several_requests(serve: ServeFn) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.text(request.path)

    srv = await serve(handler=handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        for i in range(3):
            writer.write(request_bytes(srv, f"/r{i}"))
            await writer.drain()
            status, _, body = await read_response(reader)
            assert (status, body) == (200, f"/r{i}".encode())
    finally:
        writer.close()


# -- handler failures ------------------------------------------------------------------------

Handler = Callable[[server.Request, brioche.Server[Any]], server.Response]


def styled(style: str, handler: Handler) -> Handler | Callable[..., Awaitable[server.Response]]:
    """``handler`` as a test's ``style`` says: itself ("sync"), or called from an ``async def``
    before its first await ("async_before_await") or after one ("async_after_await")."""
    if style == "sync":
        return handler

    async def async_handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        if style == "async_after_await":
            await asyncio.sleep(0)
        return handler(request, srv)

    return async_handler


@pytest.mark.parametrize("style", ["sync", "async_before_await", "async_after_await"])
async def test_handler_exception_gives_500_and_server_keeps_serving(
    serve: ServeFn, caplog: pytest.LogCaptureFixture, style: str
) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        if request.path == "/boom":
            raise RuntimeError("fetch exploded")
        return server.text("fine")

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=styled(style, handler))
    status, headers, body = await http(srv, "/boom")
    assert (status, body) == (500, b"Internal Server Error")
    assert headers["content-type"] == ["text/plain; charset=utf-8"]
    status, _, body = await http(srv, "/next")
    assert (status, body) == (200, b"fine")
    assert any(
        r.name == "brioche" and r.levelno == logging.ERROR and r.exc_info is not None
        and str(r.exc_info[1]) == "fetch exploded"
        for r in caplog.records
    ), caplog.records


@pytest.mark.parametrize("style", ["sync", "async_before_await", "async_after_await"])
async def test_a_handler_s_own_cancelled_error_gives_500_and_holds_no_stop(
    serve: ServeFn, caplog: pytest.LogCaptureFixture, style: str
) -> None:
    """A ``CancelledError`` the handler raised itself (it awaited something another task
    cancelled) is its failure: 500 and a line, as for an ``async def`` handler's. From a plain
    handler it went unanswered, and the request held ``stop()`` as long as anything kept it."""

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        if request.path == "/cancelled":
            raise asyncio.CancelledError
        return server.text("fine")

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=styled(style, handler))
    status, _, body = await http(srv, "/cancelled")
    assert (status, body) == (500, b"Internal Server Error")
    status, _, body = await http(srv, "/next")
    assert (status, body) == (200, b"fine")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "brioche"]
    # The request names its client (the port is the client's own, one of the kernel's).
    assert re.fullmatch(r"handler for <Request GET /cancelled from 127\.0\.0\.1:\d+> was cancelled: 500", line), line
    await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)


@pytest.mark.parametrize("style", ["sync", "async_before_await"])
def test_a_system_exit_from_an_http_handler_is_answered_500_and_the_app_exits(
    tmp_path: Path, style: str
) -> None:
    """``SystemExit`` or ``KeyboardInterrupt`` (Ctrl+C during a slow plain route) raised by an
    HTTP handler propagates, as a WebSocket handler's does after its 1011; first the request is
    answered 500. It went unanswered, and the server's stop waited for it for ever: the process
    outlived ``asyncio.run()``'s shutdown until it was killed."""
    app = (
        "import asyncio\n"
        "from brioche import server\n"
        f"{'async ' if style != 'sync' else ''}def fetch(request, srv):\n"
        "    if request.path == '/exit':\n"
        "        raise SystemExit(3)\n"
        "    return server.text('fine')\n"
        "config = server.handler(fetch).hostname('127.0.0.1').port(0)\n"
    )

    async def request_exit(port: int) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /exit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            status, _, body = await read_response(reader)
            return status, body
        finally:
            writer.close()

    with app_process(tmp_path, app) as (proc, port):
        assert asyncio.run(request_exit(port)) == (500, b"Internal Server Error")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert out.splitlines() == ["main finally"], (out, err)


async def test_handler_returning_none_without_upgrade_gives_500(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> None:
        return None

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=handler)
    status, _, body = await http(srv, "/nothing")
    assert (status, body) == (500, b"Internal Server Error")
    assert any(r.name == "brioche" and r.levelno == logging.ERROR for r in caplog.records)


async def test_handler_returning_non_response_gives_500(serve: ServeFn) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> Any:
        return "not a Response"

    srv = await serve(handler=handler)
    status, _, body = await http(srv, "/")
    assert (status, body) == (500, b"Internal Server Error")


# -- request body limit ----------------------------------------------------------------------


async def test_body_over_max_request_body_size_gives_413(serve: ServeFn, recorder: Recorder) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("called", request.body)
        return server.ok()

    srv = await serve(handler=handler, max_request_body_size=16)
    status, _, _ = await http(srv, "/upload", method="POST", body=b"x" * 17)
    assert status == 413
    assert recorder.of("called") == []


async def test_body_of_exactly_max_request_body_size_is_accepted(serve: ServeFn, recorder: Recorder) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("called", request.body)
        return server.ok()

    srv = await serve(handler=handler, max_request_body_size=16)
    status, _, _ = await http(srv, "/upload", method="POST", body=b"y" * 16)
    assert status == 200
    assert recorder.of("called") == [(b"y" * 16,)]


# -- invalid WebSocket handshakes ------------------------------------------------------------

KEY = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
VERSION = ("Sec-WebSocket-Version", "13")
UPGRADE = [("Upgrade", "websocket"), ("Connection", "Upgrade")]


async def ws_server(serve: ServeFn) -> brioche.Server[Any]:
    return await serve(websocket.init())


async def test_handshake_without_key_gives_400(serve: ServeFn) -> None:
    srv = await ws_server(serve)
    status, _, _ = await http(srv, "/ws", headers=[*UPGRADE, VERSION])
    assert status == 400


async def test_handshake_with_invalid_key_gives_400(serve: ServeFn) -> None:
    srv = await ws_server(serve)
    status, _, _ = await http(srv, "/ws", headers=[*UPGRADE, VERSION, ("Sec-WebSocket-Key", "short")])
    assert status == 400


async def test_handshake_without_version_gives_426_with_version_header(serve: ServeFn) -> None:
    srv = await ws_server(serve)
    status, headers, _ = await http(srv, "/ws", headers=[*UPGRADE, KEY])
    assert status == 426
    assert headers.get("sec-websocket-version") == ["13"]


async def test_handshake_with_version_8_gives_426(serve: ServeFn) -> None:
    srv = await ws_server(serve)
    status, headers, _ = await http(srv, "/ws", headers=[*UPGRADE, KEY, ("Sec-WebSocket-Version", "8")])
    assert status == 426
    assert headers.get("sec-websocket-version") == ["13"]
    # RFC 9110 15.5.22: a 426 names the protocol to upgrade to.
    assert (headers.get("upgrade"), headers.get("connection")) == (["websocket"], ["Upgrade, close"])


@pytest.mark.parametrize(
    ("headers", "name"),
    [([KEY, ("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA=="), VERSION], "Sec-WebSocket-Key"),
     ([KEY, KEY, VERSION], "Sec-WebSocket-Key"),
     ([KEY, VERSION, VERSION], "Sec-WebSocket-Version")],
    ids=["two keys", "one key twice", "version twice"],
)
async def test_handshake_with_a_key_or_version_given_twice_gives_400(
    serve: ServeFn, headers: list[tuple[str, str]], name: str
) -> None:
    """RFC 6455 11.3.1 and 11.3.5: each at most once (as websockets refuses it)."""
    srv = await ws_server(serve)
    status, _, body = await http(srv, "/ws", headers=[*UPGRADE, *headers])
    assert (status, body) == (400, f"{name} given more than once".encode())


async def test_post_with_upgrade_websocket_gives_400(serve: ServeFn) -> None:
    srv = await ws_server(serve)
    status, _, _ = await http(srv, "/ws", method="POST", headers=[*UPGRADE, KEY, VERSION])
    assert status == 400


async def test_valid_raw_handshake_gets_101_with_accept_key(serve: ServeFn) -> None:
    srv = await ws_server(serve)
    head = await raw_head(srv, request_bytes(srv, "/ws", headers=[*UPGRADE, KEY, VERSION]))
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 example
    assert headers["upgrade"].lower() == "websocket"


async def test_upgrade_of_plain_request_returns_false_and_fallback_response(
    serve: ServeFn, recorder: Recorder
) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        recorder.add("upgrade", request.is_websocket, srv.upgrade(request))
        return server.upgrade(srv, request, [("x-ignored", "1")], None, server.not_found)

    srv = await serve(websocket.init(), handler=handler)
    status, headers, body = await http(srv, "/ws")
    assert (status, body) == (404, b"Not Found")
    assert "x-ignored" not in headers
    assert recorder.of("upgrade") == [(False, False)]


async def test_upgrade_without_websocket_config_is_a_type_error(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """As Bun's ``server.upgrade`` throws without a ``websocket`` object: a forgotten config
    is the handler's error (logged, 500), not a silent fallback answer."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        try:
            srv.upgrade(request)
        except TypeError as exc:
            recorder.add("refused", str(exc))
        return server.upgrade(srv, request, [], None, server.bad_request)

    srv = await serve(None, handler=handler)  # no websocket config at all
    with caplog.at_level(logging.ERROR, logger="brioche"):
        status, _, body = await http(srv, "/ws", headers=[*UPGRADE, KEY, VERSION])
    assert (status, body) == (500, b"Internal Server Error")
    message = (
        "upgrade() needs WebSocket support: give the server a websocket config "
        "(.websocket(websocket.init()...)), as Bun.serve needs its websocket object"
    )
    assert recorder.of("refused") == [(message,)]
    assert any(r.exc_info and str(r.exc_info[1]) == message for r in caplog.records)


async def read_then_end(reader: asyncio.StreamReader) -> tuple[HttpResult, bytes]:
    """One response, then whatever else comes before the server ends the connection."""
    response = await read_response(reader)
    return response, await asyncio.wait_for(reader.read(), TIMEOUT)


def refuse_handshakes(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
    if request.path == "/refused":
        return server.Response(403, (), b"no")
    return server.upgrade(srv, request, [], None, server.not_found)


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [("/ws", [*UPGRADE, KEY, ("Sec-WebSocket-Version", "8")], 426),
     ("/ws", [*UPGRADE, VERSION], 400),
     ("/ws", [("Upgrade", "websocket"), KEY, VERSION], 400),
     ("/refused", [*UPGRADE, KEY, VERSION], 403)],
    ids=["version 8", "no key", "no Connection: Upgrade", "the handler's refusal"],
)
async def test_a_handshake_not_accepted_ends_its_connection(
    serve: ServeFn, target: str, headers: list[tuple[str, str]], status: int
) -> None:
    """A handshake answered with anything but a 101 ends its connection, as websockets' does:
    a proxy that starts a tunnel on the request, whatever the answer, would otherwise hand this
    server the client's next bytes as requests of their own ("WebSocket smuggling"). Before,
    the request pipelined behind it was served."""
    srv = await serve(websocket.init(), handler=refuse_handshakes)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request_bytes(srv, target, headers=headers) + request_bytes(srv, "/second"))
        await writer.drain()
        (got_status, got_headers, _), after = await read_then_end(reader)
    finally:
        writer.close()
    assert got_status == status
    assert got_headers["connection"] == (["Upgrade, close"] if status == 426 else ["close"])
    assert after == b""


async def fail_handshakes(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
    if request.path == "/raise":
        raise RuntimeError("the handler failed")
    srv.timeout(request, 0.2)
    await asyncio.sleep(30)  # the slow handler under test: past its timeout
    return server.text("late")


@pytest.mark.parametrize(("target", "status"), [("/raise", 500), ("/slow", 503)], ids=["raised", "timed out"])
async def test_a_handshake_whose_handler_fails_ends_its_connection(
    serve: ServeFn, caplog: pytest.LogCaptureFixture, target: str, status: int
) -> None:
    """The 500 of a handler that raised and the 503 of one past its ``srv.timeout`` are
    answers other than a 101 too, given by the server rather than the handler: they end the
    connection as well, and the request pipelined behind the handshake is not served."""
    caplog.set_level(logging.CRITICAL, logger="brioche")  # the failures' own lines, checked elsewhere
    srv = await serve(websocket.init(), handler=fail_handshakes)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request_bytes(srv, target, headers=[*UPGRADE, KEY, VERSION]) + request_bytes(srv, "/second"))
        await writer.drain()
        (got_status, got_headers, _), after = await read_then_end(reader)
    finally:
        writer.close()
    assert (got_status, got_headers["connection"], after) == (status, ["close"], b"")


@pytest.mark.parametrize(
    "extra",
    [[("Content-Length", "4")], [("Transfer-Encoding", "chunked")],
     [("Content-Length", "4"), ("Transfer-Encoding", "chunked")]],
    ids=["content-length", "chunked", "both"],
)
async def test_a_handshake_with_a_body_is_refused(
    serve: ServeFn, recorder: Recorder, extra: list[tuple[str, str]]
) -> None:
    """A GET's body means nothing (RFC 9110 9.3.1), and with both lengths given a proxy and
    this server could end it, and begin the frames, in different places (RFC 9112 6.1):
    websockets refuses such a handshake, and so does this server now. Before, it was upgraded,
    and what followed the head was taken for the body, then for frames."""
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open")

    srv = await serve(websocket.init().on_open(on_open))
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request_bytes(srv, "/ws", headers=[*UPGRADE, KEY, VERSION, *extra]) + b"0\r\n\r\n")
        await writer.drain()
        (status, headers, body), after = await read_then_end(reader)
    finally:
        writer.close()
    assert (status, headers["connection"], body, after) == (
        400, ["close"], b"a WebSocket handshake has no body", b""
    )
    async with connect(ws_url(srv, "/ws")):
        await recorder.wait_for(lambda: bool(recorder.of("open")), TIMEOUT)
    assert recorder.of("open") == [()], "only the handshake without a body opens"


async def test_a_handshake_with_content_length_0_is_upgraded(serve: ServeFn) -> None:
    srv = await serve(websocket.init())
    head = await raw_head(srv, request_bytes(srv, "/ws", headers=[*UPGRADE, KEY, VERSION, ("Content-Length", "0")]))
    assert head.startswith(b"HTTP/1.1 101 "), head


async def test_chunked_body_over_max_request_body_size_gives_413(serve: ServeFn, recorder: Recorder) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("called", request.body)
        return server.ok()

    srv = await serve(handler=handler, max_request_body_size=16)
    chunked = b"a\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n"  # 20 bytes in two chunks
    status, _, _ = await raw_exchange(
        srv, b"PUT /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status == 413
    assert recorder.of("called") == []


async def test_chunked_body_within_limit_is_reassembled(serve: ServeFn, recorder: Recorder) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("called", request.body)
        return server.ok()

    srv = await serve(handler=handler, max_request_body_size=16)
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    status, _, _ = await raw_exchange(
        srv, b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status == 200
    assert recorder.of("called") == [(b"hello world",)]


async def test_connection_after_413_never_parses_the_rejected_body_as_a_request(serve: ServeFn) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.text(request.path)

    srv = await serve(handler=handler, max_request_body_size=16)
    smuggled = request_bytes(srv, "/smuggled")
    body = smuggled + b"z" * (64 - len(smuggled))
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request_bytes(srv, "/upload", method="POST", body=body))
        await writer.drain()
        status, _, _ = await read_response(reader)
        assert status == 413
        try:
            writer.write(request_bytes(srv, "/next"))
            await writer.drain()
            status, _, reply = await read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # closing the connection after a 413 is fine
        assert (status, reply) == (200, b"/next")
    finally:
        writer.close()


async def raw_exchange(srv: brioche.Server[Any], raw: bytes) -> HttpResult:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def test_header_values_are_iso_8859_1_both_ways(serve: ServeFn, caplog: pytest.LogCaptureFixture) -> None:
    """Each byte of a request header's value is one character, as Bun and websockets read them:
    bytes that are not UTF-8 were replaced with U+FFFD and lost. A value read is sent back as the
    same bytes; a character one byte cannot carry is the handler's error."""
    seen: list[tuple[str, str]] = []

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        if request.path == "/wide":
            return server.text("x").with_header("x-wide", "✓")
        if request.path == "/newline":
            return server.text("x").with_header("x-split", "a\r\nx-injected: 1")
        seen.extend((name, request.headers[name]) for name in ("x-latin", "x-utf8"))
        return server.text("x").with_header("x-latin", request.headers["x-latin"]).with_header(
            "x-utf8", request.headers["x-utf8"]
        )

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(handler=handler)
    head = request_bytes(srv, "/echo")[:-2] + b"X-Latin: caf\xe9 \xff\r\nX-Utf8: caf\xc3\xa9\r\n\r\n"
    raw = await raw_head(srv, head)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nx-latin: caf\xe9 \xff\r\n" in raw
    assert b"\r\nx-utf8: caf\xc3\xa9\r\n" in raw
    assert seen == [("x-latin", "caf\xe9 \xff"), ("x-utf8", "caf\xc3\xa9")]
    assert seen[1][1].encode("latin-1").decode("utf-8") == "café"

    for path in ("/wide", "/newline"):
        status, headers, body = await http(srv, path)
        assert (status, body) == (500, b"Internal Server Error"), path
        assert "x-injected" not in headers
    logged = [str(r.exc_info[1]) for r in caplog.records if r.name == "brioche" and r.exc_info]
    reason = "characters above U+00FF and ASCII control characters other than tab cannot be sent"
    assert logged == [f"invalid value for header x-wide: {reason}", f"invalid value for header x-split: {reason}"]


async def test_an_http2_preface_gets_505_and_is_logged_as_such(serve: ServeFn, caplog: pytest.LogCaptureFixture) -> None:
    """An h2c client with prior knowledge opens with HTTP/2's preface. hyper ends such a
    connection without a word, and it was counted and logged as "400, malformed request",
    which the client never got; now it gets a 505 that says why, and the line says 505."""
    caplog.set_level(logging.INFO, logger="brioche.http")
    srv = await serve(websocket.init())
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        port = writer.get_extra_info("sockname")[1]
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    assert answer == (b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain; charset=utf-8\r\n"
                      b"content-length: 22\r\nconnection: close\r\n\r\nHTTP/1.1 only, no h2c\n")
    assert await poll_until(lambda: bool(log_lines(caplog, "brioche.http")), TIMEOUT)
    assert log_lines(caplog, "brioche.http") == [
        (logging.INFO, f"refused a request from 127.0.0.1:{port}: 505, an HTTP/2 connection preface: HTTP/1.1 only")
    ]
    assert srv.stats()["requests_rejected"] == 1
