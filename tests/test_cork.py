"""ws.cork(callback): runs the callback, returns its result, and writes what it sent in one go."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

import brioche
from brioche import MessageSent, server, websocket
from conftest import Recorder, ServeFn
from rawws import OP_BINARY, OP_TEXT, RawWebSocket, blocking_connect, encode_frame, parse_frames

# Between the sends inside a cork the loop is blocked this long: an uncorked writer (another
# thread) would flush the first frame on its own in that time. Not synchronisation: a gap.
GAP = 0.02


def send_three(ws: brioche.WebSocket[Any]) -> list[Any]:
    statuses = [ws.send("one")]
    time.sleep(GAP)
    statuses.append(ws.send("two"))
    time.sleep(GAP)
    statuses.append(ws.send_bytes(b"three"))
    return statuses


def send_three_nested(ws: brioche.WebSocket[Any]) -> list[Any]:
    statuses = [ws.send("one")]
    time.sleep(GAP)
    statuses.append(websocket.cork(ws, lambda w: w.send("two")))  # the inner uncork flushes nothing
    time.sleep(GAP)
    statuses.append(ws.send_bytes(b"three"))
    return statuses


def first_recv(sock: socket.socket, trigger: bytes) -> bytes:
    """In a thread: send ``trigger``, then one blocking recv, which wakes at the first segment."""
    sock.settimeout(5)
    sock.sendall(trigger)
    return sock.recv(65536)


def send_three_with_a_publish(ws: brioche.WebSocket[Any]) -> list[Any]:
    statuses = [ws.send("one")]
    time.sleep(GAP)
    statuses.append(ws.data.publish("t", "two"))  # reaches ws, which is subscribed: corked too
    time.sleep(GAP)
    statuses.append(ws.send_bytes(b"three"))
    return statuses


@pytest.mark.parametrize("where", ["task", "handler", "nested", "publish"])
async def test_frames_sent_inside_cork_arrive_in_one_write(
    serve: ServeFn, recorder: Recorder, where: str
) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def later(ws: brioche.WebSocket[Any]) -> None:
        await asyncio.sleep(0)  # outside any handler now
        recorder.add("statuses", ws.cork(send_three))

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if where == "task":
            task = asyncio.get_running_loop().create_task(later(ws))
            tasks.add(task)
        elif where == "handler":
            recorder.add("statuses", ws.cork(send_three))
        elif where == "nested":
            recorder.add("statuses", ws.cork(send_three_nested))
        else:
            ws.subscribe("t")
            recorder.add("statuses", ws.cork(send_three_with_a_publish))

    async def upgrade_with_server(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        return server.upgrade(srv, request, [], srv, server.bad_request)  # ws.data is the server

    srv = await serve(websocket.init().on_text(on_text), handler=upgrade_with_server)
    sock = await asyncio.to_thread(blocking_connect, srv.port)
    try:
        data = await asyncio.to_thread(first_recv, sock, encode_frame(OP_TEXT, b"go"))
    finally:
        sock.close()
    frames, tail = parse_frames(data)
    assert [(f.opcode, f.payload) for f in frames] == [
        (OP_TEXT, b"one"), (OP_TEXT, b"two"), (OP_BINARY, b"three")
    ], f"first recv got {data!r}"
    assert tail == b""
    await recorder.wait_for(lambda: bool(recorder.of("statuses")))
    assert recorder.of("statuses") == [([MessageSent(3), MessageSent(3), MessageSent(5)],)]


async def test_cork_returns_the_callback_result_and_passes_the_socket(serve: ServeFn, recorder: Recorder) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        method = ws.cork(lambda w: ("method", w is ws, w.send("a")))
        module = websocket.cork(ws, lambda w: ("module", w is ws, w.send("b")))
        none = ws.cork(lambda w: None)
        recorder.add("results", method, module, none)

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("go")
        assert [(await client.recv_frame()).payload for _ in range(2)] == [b"a", b"b"]
    assert recorder.of("results") == [
        (("method", True, MessageSent(1)), ("module", True, MessageSent(1)), None)
    ]


async def test_exception_in_cork_callback_propagates_and_frames_still_go_out(
    serve: ServeFn, recorder: Recorder
) -> None:
    def failing(ws: brioche.WebSocket[Any]) -> None:
        ws.send("before the error")
        raise KeyError("boom")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        try:
            ws.cork(failing)
        except KeyError as exc:
            recorder.add("raised", exc.args)
        recorder.add("after", ws.send("after"))

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("go")
        first = await client.recv_frame()
        second = await client.recv_frame()
        assert [first.payload, second.payload] == [b"before the error", b"after"]
    assert recorder.of("raised") == [(("boom",),)]
    assert recorder.of("after") == [(MessageSent(5),)]
