"""Stopping a server: refusing new connections, waiting for or closing open ones."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

import brioche
from brioche import MessageBackpressured, server, websocket
from conftest import Recorder, ServeFn, upgrade_ws_path, ws_url
from rawws import OP_BINARY, RawWebSocket, fill, numbered, parse_frames, poll_until, unread_by_server

pytestmark = pytest.mark.both_loops

TIMEOUT = 5


def echo_config(recorder: Recorder) -> websocket.Config[Any]:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)

    return websocket.init().on_text(on_text).on_close(on_close)


async def echo(client: ClientConnection, message: str) -> None:
    await client.send(message)
    assert await asyncio.wait_for(client.recv(), TIMEOUT) == message


async def assert_refused(srv: brioche.Server[Any]) -> None:
    """After ``stop()`` has returned: its listener is closed (Stopped follows the end of the
    accept loop, which owns it), so the very first attempt is refused."""
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.port), TIMEOUT)


async def refused_soon(srv: brioche.Server[Any], attempts: int = 200) -> int:
    """While ``stop()`` is still waiting for connections: the accept loop lets go of the listener
    on a tokio worker, a moment after ``stop()`` was called. Connect (at most ``attempts`` times,
    about 10 ms apart, within TIMEOUT) until refused; the attempts it took."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    for attempt in range(1, attempts + 1):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.port), TIMEOUT)
        except ConnectionRefusedError:
            return attempt
        writer.close()
        if asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.01)
    raise AssertionError(f"still accepting connections after {attempt} attempts")


async def test_stop_refuses_new_connections(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    await assert_refused(srv)
    with pytest.raises(OSError):
        async with connect(ws_url(srv), open_timeout=TIMEOUT):
            pass


async def test_stop_refuses_new_connections_while_a_client_is_open(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    async with connect(ws_url(srv, "/ws?old")) as old:
        stopping = asyncio.create_task(srv.stop())
        await echo(old, "after stop was called")  # the stop task has run its first step by now
        await refused_soon(srv)
        await assert_refused(srv)  # and from then on
        with pytest.raises(OSError):
            async with connect(ws_url(srv), open_timeout=TIMEOUT):
                pass
        assert not stopping.done()
    await asyncio.wait_for(stopping, TIMEOUT)


async def test_open_client_keeps_echoing_after_stop(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    async with connect(ws_url(srv, "/ws?old")) as old:
        stopping = asyncio.create_task(srv.stop())
        for i in range(5):
            await echo(old, f"message {i}")
        await echo(old, "é" * 1000)
        assert not stopping.done()
    await asyncio.wait_for(stopping, TIMEOUT)
    assert recorder.of("close") == [("old", 1000)]


async def test_stop_completes_only_after_open_client_closes(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    client = await connect(ws_url(srv, "/ws?old"))
    stopping = asyncio.create_task(srv.stop())
    try:
        await echo(client, "one")
        assert not stopping.done()
        await echo(client, "two")
        assert not stopping.done()
        assert recorder.of("close") == []
    finally:
        await client.close(4000, "leaving")
    await asyncio.wait_for(stopping, TIMEOUT)
    assert recorder.of("close") == [("old", 4000)]
    assert srv.pending_websockets == 0


async def test_stop_closing_active_connections_sends_1001_to_every_client(
    serve: ServeFn, recorder: Recorder
) -> None:
    srv = await serve(echo_config(recorder))
    async with connect(ws_url(srv, "/ws?a")) as a, connect(ws_url(srv, "/ws?b")) as b:
        await echo(a, "a")
        await echo(b, "b")
        await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
        for client in (a, b):
            with pytest.raises(ConnectionClosedOK) as info:
                await asyncio.wait_for(client.recv(), TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            assert client.close_code == 1001
    assert sorted(recorder.of("close")) == [("a", 1001), ("b", 1001)]
    await assert_refused(srv)


async def test_stop_closing_active_connections_can_follow_a_waiting_stop(
    serve: ServeFn, recorder: Recorder
) -> None:
    srv = await serve(echo_config(recorder))
    async with connect(ws_url(srv, "/ws?a")) as a:
        waiting = asyncio.create_task(srv.stop())
        await echo(a, "still here")
        assert not waiting.done()
        await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
        await asyncio.wait_for(a.wait_closed(), TIMEOUT)
        assert a.close_code == 1001
    await asyncio.wait_for(waiting, TIMEOUT)
    assert recorder.of("close") == [("a", 1001)]


async def test_async_with_serves_and_stops_on_exit(recorder: Recorder) -> None:
    config = server.handler(upgrade_ws_path).websocket(echo_config(recorder)).hostname("127.0.0.1").port(0)
    async with await config.serve() as srv:
        assert isinstance(srv, brioche.Server)
        assert srv.port > 0
        client = await connect(ws_url(srv, "/ws?ctx"))
        await echo(client, "inside")
    # Leaving the block stopped the server and closed the client with 1001.
    await asyncio.wait_for(client.wait_closed(), TIMEOUT)
    assert client.close_code == 1001
    assert recorder.of("close") == [("ctx", 1001)]
    await assert_refused(srv)


async def test_a_serve_entered_twice_is_a_runtime_error_and_its_server_still_stops(recorder: Recorder) -> None:
    """One ``serve()`` entered inside itself started a second server in its one slot, and the
    first was never stopped: it kept its port after both blocks."""
    config = server.handler(upgrade_ws_path).websocket(echo_config(recorder)).hostname("127.0.0.1").port(0)
    serving = config.serve()
    async with serving as srv:
        with pytest.raises(RuntimeError, match=r"^this serve\(\) is already entered"):
            async with serving:
                pass
        client = await connect(ws_url(srv, "/ws?first"))
        await echo(client, "still serving")
    await asyncio.wait_for(client.wait_closed(), TIMEOUT)
    assert client.close_code == 1001
    await assert_refused(srv)


async def test_async_with_stops_when_block_raises(recorder: Recorder) -> None:
    config = server.handler(upgrade_ws_path).websocket(echo_config(recorder)).hostname("127.0.0.1").port(0)
    with pytest.raises(KeyError):
        async with await config.serve() as srv:
            raise KeyError("boom")
    await assert_refused(srv)


async def test_pending_websockets_counts_open_sockets(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    assert srv.pending_websockets == 0
    async with connect(ws_url(srv, "/ws?a")) as a:
        await echo(a, "a")
        assert srv.pending_websockets == 1
        async with connect(ws_url(srv, "/ws?b")) as b:
            await echo(b, "b")
            assert srv.pending_websockets == 2
        await recorder.wait_for(lambda: len(recorder.of("close")) == 1, TIMEOUT)
        assert srv.pending_websockets == 1
    await recorder.wait_for(lambda: len(recorder.of("close")) == 2, TIMEOUT)
    assert srv.pending_websockets == 0


async def test_pending_websockets_ignores_plain_http(serve: ServeFn) -> None:
    srv = await serve(websocket.init())
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert srv.pending_websockets == 0
    finally:
        writer.close()


async def test_stopping_twice_is_harmless(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    async with connect(ws_url(srv, "/ws?a")) as a:
        await echo(a, "a")
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
    await asyncio.wait_for(server.stop(srv), TIMEOUT)
    assert recorder.of("close") == [("a", 1000)]
    await assert_refused(srv)
    # The `serve` fixture stops it once more at teardown.


async def test_a_stop_awaited_in_on_close_when_the_last_client_leaves_returns(
    serve: ServeFn, recorder: Recorder
) -> None:
    """"Last client gone, shut down": ``await srv.stop(True)`` in an ``async`` ``on_close``
    waits for every other handler, not for itself, and returns; the server is stopped. It waited
    for its own task, for ever."""
    holder: list[brioche.Server[Any]] = []

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("closing", code)
        await holder[0].stop(True)
        recorder.add("stop returned")

    srv = await serve(websocket.init().on_close(on_close))
    holder.append(srv)
    async with connect(ws_url(srv)):
        pass
    await asyncio.wait_for(srv.wait_closed(), TIMEOUT)
    await recorder.wait_for(lambda: bool(recorder.of("stop returned")), TIMEOUT)
    assert [event[0] for event in recorder.events] == ["closing", "stop returned"]
    await assert_refused(srv)


async def test_a_stop_awaited_by_a_message_handler_waits_for_the_others_only(
    serve: ServeFn, recorder: Recorder
) -> None:
    """``await srv.stop()`` in an ``async`` ``on_text`` of one client, while another client's
    handler is suspended: it returns once that one and its ``on_close`` have finished and both
    clients have left, not before, and not never (it waited for itself). ``wait_closed()``
    returns after it and after its own connection's ``on_close``, parked behind it."""
    holder: list[brioche.Server[Any]] = []
    release = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "stop":
            recorder.add("stopping")
            await holder[0].stop()
            recorder.add("stop returned")
        else:
            recorder.add("waiting")
            await release.wait()
            recorder.add("released")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add(f"close {ws.data}")

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    holder.append(srv)
    async with connect(ws_url(srv, "/ws?waiter")) as waiter, connect(ws_url(srv, "/ws?stopper")) as stopper:
        await waiter.send("wait")
        await recorder.wait_for(lambda: bool(recorder.of("waiting")), TIMEOUT)
        await stopper.send("stop")
        await recorder.wait_for(lambda: bool(recorder.of("stopping")), TIMEOUT)
    assert await poll_until(lambda: srv.pending_websockets == 0, TIMEOUT)
    closed = asyncio.ensure_future(srv.wait_closed())
    assert recorder.of("stop returned") == [], "returned before the suspended handler finished"
    release.set()
    await asyncio.wait_for(closed, TIMEOUT)
    recorder.add("wait_closed returned")
    assert [event[0] for event in recorder.events] == [
        "waiting", "stopping", "released", "close waiter", "stop returned", "close stopper",
        "wait_closed returned",
    ]


async def test_a_stop_closing_connections_awaited_by_a_message_handler_lets_it_go_on(
    serve: ServeFn, recorder: Recorder
) -> None:
    """``await srv.stop(True)`` in ``on_text``: its client is closed with 1001 like every other,
    and the handler is not cancelled for it: the code after the ``await`` runs, then its
    ``on_close``, then ``wait_closed()`` returns."""
    holder: list[brioche.Server[Any]] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await holder[0].stop(True)
        recorder.add("after stop", ws.ready_state)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    holder.append(srv)
    async with connect(ws_url(srv)) as client:
        await client.send("stop")
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(client.recv(), TIMEOUT)
        assert client.close_code == 1001
    await asyncio.wait_for(srv.wait_closed(), TIMEOUT)
    assert recorder.events == [("after stop", brioche.ReadyState.CLOSED), ("close", 1001)]


@pytest.mark.parametrize("close_active", [False, True])
async def test_a_stop_awaited_by_the_http_handler_returns_and_its_answer_goes_out(
    serve: ServeFn, close_active: bool
) -> None:
    """A "/shutdown" endpoint: ``await srv.stop()`` in an ``async`` HTTP handler returns once the
    stop has begun, the handler's answer reaches its client, and the server stops. It waited for
    the answer its own handler was to give, for ever; with ``stop(True)`` it was cancelled by
    its own stop, and its client got 503."""

    async def fetch(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        await srv.stop(close_active)
        await asyncio.sleep(0)  # suspended once after it: not cancelled for the stop either
        return server.text("bye")

    srv = await serve(None, handler=fetch)
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{srv.port}/shutdown", timeout=TIMEOUT)
    assert (answer.status_code, answer.text) == (200, "bye")
    await asyncio.wait_for(srv.wait_closed(), TIMEOUT)
    await assert_refused(srv)


async def test_concurrent_stops_all_complete(serve: ServeFn) -> None:
    srv = await serve(websocket.init())
    await asyncio.wait_for(asyncio.gather(srv.stop(), srv.stop(), srv.stop(close_active_connections=True)), TIMEOUT)


async def test_stop_closing_active_connections_completes_when_a_client_never_reads(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A client that stopped reading with the server's queue behind a full TCP window: the 1001
    close frame can never be written. stop(close_active_connections=True) still completes, once
    the close timeout (5 s) has passed, and on_close reports 1006; the client gets no close frame."""
    opened: list[brioche.WebSocket[Any]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        opened.append(ws)
        recorder.poke()

    srv = await serve(echo_config(recorder).on_open(on_open))
    async with await RawWebSocket.connect(srv.port, "/ws?stuck", rcvbuf=4096) as client:
        client.pause_reading()
        await recorder.wait_for(lambda: bool(opened), TIMEOUT)
        [ws] = opened
        records = await fill(ws, (numbered(i, 64 * 1024) for i in range(200)),
                             stop_when=lambda status: isinstance(status, MessageBackpressured))
        assert isinstance(records[-1].status, MessageBackpressured), records[-3:]
        assert ws.buffered_amount > 0
        start = time.monotonic()
        await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT + 5)
        elapsed = time.monotonic() - start
        assert 4.5 <= elapsed <= 7, f"stop() took {elapsed:.2f}s"
        assert recorder.of("close") == [("stuck", 1006)]
        client.resume_reading()
        data, how = await client.read_until_end(TIMEOUT)
    frames, _ = parse_frames(data)
    assert frames and all(f.opcode == OP_BINARY for f in frames), "data, then the end, no close frame"
    assert how in ("eof", "reset")


@pytest.mark.parametrize("part", ["head", "body"])
async def test_stop_closing_active_connections_does_not_wait_for_a_request_under_way(
    serve: ServeFn, recorder: Recorder, part: str
) -> None:
    """Bun's ``stop(true)`` closes everything: a client still sending its request (its head, or
    the body it declared) gets 503 and the connection ends, and stop() returns at once. It
    waited for the client up to ``handshake_timeout`` (60 s here), then answered it 408."""

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("request", request.path)
        return server.text("done")

    srv = await serve(handler=handler, handshake_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        head = b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        writer.write(head + (b"Content-Length: 10\r\n\r\nabc" if part == "body" else b""))
        await writer.drain()
        # Read by the server: the request is under way, not merely in the kernel's queue.
        assert await poll_until(lambda: unread_by_server(srv.port) == 0, TIMEOUT)
        await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
    assert answer.endswith(b"\r\n\r\nService Unavailable"), answer
    assert recorder.events == []


async def test_stop_closing_active_connections_does_not_wait_for_a_client_that_reads_no_answer(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A client reading none of a 16 MiB answer: stop(True) ends its connection at once. It
    waited for the client's reading up to ``handshake_timeout`` (60 s here)."""
    body = b"x" * (16 << 20)

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("request", request.path)
        return server.Response(200, [("content-type", "application/octet-stream")], body)

    srv = await serve(handler=handler, handshake_timeout=60)
    sock = socket.socket()
    # A small window: the answer cannot all be in flight to a client that does not read.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        await recorder.wait_for(lambda: recorder.events == [("request", "/big")], TIMEOUT)
        await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
        received = 0
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 20), TIMEOUT):
                received += len(chunk)
        except ConnectionResetError:
            pass
    finally:
        writer.close()
    # The start of the answer came; then the end, not the rest.
    assert 0 < received < len(body), received


@pytest.mark.parametrize("kind", ["http", "websocket"])
async def test_stop_closing_active_connections_ends_a_request_in_flight_with_503(
    serve: ServeFn, recorder: Recorder, kind: str
) -> None:
    """Bun's ``stop(true)``: an ``async`` handler still running is cancelled, its client gets
    503 at once and stop() does not wait for it; a handshake's handler never upgrades."""
    entered = asyncio.Event()
    never = asyncio.Event()

    async def slow_handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        entered.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            recorder.add("cancelled", request.path)
            raise
        recorder.add("finished", request.path)
        return server.upgrade(srv, request, [], None, server.bad_request)

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open")

    srv = await serve(websocket.init().on_open(on_open), handler=slow_handler)

    async def client() -> tuple[int, str]:
        if kind == "http":
            async with httpx.AsyncClient() as http:
                response = await http.get(f"http://127.0.0.1:{srv.port}/slow", timeout=TIMEOUT)
                return response.status_code, response.text
        try:
            async with connect(ws_url(srv, "/slow"), open_timeout=TIMEOUT):
                return 101, ""
        except InvalidStatus as refused:
            return refused.response.status_code, refused.response.body.decode()

    waiting = asyncio.ensure_future(client())
    try:
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        # Before, stop() waited for the handler, which waits here until the test ends.
        await asyncio.wait_for(srv.stop(close_active_connections=True), TIMEOUT)
        assert await asyncio.wait_for(waiting, TIMEOUT) == (503, "Service Unavailable")
    finally:
        # A failure leaves no handler behind to hold up the fixture's stop.
        never.set()
        waiting.cancel()
    assert recorder.events == [("cancelled", "/slow")]


async def test_stop_closing_active_connections_cancels_a_handler_once_and_lets_it_clean_up(
    serve: ServeFn, recorder: Recorder
) -> None:
    """The end of the last connection, after the handler's own, used to cancel a suspended
    handler again while it cleaned up after the first cancel."""
    entered = asyncio.Event()
    never = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        entered.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            recorder.add("cancelled")
            try:
                await asyncio.sleep(1)  # its clean-up: a flush that takes a while
            except asyncio.CancelledError:
                recorder.add("cut short")
                raise
            recorder.add("cleaned up")
            raise

    srv = await serve(websocket.init().on_text(on_text), handler=upgrade_ws_path)
    try:
        async with connect(ws_url(srv)) as client, await RawWebSocket.connect(srv.port) as last:
            await client.send("wait")
            await asyncio.wait_for(entered.wait(), TIMEOUT)
            stopping = asyncio.ensure_future(srv.stop(close_active_connections=True))
            await recorder.wait_for(lambda: bool(recorder.events), TIMEOUT)
            # The last connection ends (no answer to its close frame): the server has stopped.
            assert (await last.recv_frame()).close_code == 1001
            last.close()
            await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        never.set()
    assert recorder.events == [("cancelled",), ("cleaned up",)]


async def test_this_module_runs_on_both_loops(request: pytest.FixtureRequest) -> None:
    """The both_loops marker: the [uvloop] variant of each test really runs on uvloop."""
    loop = asyncio.get_running_loop()
    assert request.node.name.endswith("[uvloop]") == isinstance(loop, uvloop.Loop), (request.node.name, loop)
    assert request.node.name.endswith(("[asyncio]", "[uvloop]"))
