"""asyncio conveniences: ``async with serve()``, ``serve_forever``/``wait_closed``, a loop
factory for ``run``, ``CloseCode``/``ReadyState``, subprotocols, and consistent validation."""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode as WebsocketsCloseCode

import brioche
from brioche import server, websocket
from conftest import Recorder, ServeFn, free_port, kill_if_running, upgrade_ws_path, ws_url
from test_run import connect_when_listening

SCRIPT = Path(__file__).parent / "scripts" / "run_forever.py"


async def recv(client: Any) -> Any:
    return await asyncio.wait_for(client.recv(), 5)


def echo_text(ws: brioche.WebSocket[Any], text: str) -> None:
    ws.send(text)


def echo_config() -> server.Config[Any]:
    ws_config = websocket.init().on_text(echo_text)
    return server.handler(upgrade_ws_path).websocket(ws_config).hostname("127.0.0.1").port(0)


async def closed_code(client: Any) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(client.recv(), 5)
    return None if closed.value.rcvd is None else int(closed.value.rcvd.code)


# -- serve() as an async context manager -----------------------------------------------------


async def test_async_with_serve_needs_no_await_and_stops_the_server_with_1001() -> None:
    async with echo_config().serve() as srv:
        assert isinstance(srv, brioche.Server)
        client = await connect(ws_url(srv))
        await client.send("inside")
        assert await recv(client) == "inside"
    assert await closed_code(client) == 1001
    with pytest.raises(OSError):
        await connect(ws_url(srv), open_timeout=5)


async def test_the_module_form_and_plain_await_work_too() -> None:
    async with server.serve(echo_config()) as srv:
        async with connect(ws_url(srv)) as client:
            await client.send("module")
            assert await recv(client) == "module"
    awaited = await server.serve(echo_config())
    try:
        async with connect(ws_url(awaited)) as client:
            await client.send("awaited")
            assert await recv(client) == "awaited"
    finally:
        await awaited.stop()


def test_a_serve_never_awaited_warns_when_dropped() -> None:
    """``Bun.serve()`` listens at once; ``config.serve()`` without ``await`` or ``async with``
    starts nothing. It warns as a coroutine never awaited does. Before: nothing at all, not
    even Python's "never awaited" (``Serving`` is no coroutine)."""
    serving = echo_config().port(0).serve()
    with pytest.warns(RuntimeWarning, match=r"serve\(\) was never awaited: nothing is listening"):
        del serving
        gc.collect()


async def test_a_serve_awaited_or_entered_does_not_warn() -> None:
    # Recorded, not raised: the warning comes from `Serving.__del__`, where an exception goes to
    # the unraisable hook instead of failing the test.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        srv = await echo_config().serve()
        await srv.stop()
        async with echo_config().serve():
            pass
        never_awaited = echo_config().port(0).serve()
        del never_awaited
        gc.collect()
    # The one serve() left unawaited is said (the check sees the warning where it is made).
    assert [str(w.message).split(":")[0] for w in caught if w.category is RuntimeWarning] == [
        "serve() was never awaited"
    ]


# -- serve_forever / wait_closed --------------------------------------------------------------


async def test_serve_forever_cancelled_stops_the_server_and_wait_closed_returns() -> None:
    srv = await echo_config().serve()
    forever = asyncio.ensure_future(srv.serve_forever())
    client = await connect(ws_url(srv))
    await client.send("serving")
    assert await recv(client) == "serving"
    assert not forever.done()
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever
    assert await closed_code(client) == 1001
    await asyncio.wait_for(srv.wait_closed(), 5)
    await asyncio.wait_for(server.wait_closed(srv), 5)


async def test_serve_forever_returns_when_the_server_is_stopped_elsewhere() -> None:
    srv = await echo_config().serve()
    forever = asyncio.ensure_future(server.serve_forever(srv))
    waiting = asyncio.ensure_future(srv.wait_closed())
    await asyncio.sleep(0)  # both are now waiting on the server
    assert not forever.done() and not waiting.done()
    await srv.stop()
    await asyncio.wait_for(forever, 5)
    await asyncio.wait_for(waiting, 5)


# -- run(config, loop_factory=...) and python -m brioche --uvloop ------------------------------


async def run_script(*args: str) -> tuple[str, str, int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), str(port), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with await connect_when_listening(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send("hi")
            assert await recv(client) == "hi"
            async with httpx.AsyncClient() as http:
                loop_name = (await http.get(f"http://127.0.0.1:{port}/loop")).text
            proc.send_signal(signal.SIGINT)
            assert await closed_code(client) == 1001
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "stopped cleanly"
    return loop_name, err.decode(), proc.returncode


async def test_run_with_a_loop_factory_serves_on_that_loop() -> None:
    assert (await run_script("method"))[0] == "uvloop.Loop"
    assert (await run_script("module"))[0] == "uvloop.Loop"
    assert (await run_script())[0] == "asyncio.unix_events._UnixSelectorEventLoop"


async def test_demo_module_runs_on_uvloop_with_the_flag() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "brioche", "--uvloop", "--host", "127.0.0.1", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/ \(uvloop; Ctrl\+C to stop\)", line)
        assert match, line
        async with connect(f"ws://127.0.0.1:{match.group(1)}/echo") as client:
            await client.send("on uvloop")
            assert await recv(client) == "on uvloop"
            # Ctrl+C stops the server gracefully on every CPython (3.10 has no asyncio.Runner):
            # open connections are closed with 1001.
            proc.send_signal(signal.SIGINT)
            with pytest.raises(ConnectionClosed) as closed:
                await recv(client)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        # communicate: both pipes are read meanwhile, so the demo never blocks writing to them.
        _, err = await asyncio.wait_for(proc.communicate(), 30)  # a bound: a loaded CI machine is slow to exit
        assert proc.returncode == 0, err.decode()
    finally:
        await kill_if_running(proc)
    assert proc.returncode == 0


# -- CloseCode and ReadyState ------------------------------------------------------------------


def test_close_code_has_the_member_names_and_values_of_websockets() -> None:
    assert {m.name: m.value for m in brioche.CloseCode} == {m.name: m.value for m in WebsocketsCloseCode}
    as_ints: list[int] = [brioche.CloseCode.MESSAGE_TOO_BIG, brioche.ReadyState.OPEN]
    assert as_ints == [1009, 1] and brioche.CloseCode(1001).name == "GOING_AWAY"
    assert [(s.name, int(s)) for s in brioche.ReadyState] == [
        ("CONNECTING", 0), ("OPEN", 1), ("CLOSING", 2), ("CLOSED", 3)
    ]
    assert websocket.CloseCode is brioche.CloseCode and websocket.ReadyState is brioche.ReadyState


async def test_ready_state_is_the_enum_and_still_equals_the_int(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("state", ws.ready_state)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(brioche.CloseCode.GOING_AWAY, "bye")
        recorder.add("state", websocket.ready_state(ws))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("state", ws.ready_state)
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("close me")
        assert await closed_code(client) == 1001
    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    states = [s for (s,) in recorder.of("state")]
    assert states == [brioche.ReadyState.OPEN, brioche.ReadyState.CLOSING, brioche.ReadyState.CLOSED]
    assert all(type(s) is brioche.ReadyState for s in states) and states == [1, 2, 3]
    assert recorder.of("close") == [(1001, "bye")]  # the client echoes the reason


# -- subprotocols ------------------------------------------------------------------------------


async def test_the_chosen_subprotocol_is_answered_and_seen_by_both_ends(
    serve: ServeFn, recorder: Recorder
) -> None:
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        recorder.add("offered", request.subprotocols)
        if request.path == "/method":
            return None if srv.upgrade(request, [], None, subprotocol="chat") else server.bad_request()
        if request.path == "/none":
            return server.upgrade(srv, request, [], None, server.bad_request)
        if request.path == "/module":
            return server.upgrade(srv, request, [], None, server.bad_request, subprotocol="v2.chat")
        return server.upgrade(srv, request, [], None, server.bad_request, subprotocol="unoffered")

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.send(repr(ws.subprotocol) + " " + repr(websocket.subprotocol(ws)))

    srv = await serve(websocket.init().on_open(on_open), handler=handler)
    offer: list[Any] = ["v2.chat", "chat"]
    for path, chosen in (("/method", "chat"), ("/module", "v2.chat"), ("/none", None)):
        async with connect(ws_url(srv, path), subprotocols=offer) as client:
            assert client.subprotocol == chosen
            assert await recv(client) == f"{chosen!r} {chosen!r}"
    async with connect(ws_url(srv, "/none")) as client:
        assert await recv(client) == "None None"
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url(srv, "/unoffered"), subprotocols=offer)
    assert refused.value.response.status_code == 500  # the handler raised ValueError
    assert recorder.of("offered") == [(offer,)] * 3 + [([],), (offer,)]


async def test_upgrade_refuses_the_handshakes_own_headers_and_takes_a_subprotocol_from_them(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A ``Sec-WebSocket-Protocol`` among the headers (Bun's way) is the subprotocol, checked as
    ``subprotocol=`` is; the headers the 101 carries of itself cannot be given again."""
    own = ("Upgrade", "connection", "Sec-WebSocket-Accept", "sec-websocket-extensions",
           "Content-Length", "transfer-encoding")

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.path == "/bun":
            return server.upgrade(srv, request, [("Sec-WebSocket-Protocol", "chat")], None,
                                  server.bad_request)
        if request.path == "/unoffered":
            return server.upgrade(srv, request, [("sec-websocket-protocol", "nope")], None,
                                  server.bad_request)
        if request.path == "/twice":
            srv.upgrade(request, [("sec-websocket-protocol", "chat")], subprotocol="chat")
        for name in own:
            try:
                srv.upgrade(request, [(name, "x")])
            except ValueError as exc:
                recorder.add("refused", str(exc))
        try:
            srv.upgrade(request, [("x-wide", "✓")])
        except ValueError as exc:
            recorder.add("wide", str(exc))
        return server.upgrade(srv, request, [("x-extra", "1"), ("x-latin", "café")], None,
                              server.bad_request)

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.send(repr(ws.subprotocol))

    srv = await serve(websocket.init().on_open(on_open), handler=handler)
    offer: list[Any] = ["v2", "chat"]
    async with connect(ws_url(srv, "/bun"), subprotocols=offer) as client:
        assert client.subprotocol == "chat"
        assert await recv(client) == "'chat'"
    async with connect(ws_url(srv, "/plain")) as client:
        assert client.response is not None and client.response.headers["x-extra"] == "1"
        # Sent as ISO-8859-1, one byte per character. websockets reads values as ISO-8859-1,
        # or (the release for 3.10) as ASCII with surrogateescape: the same byte either way.
        assert client.response.headers["x-latin"].encode("latin-1", "surrogateescape") == b"caf\xe9"
        assert await recv(client) == "None"
    assert recorder.of("wide") == [
        ("invalid value for header x-wide: characters above U+00FF and ASCII control characters "
         "other than tab cannot be sent",)
    ]
    assert recorder.of("refused") == [
        (f"{name} is the handshake's own header; upgrade() cannot set it",) for name in own
    ]
    for path in ("/unoffered", "/twice"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(srv, path), subprotocols=offer)
        assert refused.value.response.status_code == 500, path


async def test_request_subprotocols_parses_every_header_line_in_order(serve: ServeFn) -> None:
    seen: list[list[str]] = []

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        seen.append(request.subprotocols)
        return server.ok()

    srv = await serve(None, handler=handler)
    async with httpx.AsyncClient() as http:
        headers = [("Sec-WebSocket-Protocol", "a, b ,,c"), ("sec-websocket-protocol", "d")]
        assert (await http.get(srv.url, headers=headers)).status_code == 200
        assert (await http.get(srv.url)).status_code == 200
        # An item that is not a token (RFC 6455 4.1) is no offer: one the handler took from
        # the list was answered in the 101 as given.
        not_tokens = [("Sec-WebSocket-Protocol", "a b, chat/1, \"q\", v2.json")]
        assert (await http.get(srv.url, headers=not_tokens)).status_code == 200
    assert seen == [["a", "b", "c", "d"], [], ["v2.json"]]


async def test_a_subprotocol_that_is_not_a_str_is_a_type_error(serve: ServeFn) -> None:
    errors: list[BaseException] = []

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        try:
            srv.upgrade(request, subprotocol=1)  # type: ignore[call-overload]
        except TypeError as exc:
            errors.append(exc)
        return server.upgrade(srv, request, [], None, server.bad_request)

    srv = await serve(websocket.init(), handler=handler)
    async with connect(ws_url(srv)):
        pass
    assert len(errors) == 1 and "subprotocol must be a str" in str(errors[0])


# -- validation --------------------------------------------------------------------------------

Setter = Callable[[Any], Any]
WS = websocket.init()
HTTP: server.Config[Any] = server.handler(upgrade_ws_path)

# Every setter of both configs: (setter, a value of the wrong type, a wrong value of the right type).
SETTERS: list[tuple[str, Setter, object, object]] = [
    ("max_payload_length", WS.max_payload_length, "1", 0),
    ("backpressure_limit", WS.backpressure_limit, 1.5, -1),
    ("idle_timeout", WS.idle_timeout, 1.5, -1),
    ("message_timeout", WS.message_timeout, "1", -1),
    ("close_on_backpressure_limit", WS.close_on_backpressure_limit, 1, None),
    ("publish_to_self", WS.publish_to_self, 1, None),
    ("send_pings", WS.send_pings, "yes", None),
    ("port", HTTP.port, "80", 70000),
    ("hostname", HTTP.hostname, 1, ""),
    ("max_request_body_size", HTTP.max_request_body_size, 1.0, -1),
    ("max_request_header_size", HTTP.max_request_header_size, "8192", 100),
    ("handshake_timeout", HTTP.handshake_timeout, "1", 0),
    ("max_connections", HTTP.max_connections, True, -1),
    ("max_incoming_bytes", HTTP.max_incoming_bytes, None, -1),
    ("unix path", HTTP.unix, b"/tmp/app.sock", ""),
    ("unix mode", lambda mode: HTTP.unix("/tmp/app.sock", mode), "0o660", 0o10000),
    ("sock", HTTP.sock, "3", -1),
    ("tls cert_file", lambda path: HTTP.tls(path, "key.pem"), b"cert.pem", ""),
    ("tls key_file", lambda path: HTTP.tls("cert.pem", path), 1, ""),
    ("workers", HTTP.workers, "2", 0),
    ("url", HTTP.pubsub_redis, None, "http://127.0.0.1:6379"),
    ("sharded", lambda sharded: HTTP.pubsub_redis("redis://127.0.0.1", sharded=sharded), 1, None),
    ("namespace", lambda ns: HTTP.pubsub_redis("redis://127.0.0.1", namespace=ns), b"app:", None),
    ("per_message_deflate", WS.per_message_deflate, 1, None),
]


@pytest.mark.parametrize(("name", "setter", "wrong_type", "wrong_value"), SETTERS, ids=[s[0] for s in SETTERS])
def test_every_setter_raises_type_error_for_a_type_and_value_error_for_a_value(
    name: str, setter: Setter, wrong_type: object, wrong_value: object
) -> None:
    with pytest.raises(TypeError, match=name):
        setter(wrong_type)
    if wrong_value is not None:  # a bool has no wrong value
        with pytest.raises(ValueError, match=name):
            setter(wrong_value)


@pytest.mark.parametrize("name", ["on_text", "on_bytes", "on_open", "on_close", "on_drain", "on_ping", "on_pong"])
def test_every_handler_setter_raises_type_error_for_a_non_callable(name: str) -> None:
    with pytest.raises(TypeError, match="callable"):
        getattr(WS, name)(42)
    with pytest.raises(TypeError, match="websocket.Config"):
        HTTP.websocket(42)  # type: ignore[arg-type]
