"""Async handlers run as real asyncio Tasks, each connection in its own contextvars.Context.

Over real sockets: ``asyncio.current_task()`` in every handler kind; ``asyncio.timeout``, a
TaskGroup, aiohttp and httpx (anyio) as a handler's first await; one context per connection
(and per HTTP request) that sync and async handlers share in order; ``stop()`` waiting for and
cancelling handler tasks; a handler raising a BaseException that is not an Exception; and a loop
that stays fair (timers fire on time) while 500 connections flood it.

The context and task tests run on uvloop too: ``on_uvloop`` runs the same scenario in a fresh
uvloop loop with a server of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import uvloop
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

import brioche
from brioche import MessageBackpressured, server, websocket
from conftest import Recorder, ServeFn, app_process, server_starter, ws_url
from rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, RawWebSocket, encode_frame, fill, loop_turns, numbered, poll_until

TIMEOUT = 5

Scenario = Callable[[ServeFn, Recorder], Awaitable[None]]

needs_311 = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio.timeout and asyncio.TaskGroup are new in Python 3.11"
)


def on_uvloop(scenario: Scenario) -> None:
    """Run ``scenario(serve, recorder)`` in a new uvloop loop; its servers are stopped after."""

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        started: list[brioche.Server[Any]] = []
        start = server_starter(started)
        try:
            await scenario(start, Recorder())
        finally:
            for srv in started:
                await asyncio.wait_for(srv.stop(close_active_connections=True), 10)

    uvloop.run(main())


async def connect_all(srv: brioche.Server[Any], paths: list[str]) -> list[ClientConnection]:
    """Open one websockets client per path, all at once."""
    return list(await asyncio.wait_for(
        asyncio.gather(*(connect(ws_url(srv, p), open_timeout=TIMEOUT, ping_interval=None) for p in paths)),
        30,
    ))


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.wait_for(asyncio.gather(*(c.close() for c in clients)), 30)


# -- a handler's first await needs a task ---------------------------------------------------------


@contextlib.asynccontextmanager
async def local_http_app() -> AsyncIterator[str]:
    """An aiohttp.web app on 127.0.0.1 (any port); yields the URL of its ``GET /hello``."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from aiohttp")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{port}/hello"
    finally:
        await runner.cleanup()
        sock.close()


async def first_await(kind: str, url: str) -> str:
    """What ``kind`` gives when it is the first thing a handler awaits."""
    if kind == "timeout":
        if sys.version_info >= (3, 11):
            never = asyncio.Event()
            try:
                async with asyncio.timeout(0.05):
                    await never.wait()
            except TimeoutError:
                return "timed out"
            return "never set, yet not timed out"
    elif kind == "taskgroup":
        if sys.version_info >= (3, 11):
            parent = asyncio.current_task()

            async def child(name: str) -> str:
                await asyncio.sleep(0)
                return name.upper() if asyncio.current_task() is not parent else "parent"

            async with asyncio.TaskGroup() as group:
                a = group.create_task(child("a"))
                b = group.create_task(child("b"))
            return f"{a.result()} {b.result()}"
    elif kind == "wait_for":
        never = asyncio.Event()
        try:
            await asyncio.wait_for(never.wait(), 0.05)
        except asyncio.TimeoutError:
            return "timed out"
        return "never set, yet not timed out"
    elif kind == "aiohttp":
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            async with session.get(url) as response:
                return f"{response.status} {await response.text()}"
    elif kind == "httpx":
        # trust_env=False: no proxy from the environment, the request goes to 127.0.0.1.
        async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as client:
            reply = await client.get(url)
            return f"{reply.status_code} {reply.text}"
    raise AssertionError(f"unknown kind {kind}")


FIRST_AWAIT_REPLIES = {
    "timeout": "timeout: timed out",
    "taskgroup": "taskgroup: A B",
    "wait_for": "wait_for: timed out",
    "aiohttp": "aiohttp: 200 hello from aiohttp",
    "httpx": "httpx: 200 hello from aiohttp",
}
FIRST_AWAIT_KINDS = [
    pytest.param("timeout", marks=needs_311),
    pytest.param("taskgroup", marks=needs_311),
    "wait_for",
    "aiohttp",
    "httpx",
]


def first_await_scenario(kind: str) -> Scenario:
    async def scenario(serve: ServeFn, recorder: Recorder) -> None:
        async with local_http_app() as url:

            async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
                try:
                    result = await first_await(kind, url)
                except Exception as exc:  # shown to the client, so a failure says why
                    result = f"raised {exc!r}"
                ws.send(f"{text}: {result}")

            srv = await serve(websocket.init().on_text(on_text))
            async with connect(ws_url(srv), open_timeout=TIMEOUT) as client:
                for _ in range(2):  # the second message comes from a connection with a history
                    await client.send(kind)
                    assert await asyncio.wait_for(client.recv(), TIMEOUT) == FIRST_AWAIT_REPLIES[kind]

    return scenario


@pytest.mark.parametrize("kind", FIRST_AWAIT_KINDS)
async def test_first_await_of_async_on_text_runs_in_a_task(serve: ServeFn, recorder: Recorder, kind: str) -> None:
    await first_await_scenario(kind)(serve, recorder)


@pytest.mark.parametrize("kind", FIRST_AWAIT_KINDS)
def test_first_await_of_async_on_text_runs_in_a_task_on_uvloop(kind: str) -> None:
    on_uvloop(first_await_scenario(kind))


# -- current_task() in every handler kind ---------------------------------------------------------

FILL_MAX = 200  # 64 KiB messages: 12.5 MiB, under the 16 MiB backpressure limit


async def current_task_scenario(serve: ServeFn, recorder: Recorder) -> None:
    """Every async handler kind records ``asyncio.current_task()`` on its first line."""
    seen: list[tuple[str, asyncio.Task[Any] | None]] = []
    fills: list[int] = []

    def saw(kind: str) -> None:
        seen.append((kind, asyncio.current_task()))
        recorder.add(kind)

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        saw("http")
        await asyncio.sleep(0)
        if request.path == "/ws":
            return server.upgrade(srv, request, [], None, server.bad_request)
        return server.text("plain")

    async def on_open(ws: brioche.WebSocket[Any]) -> None:
        saw("open")

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        saw("text")
        # Queue 64 KiB messages for a client that is not reading until one is Backpressured:
        # the socket is congested, and on_drain fires once the client has read everything.
        records = await fill(ws, (numbered(i, 64 * 1024) for i in range(FILL_MAX)),
                             stop_when=lambda status: isinstance(status, MessageBackpressured))
        fills.append(len(records))
        recorder.add("filled", records[-1].status)

    async def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        saw("bytes")

    async def on_drain(ws: brioche.WebSocket[Any]) -> None:
        saw("drain")

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        saw("close")

    config = (websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes)
              .on_drain(on_drain).on_close(on_close))
    srv = await serve(config, handler=handler)
    test_task = asyncio.current_task()

    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(f"GET /plain HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        writer.close()

    client = await RawWebSocket.connect(srv.port, rcvbuf=4096, limit=4096)
    try:
        await recorder.wait_for(lambda: bool(recorder.of("open")), TIMEOUT)
        client.pause_reading()
        await client.send_text("fill")
        await recorder.wait_for(lambda: bool(recorder.of("filled")), 30)
        assert recorder.of("filled") == [(MessageBackpressured(),)]
        client.resume_reading()
        for i in range(fills[0]):
            frame = await client.recv_data_frame(TIMEOUT)
            assert frame.payload == numbered(i, 64 * 1024), f"message {i}"
        await recorder.wait_for(lambda: bool(recorder.of("drain")), TIMEOUT)
        await client.send_bytes(b"\x01\x02")
        await recorder.wait_for(lambda: bool(recorder.of("bytes")), TIMEOUT)
        await client.send_close(1000)
        assert (await client.expect_close_then_eof()).close_code == 1000
    finally:
        await client.aclose()
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)

    kinds = sorted({kind for kind, _ in seen})
    assert kinds == ["bytes", "close", "drain", "http", "open", "text"]
    assert [kind for kind, task in seen if task is None] == [], "handlers that ran outside a task"
    tasks = [task for _, task in seen]
    assert len({id(task) for task in tasks}) == len(tasks), f"a task ran two handler calls: {seen}"
    assert test_task not in tasks


async def test_current_task_is_a_new_task_in_every_async_handler(serve: ServeFn, recorder: Recorder) -> None:
    await current_task_scenario(serve, recorder)


def test_current_task_is_a_new_task_in_every_async_handler_on_uvloop() -> None:
    on_uvloop(current_task_scenario)


async def test_plain_handlers_stay_direct_calls(serve: ServeFn, recorder: Recorder) -> None:
    """A guard, not a new behaviour: ``def`` handlers run outside any task (no task is made)."""

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        recorder.add("task", "http", asyncio.current_task())
        return server.upgrade(srv, request, [], None, server.bad_request)

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("task", "open", asyncio.current_task())

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("task", "text", asyncio.current_task())
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("task", "close", asyncio.current_task())

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close), handler=handler)
    async with connect(ws_url(srv), open_timeout=TIMEOUT) as client:
        await client.send("x")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "x"
    await recorder.wait_for(lambda: len(recorder.of("task")) == 4, TIMEOUT)
    assert recorder.of("task") == [("http", None), ("open", None), ("text", None), ("close", None)]


# -- one context per connection, one per request --------------------------------------------------

CONN_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("brioche_test_conn")
REQUEST_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("brioche_test_request")
COUNT_VAR: contextvars.ContextVar[int] = contextvars.ContextVar("brioche_test_count")

CONNECTIONS = 200
ROUNDS = 3

# Which handlers are `async def` (the rest are plain functions): http, on_open, on_text, on_close.
CONTEXT_VARIANTS = {
    "all-sync": (False, False, False, False),
    "all-async": (True, True, True, True),
    "async-open-sync-text": (False, True, False, True),
    "sync-open-async-text": (True, False, True, False),
}


def context_scenario(variant: str) -> Scenario:
    http_async, open_async, text_async, close_async = CONTEXT_VARIANTS[variant]

    async def scenario(serve: ServeFn, recorder: Recorder) -> None:
        def http_body(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
            recorder.add("request saw", REQUEST_VAR.get(None))
            REQUEST_VAR.set(request.query)
            return server.upgrade(srv, request, [], request.query, server.bad_request)

        def open_body(ws: brioche.WebSocket[Any]) -> None:
            recorder.add("open", ws.data, REQUEST_VAR.get("unset"))
            CONN_VAR.set(ws.data)
            COUNT_VAR.set(0)

        def text_body(ws: brioche.WebSocket[Any], text: str) -> None:
            n = COUNT_VAR.get(-100) + 1
            COUNT_VAR.set(n)
            ws.send(f"{ws.data} {CONN_VAR.get('unset')} {REQUEST_VAR.get('unset')} {n} {text}")

        def close_body(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
            recorder.add("close", ws.data, CONN_VAR.get("unset"), REQUEST_VAR.get("unset"), COUNT_VAR.get(-1))

        # The async ones suspend first: what they set after that must still reach later handlers.
        async def http_async_fn(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
            await asyncio.sleep(0)
            return http_body(request, srv)

        async def open_async_fn(ws: brioche.WebSocket[Any]) -> None:
            await asyncio.sleep(0)
            open_body(ws)

        async def text_async_fn(ws: brioche.WebSocket[Any], text: str) -> None:
            await asyncio.sleep(0)
            text_body(ws, text)

        async def close_async_fn(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
            await asyncio.sleep(0)
            close_body(ws, code, reason)

        config = (
            websocket.init()
            .on_open(open_async_fn if open_async else open_body)
            .on_text(text_async_fn if text_async else text_body)
            .on_close(close_async_fn if close_async else close_body)
        )
        srv = await serve(config, handler=http_async_fn if http_async else http_body)
        ids = [f"c{i}" for i in range(CONNECTIONS)]
        clients = await connect_all(srv, [f"/ws?{cid}" for cid in ids])
        try:
            await recorder.wait_for(lambda: len(recorder.of("open")) == CONNECTIONS, 30)

            async def talk(cid: str, client: ClientConnection) -> list[tuple[str, str, str]]:
                wrong = []
                for r in range(ROUNDS):
                    await client.send(f"m{r}")
                    reply = await asyncio.wait_for(client.recv(), TIMEOUT)
                    want = f"{cid} {cid} {cid} {r + 1} m{r}"
                    if reply != want:
                        wrong.append((cid, str(reply), want))
                return wrong

            results = await asyncio.wait_for(asyncio.gather(*(talk(c, cl) for c, cl in zip(ids, clients))), 60)
        finally:
            await close_all(clients)
        wrong = [w for ws in results for w in ws]
        assert not wrong, f"{len(wrong)} of {CONNECTIONS * ROUNDS} replies wrong, e.g. (id, got, want): {wrong[:5]}"
        assert sorted(recorder.of("open")) == sorted((cid, cid) for cid in ids)
        assert recorder.of("request saw") == [(None,)] * CONNECTIONS
        await recorder.wait_for(lambda: len(recorder.of("close")) == CONNECTIONS, 30)
        assert sorted(recorder.of("close")) == sorted((cid, cid, cid, ROUNDS) for cid in ids)

    return scenario


@pytest.mark.parametrize("variant", list(CONTEXT_VARIANTS))
async def test_each_connection_has_its_own_context(serve: ServeFn, recorder: Recorder, variant: str) -> None:
    await context_scenario(variant)(serve, recorder)


@pytest.mark.parametrize("variant", list(CONTEXT_VARIANTS))
def test_each_connection_has_its_own_context_on_uvloop(variant: str) -> None:
    on_uvloop(context_scenario(variant))


def request_context_scenario(handler_async: bool) -> Scenario:
    async def scenario(serve: ServeFn, recorder: Recorder) -> None:
        def body(request: server.Request) -> server.Response:
            seen = REQUEST_VAR.get("nothing")
            REQUEST_VAR.set(request.path)
            return server.text(f"{request.path} saw {seen}")

        def sync_handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
            return body(request)

        async def async_handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
            response = body(request)  # sets the variable before the first await
            await asyncio.sleep(0)
            return response

        srv = await serve(None, handler=async_handler if handler_async else sync_handler)
        async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as client:
            for i in range(3):
                reply = await client.get(f"http://127.0.0.1:{srv.port}/r{i}")
                assert (reply.status_code, reply.text) == (200, f"/r{i} saw nothing")

    return scenario


@pytest.mark.parametrize("handler_async", [False, True], ids=["sync", "async"])
async def test_each_request_handler_runs_in_its_own_context(
    serve: ServeFn, recorder: Recorder, handler_async: bool
) -> None:
    await request_context_scenario(handler_async)(serve, recorder)


@pytest.mark.parametrize("handler_async", [False, True], ids=["sync", "async"])
def test_each_request_handler_runs_in_its_own_context_on_uvloop(handler_async: bool) -> None:
    on_uvloop(request_context_scenario(handler_async))


# -- stopping ends every handler task -------------------------------------------------------------


async def test_stop_closing_connections_cancels_suspended_handlers_then_runs_on_close(
    serve: ServeFn, recorder: Recorder
) -> None:
    never = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("waiting", ws.data)
        try:
            await never.wait()
        except asyncio.CancelledError:
            recorder.add("cancelled", ws.data)
            raise
        recorder.add("woke", ws.data)

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)
        await asyncio.sleep(0)  # stop() waits for this task too
        recorder.add("close done", ws.data)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    ids = [f"c{i}" for i in range(5)]
    clients = await connect_all(srv, [f"/ws?{cid}" for cid in ids])
    try:
        for client in clients:
            await client.send("wait for ever")
        await recorder.wait_for(lambda: len(recorder.of("waiting")) == len(ids), TIMEOUT)
        await asyncio.wait_for(srv.stop(close_active_connections=True), 10)
        # stop() has returned: every handler task has finished, on_close included.
        events = list(recorder.events)
        for client in clients:
            await asyncio.wait_for(client.wait_closed(), TIMEOUT)
            assert client.close_code == 1001
    finally:
        await close_all(clients)
    assert sorted(e[1] for e in events if e[0] == "cancelled") == ids, events
    assert [e for e in events if e[0] == "woke"] == []
    assert sorted(e[1:] for e in events if e[0] == "close") == [(cid, 1001) for cid in ids], (
        f"on_close did not start (once per connection) before stop() returned: {events}"
    )
    assert sorted(e[1] for e in events if e[0] == "close done") == ids, (
        f"on_close did not finish before stop() returned: {events}"
    )
    for cid in ids:
        mine = [e[0] for e in events if e[1] == cid]
        assert mine == ["waiting", "cancelled", "close", "close done"], (cid, mine)


async def test_stop_closing_connections_runs_the_handler_of_a_message_parked_behind_a_cancelled_one(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A message parked behind a suspended handler when stop(True) closes its connection was
    accepted: its handler runs (it may be cancelled at its first await, not before its first
    line). On 3.10 and 3.11, which start no task eagerly, its task was cancelled before its first
    step: the handler ran no line, and 3.10 warned that the coroutine was never awaited."""

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("start", text)
        if text == "stubborn":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                recorder.add("cancelled", text)
                raise
        recorder.add("end", text)

    srv = await serve(websocket.init().on_text(on_text))
    client = await RawWebSocket.connect(srv.port)
    try:
        # One write: one run, whose second message parks behind the first's task.
        await client.send_raw(encode_frame(OP_TEXT, b"stubborn") + encode_frame(OP_TEXT, b"queued-after"))
        await recorder.wait_for(lambda: bool(recorder.of("start")), TIMEOUT)
        await asyncio.wait_for(srv.stop(close_active_connections=True), 10)
    finally:
        await client.aclose()
    assert recorder.events == [
        ("start", "stubborn"), ("cancelled", "stubborn"), ("start", "queued-after"), ("end", "queued-after")
    ]


@pytest.mark.parametrize("turns", range(5))
async def test_stop_closing_connections_cancels_no_handler_before_its_first_line(
    serve: ServeFn, recorder: Recorder, turns: int
) -> None:
    """A client goes away while the handler of its first message is suspended, with two more
    messages behind it; the handler ends, the second message's task is made, and stop(True)
    comes ``turns`` loop turns later. The messages are handled in order, none skipped: a
    handler's task is cancelled at its first await, never before its first line. On 3.10 and
    3.11, which start no task eagerly, stop(True) cancelled the second message's new task
    before its first step: its handler ran no line, while the third message's ran."""
    release = asyncio.Event()

    async def handle(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("start", text)
        if text == "a":
            await release.wait()
        await asyncio.sleep(0)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> Awaitable[None] | None:
        if text == "c":
            recorder.add("start", text)  # a plain handler's message, after two async ones
            return None
        return handle(ws, text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    await client.send_raw(b"".join(encode_frame(OP_TEXT, text) for text in (b"a", b"b", b"c")))
    await recorder.wait_for(lambda: bool(recorder.of("start")), TIMEOUT)
    assert await poll_until(lambda: srv.stats()["messages_in"] == 3, TIMEOUT)
    await client.aclose()
    assert await poll_until(lambda: srv.pending_websockets == 0, TIMEOUT)
    release.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
    assert recorder.events == [("start", "a"), ("start", "b"), ("start", "c"), ("close", 1006)]


async def test_an_async_on_close_that_starts_after_run_s_grace_period_runs_its_first_line(
    serve: ServeFn, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``run()``'s grace period every handler task is cancelled, on_close's included, so
    that nothing holds the stop up; one that starts then is cancelled at its first await, as
    the others were, not before its first line. On 3.10 and 3.11 it was cancelled before its
    first step: the connection's clean-up ran no line."""
    monkeypatch.setattr(brioche._server, "STOP_GRACE_SECONDS", 0.2)

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        try:
            await asyncio.Event().wait()  # holds the stop past the grace period
        except asyncio.CancelledError:
            recorder.add("on_text cancelled")
            raise

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("on_close", code)
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            recorder.add("on_close cancelled")
            raise

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("hold")
        assert await poll_until(lambda: srv.stats()["messages_in"] == 1, TIMEOUT)
        stopping = asyncio.ensure_future(srv._stop_gracefully())
        assert (await client.recv_frame(TIMEOUT)).close_code == 1001
        await recorder.wait_for(lambda: bool(recorder.of("on_text cancelled")), TIMEOUT)
        await client.send_close(1001)  # answered only once the grace period has passed
        await asyncio.wait_for(stopping, TIMEOUT)
    assert recorder.events == [("on_text cancelled",), ("on_close", 1001), ("on_close cancelled",)]


@pytest.mark.parametrize("shape", ["plain", "async", "returns a coroutine"])
async def test_a_handler_that_raises_cancelled_error_before_it_suspends_is_reported_as_cancelled_and_its_connection_goes_on(
    serve: ServeFn, caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    """A handler that raises ``CancelledError`` before it suspends (the result of a cancelled
    future) is reported as a handler cancelled later is: one WARNING on ``brioche``, no
    handler error, the connection open. A plain one closed the connection with 1011, and the
    error surfaced as the loop's unhandled exception, with nothing logged on ``brioche``; on
    3.12+ an async one, cancelled within its eager first step, went unsaid (on 3.10 and 3.11
    that step runs later, in the task, and was said)."""

    def cancelled() -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        future.result()

    def on_text_plain(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "cancel":
            cancelled()
        ws.send(text)

    async def on_text_async(ws: brioche.WebSocket[Any], text: str) -> None:
        on_text_plain(ws, text)

    def on_text_coroutine(ws: brioche.WebSocket[Any], text: str) -> Coroutine[Any, Any, None]:
        return on_text_async(ws, text)

    handlers: dict[str, Callable[..., Any]] = {
        "plain": on_text_plain, "async": on_text_async, "returns a coroutine": on_text_coroutine
    }
    srv = await serve(websocket.init().on_text(handlers[shape]))
    with caplog.at_level(logging.WARNING):
        async with connect(ws_url(srv)) as client:
            await client.send("cancel")
            await client.send("after")
            assert await asyncio.wait_for(client.recv(), TIMEOUT) == "after"
    assert srv.stats()["handler_errors"] == 0
    [record] = caplog.records
    assert (record.name, record.levelname) == ("brioche", "WARNING")
    assert re.fullmatch(
        r"on_text handler for <brioche\.WebSocket #\d+ from 127\.0\.0\.1:\d+ state=1> was cancelled",
        record.getMessage(),
    )


# -- a connection the application closes: no handler gets its messages after ---------------------


@pytest.mark.parametrize("how", ["close", "terminate", "raise"])
@pytest.mark.parametrize("shape", ["plain", "async"])
async def test_a_client_rejected_in_on_open_has_none_of_its_messages_handled(
    serve: ServeFn, recorder: Recorder, how: str, shape: str
) -> None:
    """``on_open`` rejects the client (closes it, terminates it, or raises: 1011), which sent a
    message at once. As uWS emits no message once a socket is closing (Bun's ``close()`` in
    ``open``), and as a ``websockets`` handler that returned or raised reads no more, no
    handler sees it, whether it was parked behind an ``async`` on_open or read after it;
    ``on_close`` runs, once. Before, ``on_text`` got it, with ``ready_state`` CLOSING (CLOSED
    after ``terminate()``)."""

    def reject(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open")
        if how == "close":
            ws.close(1008, "not allowed")
        elif how == "terminate":
            ws.terminate()
        else:
            raise PermissionError("not allowed")

    async def on_open_async(ws: brioche.WebSocket[Any]) -> None:
        # Until the message is read: it waits behind this handler (else 1011, not the close
        # the test expects).
        assert await poll_until(lambda: srv.stats()["messages_in"] == 1, TIMEOUT)
        reject(ws)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text, ws.ready_state)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    on_open = reject if shape == "plain" else on_open_async
    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        await client.send_text("delete-everything")
        code = {"close": 1008, "terminate": 1006, "raise": 1011}[how]
        if how != "terminate":
            frame = await client.recv_data_frame(TIMEOUT)
            assert (frame.opcode, frame.close_code) == (OP_CLOSE, code), frame
            await client.send_close(code)
        frames, _ = await client.frames_until_end(TIMEOUT)
        assert frames == []
    finally:
        await client.aclose()
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.events == [("open",), ("close", code)]


async def test_a_socket_closed_from_another_thread_has_none_of_its_later_messages_handled(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A thread of the application closes the socket. What the client sends after that close
    frame reached it (a text, a ping, then its answering close) is read, for the close, but no
    handler sees it, as none does once the loop thread closes a socket. Before, only a close on
    the loop thread was kept to: from another thread, ``on_text`` got the message, CLOSING."""
    closer: list[threading.Thread] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open")
        closer.append(threading.Thread(target=ws.close, args=(4001, "from a thread")))
        closer[0].start()

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text, ws.ready_state)

    def on_ping(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("ping", data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_ping(on_ping).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        frame = await client.recv_data_frame(TIMEOUT)
        assert (frame.opcode, frame.close_code) == (OP_CLOSE, 4001), frame
        await client.send_raw(encode_frame(OP_TEXT, b"after the close") + encode_frame(OP_PING, b"p"))
        await client.send_close(4001)
        frames, _ = await client.frames_until_end(TIMEOUT)
        assert frames == []
    finally:
        await client.aclose()
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    closer[0].join(TIMEOUT)
    assert recorder.events == [("open",), ("close", 4001, "")]
    # Read all the same: the engine counts what it parsed.
    assert srv.stats()["messages_in"] == 1


def test_a_system_exit_from_an_async_handler_leaves_asyncio_run_s_shutdown_to_finish(tmp_path: Path) -> None:
    """A ``SystemExit`` (or ``KeyboardInterrupt``) raised by an ``async def`` handler after an
    await leaves the loop once, from the task's step, as from any task: ``asyncio.run()`` then
    cancels the app's main task, whose ``async with serve()`` closes every connection, and every
    ``on_close`` runs. Before, the dispatcher raised it a second time from the task's done
    callback, inside that shutdown, which it cut short: no ``on_close``, no ``finally``, and
    "coroutine ignored GeneratorExit"."""
    app = (
        "import asyncio, sys\n"
        "from brioche import server, websocket\n"
        "async def on_text(ws, text):\n"
        "    await asyncio.sleep(0)\n"
        "    if text == 'exit':\n"
        "        raise SystemExit(3)\n"
        "    await asyncio.sleep(60)\n"
        "def on_close(ws, code, reason):\n"
        "    print('on_close', code, flush=True)\n"
        "def fetch(request, srv):\n"
        "    srv.upgrade(request)\n"
        "config = (server.handler(fetch).hostname('127.0.0.1').port(0)\n"
        "          .websocket(websocket.init().on_text(on_text).on_close(on_close)))\n"
    )

    async def drive(port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}/", close_timeout=2) as waiting:
            async with connect(f"ws://127.0.0.1:{port}/", close_timeout=2) as exiting:
                await waiting.send("wait")
                await exiting.send("exit")
                await asyncio.wait_for(exiting.wait_closed(), TIMEOUT)
            await asyncio.wait_for(waiting.wait_closed(), TIMEOUT)

    with app_process(tmp_path, app) as (proc, port):
        asyncio.run(drive(port))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "GeneratorExit" not in err
    assert sorted(out.splitlines()) == ["main finally", "on_close 1001", "on_close 1011"], (out, err)


async def test_stop_closing_connections_runs_each_async_on_close_to_the_end(
    serve: ServeFn, recorder: Recorder
) -> None:
    """No handler is suspended when stop() closes the connections: on_close is the only task."""

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    cleanup = asyncio.Event()

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)
        await cleanup.wait()  # some asynchronous clean-up; stop() waits for it
        recorder.add("close done", ws.data)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    ids = [f"c{i}" for i in range(3)]
    clients = await connect_all(srv, [f"/ws?{cid}" for cid in ids])
    try:
        for client in clients:
            await client.send("hi")
            assert await asyncio.wait_for(client.recv(), TIMEOUT) == "hi"
        stopping = asyncio.create_task(srv.stop(close_active_connections=True))
        await recorder.wait_for(lambda: len(recorder.of("close")) == len(ids), TIMEOUT)
        # A stop() that does not wait for on_close returns a loop turn or two after the engine
        # has stopped (every connection ended): give it ten.
        assert await poll_until(lambda: srv._engine_stopped, TIMEOUT), srv.stats()
        await loop_turns(10)
        assert not stopping.done(), f"stop() returned while on_close was suspended: {recorder.events}"
        cleanup.set()
        await asyncio.wait_for(stopping, 10)
        events = list(recorder.events)
    finally:
        await close_all(clients)
    assert sorted(e[1:] for e in events if e[0] == "close") == [(cid, 1001) for cid in ids], (
        f"on_close did not start (once per connection) before stop() returned: {events}"
    )
    assert sorted(e[1] for e in events if e[0] == "close done") == ids, (
        f"on_close did not finish before stop() returned: {events}"
    )


async def test_messages_parked_behind_a_suspended_handler_stay_in_flight(serve: ServeFn) -> None:
    """While an ``async def`` handler awaits, the messages behind it wait in Python: they stay on
    the connection's 1 MiB cap, which stops its reading, and on ``incoming_bytes`` (the budget)
    until their handler runs. Before, they left both when the loop took them: one client could
    park 64 messages of ``max_payload_length`` (1 GiB by default) behind one await."""
    size, count = 256 * 1024, 40
    started, release = asyncio.Event(), asyncio.Event()
    got: list[int] = []

    async def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        got.append(data[0])
        if len(got) == 1:
            started.set()
            await release.wait()

    srv = await serve(websocket.init().on_bytes(on_bytes))
    async with connect(ws_url(srv), max_size=None) as client:
        sending = asyncio.ensure_future(asyncio.gather(*(client.send(bytes([i]) * size) for i in range(count))))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        # Held until the handler returns: at least the 1 MiB cap's worth, parked or in flight.
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] >= 1024 * 1024, TIMEOUT), srv.stats()
        # Reading stopped at the cap: a few messages, not the 40 sent (64 could park before).
        # At most the one running, the cap's worth (4), and the cap's worth again: the loop
        # takes a batch off the cap as it drains it and puts each back as it parks it, and the
        # connection may read meanwhile (9 seen once, on the portable path's timing).
        assert srv.stats()["messages_in"] <= 1 + 2 * 4 + 1, srv.stats()
        release.set()
        await asyncio.wait_for(sending, TIMEOUT)
        assert await poll_until(lambda: len(got) == count, TIMEOUT), len(got)
        assert got == list(range(count))
        # Everything parked was taken off again as its handler ran.
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] == 0, TIMEOUT), srv.stats()


def a_shared_str_without_its_utf8() -> str:
    """A one-character str CPython shares across the process (Latin-1) whose UTF-8 form no
    one has asked for yet: asking (a ``send`` of it does) makes it larger. CPython 3.12 and
    later make these with their UTF-8 form: their size cannot change, and the test is moot."""
    for code in range(0xFF, 0x7F, -1):
        char = chr(code)
        if sys.getsizeof(char) == sys.getsizeof(char * 2) - 1:
            return char
    if sys.version_info >= (3, 12):
        pytest.skip("CPython 3.12+ makes its shared one-character strs with their UTF-8 form")
    raise AssertionError("every Latin-1 character has its UTF-8 form cached")


async def test_a_parked_message_is_taken_off_the_budget_by_what_it_held(serve: ServeFn) -> None:
    """A parked message holds its size on ``incoming_bytes`` until its handler runs. Before,
    the size was measured again then: a shared one-character str whose UTF-8 form a ``send``
    had cached meanwhile came out 3 bytes larger, the budget wrapped below 0, and the server
    stopped reading the connection and answered every request body 503."""
    char = a_shared_str_without_its_utf8()
    entered, release = asyncio.Event(), asyncio.Event()
    got: list[str] = []

    async def first(ws: brioche.WebSocket[Any]) -> None:
        entered.set()
        await release.wait()
        ws.send(char)  # caches its UTF-8 form: the str grows

    def on_text(ws: brioche.WebSocket[Any], text: str) -> Awaitable[None] | None:
        if text == "first":
            return first(ws)
        got.append(text)
        return None

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("first")
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        await client.send(char)
        # Parked: it holds its str's size (queued, it held its 2 bytes of UTF-8).
        parked = sys.getsizeof(char)
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] == parked, TIMEOUT), srv.stats()
        release.set()
        assert await client.recv() == char
        assert await poll_until(lambda: got == [char], TIMEOUT), got
        assert srv.stats()["incoming_bytes"] == 0
        await client.send("still read")
        assert await poll_until(lambda: got == [char, "still read"], TIMEOUT), got


async def test_a_release_of_more_than_is_held_does_not_stop_the_connection_reading(serve: ServeFn) -> None:
    """The dispatcher's holds on a connection (a suspended handler, parked messages) are
    released through ``_release_handler``/``_release_parked``, whose pairing the engine cannot
    check. One release too many (the dispatcher's bug, called here by hand) wrapped the in-flight
    count to its maximum: the connection never read again, neither its messages nor the client's
    close frame. Now the count stops at 0, and the connection goes on."""
    got: list[str] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws._release_handler()
        ws._release_parked(3)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        got.append(text)
        ws.send(text)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text))
    async with connect(ws_url(srv)) as client:
        for i in range(3):
            await client.send(f"m{i}")
        assert [await asyncio.wait_for(client.recv(), TIMEOUT) for _ in range(3)] == ["m0", "m1", "m2"]
        await asyncio.wait_for(client.close(), TIMEOUT)
        assert client.close_code == 1000
    assert got == ["m0", "m1", "m2"]
    assert srv.stats()["incoming_bytes"] == 0


async def test_stop_waits_for_a_suspended_handler_task(serve: ServeFn, recorder: Recorder) -> None:
    release = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("waiting")
        await release.wait()
        recorder.add("released")

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)
        await asyncio.sleep(0)
        recorder.add("close done")

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    client = await connect(ws_url(srv), open_timeout=TIMEOUT)
    try:
        await client.send("wait")
        await recorder.wait_for(lambda: bool(recorder.of("waiting")), TIMEOUT)
        stopping = asyncio.create_task(srv.stop())
        # The connection ends while its handler is still suspended.
        await client.close(4000, "leaving")
    finally:
        await client.close()
    # On the old dispatch stop() returns a loop turn or two after the engine has stopped (no
    # open connection left); a handler task still suspended must hold it back: give it ten.
    assert await poll_until(lambda: srv._engine_stopped, TIMEOUT), srv.stats()
    await loop_turns(10)
    assert not stopping.done(), f"stop() returned while a handler task was suspended; events: {recorder.events}"
    assert recorder.of("close") == [], "on_close ran before the suspended handler finished"
    release.set()
    await asyncio.wait_for(stopping, TIMEOUT)
    recorder.add("stopped")
    assert [e[0] for e in recorder.events] == ["waiting", "released", "close", "close done", "stopped"]
    assert recorder.of("close") == [(4000,)]


async def test_a_handler_cancelled_by_the_app_is_logged_and_its_connection_goes_on(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``async`` handler awaiting something the app cancels (a pool shut down under it) ends
    cancelled: a WARNING on ``brioche`` names the handler and its socket, as the HTTP handler's
    cancel is logged, and the connection stays open (the cancel may be the app's intent): its
    next message is handled. Before, nothing at all was said, at any level."""
    caplog.set_level(logging.DEBUG, logger="brioche")
    pending: list[asyncio.Future[None]] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "wait":
            pending.append(asyncio.get_running_loop().create_future())
            recorder.add("waiting")
            await pending[0]
        ws.send(f"handled {text}")

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv), open_timeout=TIMEOUT) as client:
        await client.send("wait")
        await recorder.wait_for(lambda: bool(recorder.of("waiting")), TIMEOUT)
        pending[0].cancel()
        await client.send("next")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "handled next"
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "brioche"]
    assert [(level, message.split(" for ")[0]) for level, message in lines] == [
        ("WARNING", "on_text handler")
    ], lines
    assert lines[0][1].endswith(" was cancelled")


# -- a BaseException that is not an Exception -------------------------------------------------------


class Boom(BaseException):
    """Neither an Exception nor KeyboardInterrupt/SystemExit (which would stop the test's loop)."""


@pytest.mark.parametrize("when", ["before_await", "after_await"])
async def test_base_exception_in_async_on_text_closes_with_1011_and_nothing_is_left_parked(
    serve: ServeFn, recorder: Recorder, when: str
) -> None:
    """The connection closes with 1011, the message after it is not handled (as after any
    handler's exception: no message reaches a handler once the server closes the socket), and
    on_close runs: nothing is left waiting behind the handler."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    # The loop's exception handler may hear of Boom; that is allowed, so it is only recorded.
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text)
        if text == "boom":
            if when == "after_await":
                await asyncio.sleep(0)
            raise Boom("boom")
        await asyncio.sleep(0)
        ws.send(f"echo {text}")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    try:
        srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
        client = await RawWebSocket.connect(srv.port)
        try:
            # One write: "after" reaches the server with "boom", in the same batch.
            await client.send_raw(encode_frame(OP_TEXT, b"boom") + encode_frame(OP_TEXT, b"after"))
            try:
                frame = await client.recv_data_frame(TIMEOUT)
            except asyncio.TimeoutError:
                raise AssertionError(f"no reply to the message after Boom and no close in {TIMEOUT} s: "
                                     f"it is stuck (handlers ran for {recorder.of('text')})") from None
            if frame.opcode == OP_CLOSE:
                outcome = "closed"
                assert frame.close_code == 1011, frame
                await client.send_close(1011)
                await client.frames_until_end(TIMEOUT)
            else:
                assert (frame.opcode, frame.payload) == (OP_TEXT, b"echo after")
                await client.send_text("again")
                frame = await client.recv_data_frame(TIMEOUT)
                if frame.opcode == OP_CLOSE:
                    outcome = "handled, then closed"
                    assert frame.close_code == 1011, frame
                    await client.send_close(1011)
                    await client.frames_until_end(TIMEOUT)
                else:
                    outcome = "handled, still open"
                    assert (frame.opcode, frame.payload) == (OP_TEXT, b"echo again")
                    await client.send_close(1000)
                    assert (await client.expect_close_then_eof()).close_code == 1000
        finally:
            await client.aclose()
        await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
        await asyncio.wait_for(srv.stop(), TIMEOUT)
    finally:
        loop.set_exception_handler(previous)
    print(f"Boom {when}: {outcome}; texts {recorder.of('text')}; on_close {recorder.of('close')}; "
          f"loop exception handler saw {[repr(c.get('exception')) for c in reported]}")
    assert outcome == "closed"
    assert recorder.of("close") == [(1011,)]
    assert recorder.of("text") == [("boom",)]
    # A task keeps such an exception (asyncio re-raises only KeyboardInterrupt and SystemExit
    # from its step): raised again for the loop's exception handler, it is not lost.
    assert [type(c.get("exception")) for c in reported] == [Boom]


# -- a connection's messages of one read: handled back to back in its context ------------------------


async def _close_1011_then_end(client: RawWebSocket) -> None:
    frame = await client.recv_data_frame(TIMEOUT)
    assert (frame.opcode, frame.close_code) == (OP_CLOSE, 1011), frame
    await client.send_close(1011)
    await client.frames_until_end(TIMEOUT)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
async def test_plain_handlers_of_one_read_run_once_in_order_in_the_context_up_to_an_exception(
    serve: ServeFn, recorder: Recorder, opcode: int
) -> None:
    texts = ["a", "b", "bad", "c", "d"]

    def on_message(ws: brioche.WebSocket[Any], message: str | bytes) -> None:
        text = message if isinstance(message, str) else message.decode()
        assert isinstance(message, str) == (opcode == OP_TEXT)
        count = COUNT_VAR.get(0) + 1
        COUNT_VAR.set(count)
        recorder.add("text", text, count)
        if text == "bad":
            raise ValueError("bad message")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, COUNT_VAR.get(0))

    srv = await serve(websocket.init().on_text(on_message).on_bytes(on_message).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        # One write: the messages reach the loop back to back, in one batch (one run, which
        # the engine hands over as one event: the handler is still called once per message).
        await client.send_raw(b"".join(encode_frame(opcode, t.encode()) for t in texts))
        await _close_1011_then_end(client)
    finally:
        await client.aclose()
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    # Each handler once, in order, in (and adding to) the connection's context, up to the one
    # that raised: its exception closes the connection with 1011, and, as uWS emits no message
    # once closing, the messages after it in the same read reach no handler. on_close is last.
    handled = texts[: texts.index("bad") + 1]
    assert recorder.of("text") == [(t, n) for n, t in enumerate(handled, 1)]
    assert recorder.of("close") == [(1011, len(handled))]


class AsyncHandlers:
    """Async handlers as bound methods: on 3.12+ they take the same eager path as functions."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def on_message(self, ws: brioche.WebSocket[Any], message: str | bytes) -> None:
        text = message if isinstance(message, str) else message.decode()
        count = COUNT_VAR.get(0) + 1
        COUNT_VAR.set(count)
        self.recorder.add("text", text, count)
        if text == "bad":
            raise ValueError("bad message")
        if text == "wait":
            await asyncio.sleep(0.01)
            assert COUNT_VAR.get(0) == count
        ws.send(text)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("shape", ["function", "method"])
async def test_async_handlers_of_one_read_run_once_in_order_in_the_context_up_to_an_exception(
    serve: ServeFn, recorder: Recorder, opcode: int, shape: str
) -> None:
    texts = ["a", "b", "wait", "c", "bad", "d", "wait", "e"]

    async def on_message(ws: brioche.WebSocket[Any], message: str | bytes) -> None:
        await AsyncHandlers.on_message(handlers, ws, message)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, COUNT_VAR.get(0))

    handlers = AsyncHandlers(recorder)
    fn = handlers.on_message if shape == "method" else on_message
    srv = await serve(websocket.init().on_text(fn).on_bytes(fn).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        # One write: one run. Most handlers finish in their first step; "wait" suspends, so
        # the rest of the run waits behind its task; "bad" raises, which closes with 1011, and
        # the messages after it are handled no more.
        await client.send_raw(b"".join(encode_frame(opcode, t.encode()) for t in texts))
        replies = []
        for _ in range(len(texts)):
            frame = await client.recv_data_frame(TIMEOUT)
            if frame.opcode == OP_CLOSE:
                assert frame.close_code == 1011, frame
                break
            replies.append(frame.payload.decode())
        await client.send_close(1011)
        await client.frames_until_end(TIMEOUT)
    finally:
        await client.aclose()
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    handled = texts[: texts.index("bad") + 1]
    assert recorder.of("text") == [(t, n) for n, t in enumerate(handled, 1)]
    assert recorder.of("close") == [(1011, len(handled))]
    # What was sent before the close frame: every reply up to "bad", in order.
    assert replies == texts[: texts.index("bad")]


async def test_a_plain_handler_returning_an_awaitable_holds_back_the_messages_after_it(
    serve: ServeFn, recorder: Recorder
) -> None:
    async def finish(ws: brioche.WebSocket[Any], text: str) -> None:
        await asyncio.sleep(0.05)
        recorder.add("text", f"{text} done", COUNT_VAR.get(0))
        ws.send(f"{text} done")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> Awaitable[None] | None:
        count = COUNT_VAR.get(0) + 1
        COUNT_VAR.set(count)
        recorder.add("text", text, count)
        if text == "wait":
            return finish(ws, text)
        ws.send(text)
        return None

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_raw(b"".join(encode_frame(OP_TEXT, t.encode()) for t in ["a", "wait", "b", "c"]))
        replies = [(await client.recv_data_frame(TIMEOUT)).payload for _ in range(4)]
    assert replies == [b"a", b"wait done", b"b", b"c"]
    assert recorder.of("text") == [("a", 1), ("wait", 2), ("wait done", 2), ("b", 3), ("c", 4)]


async def test_base_exception_in_a_plain_on_text_closes_with_1011_and_leaves_nothing_waiting(
    serve: ServeFn, recorder: Recorder
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    texts = ["a", "boom", "b", "c"]

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text)
        if text == "boom":
            raise Boom("boom")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    try:
        srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
        client = await RawWebSocket.connect(srv.port)
        try:
            await client.send_raw(b"".join(encode_frame(OP_TEXT, t.encode()) for t in texts))
            await _close_1011_then_end(client)
        finally:
            await client.aclose()
        await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    finally:
        loop.set_exception_handler(previous)
    # The Boom propagated out of the loop (its exception handler heard of it once); the rest
    # of the read reaches no handler, the socket being closed, and on_close runs.
    assert recorder.of("text") == [("a",), ("boom",)]
    assert recorder.of("close") == [(1011,)]
    assert [type(c.get("exception")) for c in reported] == [Boom]


# -- a fair loop: timers fire on time while 500 connections flood it --------------------------------

FLOOD_CONNECTIONS = 500
FLOOD_MESSAGES = 120  # per connection: under the 128 the engine queues per connection
HANDLER_COST = 20e-6  # seconds of busy work per message: 60,000 of them take 1.2 s
TIMER_DELAY = 0.01
MAX_LATENESS = 0.05

FLOOD_CLIENT = r'''
import base64, os, socket, sys, time

port, conns, msgs = (int(a) for a in sys.argv[1:4])
deadline = time.monotonic() + 60


def frame(payload):
    key = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


socks = []
for i in range(conns):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws?c{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    socks.append(s)
for s in socks:
    head = b""
    for _ in range(4096):
        if head.endswith(b"\r\n\r\n") or time.monotonic() > deadline:
            break
        byte = s.recv(1)
        if not byte:
            sys.exit("connection closed during the handshake")
        head += byte
    if not head.startswith(b"HTTP/1.1 101"):
        sys.exit(f"upgrade refused: {head!r}")
blobs = [b"".join(frame(str(seq).encode()) for seq in range(msgs)) for _ in socks]
print("ready", flush=True)
if sys.stdin.readline() != "go\n":
    sys.exit("expected go")
for s, blob in zip(socks, blobs):
    s.sendall(blob)
print("sent", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
'''


async def test_timers_fire_on_time_while_500_connections_flood_the_server(
    serve: ServeFn, recorder: Recorder
) -> None:
    loop = asyncio.get_running_loop()
    total = FLOOD_CONNECTIONS * FLOOD_MESSAGES
    next_seq: dict[str, int] = {}
    out_of_order: list[tuple[str, int, str]] = []
    handled = 0
    opens = 0
    all_handled: asyncio.Future[None] = loop.create_future()

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        nonlocal opens
        opens += 1
        recorder.poke()

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        nonlocal handled
        end = time.perf_counter() + HANDLER_COST
        while time.perf_counter() < end:
            pass
        want = next_seq.get(ws.data, 0)
        if text != str(want):
            out_of_order.append((ws.data, want, text))
        next_seq[ws.data] = want + 1
        handled += 1
        if handled == total and not all_handled.done():
            all_handled.set_result(None)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text))
    clients = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOD_CLIENT, str(srv.port), str(FLOOD_CONNECTIONS), str(FLOOD_MESSAGES),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert clients.stdin is not None and clients.stdout is not None and clients.stderr is not None
    # Lateness of each timer (wall clock), and how much of it the loop thread spent running: at
    # most the thread's CPU time since the timer was armed. A busy loop (an unbounded batch) shows
    # in both; a loop thread the OS did not schedule (a loaded machine) shows only in the first.
    lateness: list[float] = []
    busy_lateness: list[float] = []
    flooding = True

    def fired(due: float, cpu_at_arm: float) -> None:
        late = loop.time() - due
        lateness.append(late)
        busy_lateness.append(min(late, time.thread_time() - cpu_at_arm))
        if flooding:
            arm()

    def arm() -> None:
        due = loop.time() + TIMER_DELAY
        loop.call_at(due, fired, due, time.thread_time())

    try:
        ready = await asyncio.wait_for(clients.stdout.readline(), 60)
        assert ready == b"ready\n", (ready, await clients.stderr.read())
        await recorder.wait_for(lambda: opens == FLOOD_CONNECTIONS, 30)
        arm()
        clients.stdin.write(b"go\n")
        await clients.stdin.drain()
        try:
            await asyncio.wait_for(asyncio.shield(all_handled), 60)
        except asyncio.TimeoutError:
            raise AssertionError(f"{handled} of {total} messages handled after 60 s") from None
        finally:
            flooding = False
        clients.stdin.write(b"bye\n")
        await clients.stdin.drain()
        await asyncio.wait_for(clients.wait(), 30)
        assert clients.returncode == 0, await clients.stderr.read()
    finally:
        if clients.returncode is None:
            clients.kill()
            await clients.wait()
    assert out_of_order == []
    assert next_seq == {f"c{i}": FLOOD_MESSAGES for i in range(FLOOD_CONNECTIONS)}
    print(f"{len(lateness)} timers during the flood: lateness max {max(lateness) * 1000:.1f} ms "
          f"(busy {max(busy_lateness) * 1000:.1f} ms), median {statistics.median(lateness) * 1000:.1f} ms")
    assert max(busy_lateness) < MAX_LATENESS, (
        f"a {TIMER_DELAY * 1000:.0f} ms timer fired {max(lateness) * 1000:.0f} ms late during the flood, "
        f"{max(busy_lateness) * 1000:.0f} ms of it with the loop thread running "
        f"(lateness of {len(lateness)} timers, ms: {[round(x * 1000) for x in lateness]})"
    )
    # 60,000 messages of HANDLER_COST take over a second: a timer every 10 ms fires many times.
    assert len(lateness) >= 20, f"only {len(lateness)} timers fired during the flood"
