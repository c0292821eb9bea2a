"""A WebSocket's life seen from both ends: context, state, closing, control frames, handler rules."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import select
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

import brioche
from brioche import MessageDropped, MessageSent, server, websocket
from conftest import Recorder, ServeFn, log_lines, ws_url
from rawws import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    RawWebSocket,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    blocking_connect,
    close_payload,
    encode_frame,
    finish_upgrade,
    parse_frames,
    read_until_eof,
    start_upgrade,
    tcp_state,
    upgrade_request,
)

pytestmark = pytest.mark.both_loops

TIMEOUT = 5


# -- a minimal raw WebSocket client, to see the frames the websockets library hides -----------


async def raw_connect(srv: brioche.Server[Any], path: str = "/ws") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(upgrade_request(path, base64.b64encode(os.urandom(16))))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: (opcode, payload). Server frames are unmasked and, here, unfragmented."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    assert b0 & 0x80, "expected a final frame"
    assert not b1 & 0x80, "server frames must not be masked"
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))
    elif length == 127:
        (length,) = struct.unpack("!Q", await asyncio.wait_for(reader.readexactly(8), TIMEOUT))
    payload = await asyncio.wait_for(reader.readexactly(length), TIMEOUT) if length else b""
    return b0 & 0x0F, payload


def client_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


# -- context, headers, address, state --------------------------------------------------------


async def test_ws_data_is_the_upgrade_context(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("data", ws.data, websocket.data(ws))

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv, "/ws?room=42&user=ann")):
        await recorder.wait_for(lambda: bool(recorder.of("data")), TIMEOUT)
    assert recorder.of("data") == [("room=42&user=ann", "room=42&user=ann")]


async def test_ws_data_is_the_same_object_passed_to_upgrade(serve: ServeFn, recorder: Recorder) -> None:
    context = {"user": "ann", "ids": [1, 2, 3]}

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        return server.upgrade(srv, request, [], context, server.bad_request)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("same", ws.data is context, websocket.data(ws) is context)
        ws.send(text)

    srv = await serve(websocket.init().on_text(on_text), handler=handler)
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "x"
    assert recorder.of("same") == [(True, True)]


async def test_upgrade_headers_appear_in_101_response(serve: ServeFn, recorder: Recorder) -> None:
    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        sid = brioche.random_uuid_v7()
        recorder.add("sid", sid)
        return server.upgrade(srv, request, [("x-session", sid)], sid, server.internal_error)

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("data", ws.data)

    srv = await serve(websocket.init().on_open(on_open), handler=handler)
    async with connect(ws_url(srv)) as client:
        await recorder.wait_for(lambda: bool(recorder.of("data")), TIMEOUT)
        assert client.response is not None
        assert client.response.status_code == 101
        [(sid,)] = recorder.of("sid")
        assert client.response.headers.get_all("x-session") == [sid]
    assert recorder.of("data") == [(sid,)]


async def test_remote_address_is_client_ip(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("addr", ws.remote_address, websocket.remote_address(ws))

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv)):
        await recorder.wait_for(lambda: bool(recorder.of("addr")), TIMEOUT)
    assert recorder.of("addr") == [("127.0.0.1", "127.0.0.1")]


async def test_ready_state_is_1_while_open_and_3_in_on_close_and_after(
    serve: ServeFn, recorder: Recorder
) -> None:
    sockets: list[brioche.WebSocket[Any]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        sockets.append(ws)
        recorder.add("state", "open", ws.ready_state, websocket.ready_state(ws))

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("state", "text", ws.ready_state, websocket.ready_state(ws))
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("state", "close", ws.ready_state, websocket.ready_state(ws))

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("hi")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "hi"
    await recorder.wait_for(lambda: len(recorder.of("state")) == 3, TIMEOUT)
    assert recorder.of("state") == [("open", 1, 1), ("text", 1, 1), ("close", 3, 3)]
    assert sockets[0].ready_state == 3


# -- closing ---------------------------------------------------------------------------------


async def test_client_close_code_and_reason_reach_on_close_once(serve: ServeFn, recorder: Recorder) -> None:
    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.close(4000, "done")
        assert client.close_code == 4000  # the server echoed the code
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    # Once every connection has ended no further on_close can be pending.
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    assert recorder.of("close") == [(4000, "done")]


@pytest.mark.parametrize("close", [(4000, "bye"), None], ids=["with-code", "without-code"])
async def test_what_handlers_send_before_a_client_s_close_is_answered_goes_out_before_the_answer(
    serve: ServeFn, recorder: Recorder, close: tuple[int, str] | None
) -> None:
    """A client sends five messages and its close frame in one write, right after the 101. As
    uWS runs a message's handler before it reads the close frame behind it, what ``on_open``
    and the handlers send goes out first, then the echo of the close (its code and reason, or
    no code), and ``on_close`` gets the client's. Before, the close was answered as it was
    parsed, before any of those handlers ran: each ``send`` returned MessageDropped and the
    client got the close frame alone."""

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("sent", ws.send("welcome"))

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("sent", ws.send(text))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        close_frame = encode_frame(OP_CLOSE, b"" if close is None else close_payload(*close))
        await client.send_raw(b"".join(encode_frame(OP_TEXT, f"m{i}".encode()) for i in range(5)) + close_frame)
        frames, how = await client.frames_until_end(TIMEOUT)
    finally:
        client.close()
    assert how == "eof"
    assert [f.payload for f in frames[:-1]] == [b"welcome", b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert frames[-1].opcode == OP_CLOSE
    assert frames[-1].payload == (b"" if close is None else close_payload(*close))
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.of("sent") == [(MessageSent(len("welcome")),)] + [(MessageSent(2),)] * 5
    assert recorder.of("close") == [close or (1005, "")]


def recv_frames(sock: socket.socket, count: int, timeout: float = TIMEOUT) -> list[Frame]:
    """In a thread: read until ``count`` whole frames have come (the server's FIN ends it)."""
    sock.settimeout(timeout)
    data = b""
    frames: list[Frame] = []
    for _ in range(1000):
        frames, _ = parse_frames(data)
        if len(frames) >= count:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return frames


async def test_a_client_s_close_waits_for_its_on_open_when_the_loop_kept_it_for_later(
    serve: ServeFn, recorder: Recorder
) -> None:
    """The loop takes every event that waits but dispatches only what fits its batch time,
    keeping the rest for its next call. A client's close that comes while its ``Open`` is kept
    so is answered after ``on_open``'s sends, as when it is not. Before, the batch that took the
    ``Open`` having ended counted as its handlers having run: the close was echoed at once and
    ``on_open``'s ``send`` returned MessageDropped.

    How the ``Open`` is kept: three slow messages are queued while the handler of the client's
    upgrade holds the loop; that long batch sizes the next ones to one event each, so the
    ``Open``, queued behind them, is taken with them and kept over two slow batches. The client
    closes once two of them have ended."""
    gate, blocked = threading.Event(), threading.Event()

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("sent", ws.data, ws.send("welcome"))

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        time.sleep(0.25)  # a handler far longer than a batch's time: batches of one event
        ws.send("done")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code, reason)

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.query == "late":
            blocked.set()
            gate.wait(TIMEOUT)
        return server.upgrade(srv, request, [], request.query, server.bad_request)

    config = websocket.init().on_open(on_open).on_text(on_text).on_close(on_close)
    srv = await serve(config, handler=handler)

    def scenario() -> list[Frame]:
        slow = [blocking_connect(srv.port, f"/ws?slow{i}") for i in range(3)]
        late = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
        try:
            for client in slow:
                assert [f.payload for f in recv_frames(client, 1)] == [b"welcome"]
            key = start_upgrade(late, "/ws?late")
            assert blocked.wait(TIMEOUT)
            queued = srv.stats()["messages_in"] + 3
            for client in slow:
                client.sendall(encode_frame(OP_TEXT, b"slow"))
            for _ in range(TIMEOUT * 1000):
                if srv.stats()["messages_in"] >= queued:
                    break
                time.sleep(0.001)
            assert srv.stats()["messages_in"] == queued
            gate.set()
            finish_upgrade(late, key)
            done = 0
            for _ in range(10):
                readable, _, _ = select.select(slow, [], [], TIMEOUT)
                for client in readable:
                    assert [f.payload for f in recv_frames(client, 1)] == [b"done"]
                    slow.remove(client)
                    client.close()
                    done += 1
                if done >= 2:
                    break
            late.sendall(encode_frame(OP_CLOSE, close_payload(1000, "bye")))
            frames, _ = parse_frames(read_until_eof(late))
            return frames
        finally:
            gate.set()
            late.close()
            for client in slow:
                client.close()

    frames = await asyncio.to_thread(scenario)
    assert [(f.opcode, f.payload) for f in frames] == [
        (OP_TEXT, b"welcome"),
        (OP_CLOSE, close_payload(1000, "bye")),
    ]
    await recorder.wait_for(lambda: ("late", 1000, "bye") in recorder.of("close"), TIMEOUT)
    assert [e for e in recorder.of("sent") if e[0] == "late"] == [("late", MessageSent(len("welcome")))]


@pytest.mark.parametrize("close", [None, (4000, "x")], ids=["no-code", "code"])
async def test_a_client_s_close_behind_a_suspended_handler_is_answered_after_1_s(
    serve: ServeFn, recorder: Recorder, close: tuple[int, str] | None
) -> None:
    """A client's close behind a message whose ``async`` handler stays suspended is answered
    by the connection itself once the loop has had 1 s to answer it in order (as a protocol
    violation's close): with the client's code and reason, or with no code if it sent none."""
    release = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text)
        await release.wait()

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        close_frame = encode_frame(OP_CLOSE, b"" if close is None else close_payload(*close))
        await client.send_raw(encode_frame(OP_TEXT, b"hold") + close_frame)
        await recorder.wait_for(lambda: bool(recorder.of("text")), TIMEOUT)
        frames, how = await client.frames_until_end(TIMEOUT)
    finally:
        release.set()
        client.close()
    assert how == "eof"
    assert [(f.opcode, f.payload) for f in frames] == [
        (OP_CLOSE, b"" if close is None else close_payload(*close))
    ]
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.of("close") == [close or (1005, "")]


@pytest.mark.parametrize("suspended", ["on_open", "on_text"])
async def test_a_client_s_close_that_comes_while_a_handler_is_suspended_is_answered_after_its_reply(
    serve: ServeFn, recorder: Recorder, suspended: str
) -> None:
    """A client's close that comes while an ``async`` handler awaits, its event long taken by
    the loop and nothing queued behind it, is answered once the handler has sent its reply.
    Before, it was answered at once: the handler resumed on a CLOSED socket, and its send
    returned MessageDropped. (The ping in the close's write is answered by the connection as it
    reads them: its pong says the close has been read.)"""
    entered, release = asyncio.Event(), asyncio.Event()

    async def reply(ws: brioche.WebSocket[Any]) -> None:
        entered.set()
        await release.wait()
        recorder.add("sent", ws.send("reply"))

    async def on_open(ws: brioche.WebSocket[Any]) -> None:
        if suspended == "on_open":
            await reply(ws)

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await reply(ws)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    try:
        if suspended == "on_text":
            await client.send_raw(encode_frame(OP_TEXT, b"question"))
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        await client.send_raw(encode_frame(OP_PING, b"p") + encode_frame(OP_CLOSE, close_payload(1000, "bye")))
        pong = await client.recv_frame(TIMEOUT)
        assert (pong.opcode, pong.payload) == (OP_PONG, b"p")
        release.set()
        frames, how = await client.frames_until_end(TIMEOUT)
    finally:
        release.set()
        client.close()
    assert how == "eof"
    assert [(f.opcode, f.payload) for f in frames] == [
        (OP_TEXT, b"reply"),
        (OP_CLOSE, close_payload(1000, "bye")),
    ]
    assert recorder.of("sent") == [(MessageSent(len("reply")),)]
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.of("close") == [(1000, "bye")]


async def test_a_client_s_close_waits_for_the_handler_of_a_message_parked_behind_a_suspended_one(
    serve: ServeFn, recorder: Recorder
) -> None:
    """The second message waits, parked, for the first one's handler, suspended in the
    coroutine it returned; the client's close comes while the second one's plain handler runs. Its reply goes first. Before, a
    parked message stopped counting as in flight before its handler ran, and the suspended
    handler once it ended: the close was echoed at once, and the reply was dropped."""
    loop = asyncio.get_running_loop()
    first_entered, second_entered, second_go = threading.Event(), threading.Event(), threading.Event()
    release_first = asyncio.Event()

    async def first(ws: brioche.WebSocket[Any]) -> None:
        first_entered.set()
        await release_first.wait()
        recorder.add("sent", "first", ws.send("r1"))

    def on_text(ws: brioche.WebSocket[Any], text: str) -> Awaitable[None] | None:
        if text == "first":
            return first(ws)
        second_entered.set()
        second_go.wait(TIMEOUT)  # the loop is held here while the client closes
        recorder.add("sent", text, ws.send("r2"))
        return None

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))

    def scenario() -> list[Frame]:
        sock = blocking_connect(srv.port)
        try:
            # In one write, so one read and one batch: "second" is parked behind "first".
            sock.sendall(encode_frame(OP_TEXT, b"first") + encode_frame(OP_TEXT, b"second"))
            assert first_entered.wait(TIMEOUT)
            loop.call_soon_threadsafe(release_first.set)
            assert second_entered.wait(TIMEOUT)
            # Answered by the connection as it reads them: the pong says the close was read.
            sock.sendall(encode_frame(OP_PING, b"p") + encode_frame(OP_CLOSE, close_payload(1000, "bye")))
            frames = recv_frames(sock, 2)
            assert [(f.opcode, f.payload) for f in frames] == [(OP_TEXT, b"r1"), (OP_PONG, b"p")]
            second_go.set()
            rest, _ = parse_frames(read_until_eof(sock))
            return frames + rest
        finally:
            second_go.set()
            loop.call_soon_threadsafe(release_first.set)
            sock.close()

    frames = await asyncio.to_thread(scenario)
    assert [(f.opcode, f.payload) for f in frames] == [
        (OP_TEXT, b"r1"),
        (OP_PONG, b"p"),
        (OP_TEXT, b"r2"),
        (OP_CLOSE, close_payload(1000, "bye")),
    ]
    assert recorder.of("sent") == [("first", MessageSent(2)), ("second", MessageSent(2))]
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.of("close") == [(1000, "bye")]


async def test_server_close_code_and_reason_reach_client_and_on_close(
    serve: ServeFn, recorder: Recorder
) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(4001, "bye")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("close me")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(client.recv(), TIMEOUT)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye")
        assert (client.close_code, client.close_reason) == (4001, "bye")
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    assert [code for code, _ in recorder.of("close")] == [4001]


async def test_module_close_function_closes_with_code(serve: ServeFn) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        websocket.close(ws, 4003, "module")

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("close me")
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert (client.close_code, client.close_reason) == (4003, "module")


async def test_terminate_gives_client_1006(serve: ServeFn, recorder: Recorder) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.terminate()

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("die")
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(client.recv(), TIMEOUT)
        assert info.value.rcvd is None  # no close frame came
        assert client.close_code == 1006
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    assert recorder.of("close") == [(1006,)]


async def test_terminate_writes_what_is_queued_first_and_is_closed_at_once(
    serve: ServeFn, recorder: Recorder
) -> None:
    """As Bun's terminate: what was sent and published before it is flushed first (before, it
    was dropped with the queue), and ``ready_state`` is CLOSED from then (it was CLOSING until
    the connection's task ended), with later sends dropped."""
    holder: list[brioche.Server[Any]] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("room")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        sent = [ws.send("one"), ws.send_bytes(b"x" * 2000), holder[0].publish("room", "published")]
        ws.terminate()
        recorder.add("after", sent, ws.ready_state, ws.send("late"), ws.buffered_amount)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text))
    holder.append(srv)
    async with connect(ws_url(srv)) as client:
        await client.send("go")
        got = [await asyncio.wait_for(client.recv(), TIMEOUT) for _ in range(3)]
        assert got == ["one", b"x" * 2000, "published"]
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(client.recv(), TIMEOUT)
        assert info.value.rcvd is None  # no close frame came
    await recorder.wait_for(lambda: bool(recorder.of("after")), TIMEOUT)
    sent = [MessageSent(3), MessageSent(2000), MessageSent(9)]
    assert recorder.of("after") == [(sent, brioche.ReadyState.CLOSED, MessageDropped(), 0)]


async def test_terminate_module_function_gives_1006(serve: ServeFn, recorder: Recorder) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        websocket.terminate(ws)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("die")
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert client.close_code == 1006
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.of("close") == [(1006,)]


# -- control frames --------------------------------------------------------------------------


async def test_server_ping_arrives_as_ping_frame(serve: ServeFn) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        assert ws.ping(b"abc") == MessageSent(3)
        ws.send("after")

    srv = await serve(websocket.init().on_open(on_open))
    reader, writer = await raw_connect(srv)
    try:
        assert await read_frame(reader) == (0x9, b"abc")
        assert await read_frame(reader) == (0x1, b"after")
    finally:
        writer.close()


async def test_server_pong_arrives_as_pong_frame(serve: ServeFn) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        assert ws.pong(b"xyz") == MessageSent(3)
        websocket.pong(ws, "é")
        ws.send("after")

    srv = await serve(websocket.init().on_open(on_open))
    reader, writer = await raw_connect(srv)
    try:
        assert await read_frame(reader) == (0xA, b"xyz")
        assert await read_frame(reader) == (0xA, "é".encode())
        assert await read_frame(reader) == (0x1, b"after")
    finally:
        writer.close()


async def test_raw_client_ping_gets_pong_with_same_payload(serve: ServeFn) -> None:
    srv = await serve(websocket.init())
    reader, writer = await raw_connect(srv)
    try:
        writer.write(client_frame(0x9, b"hey"))
        await writer.drain()
        assert await read_frame(reader) == (0xA, b"hey")
    finally:
        writer.close()


async def test_client_ping_gets_pong(serve: ServeFn) -> None:
    srv = await serve(websocket.init())
    async with connect(ws_url(srv)) as client:
        pong_waiter = await client.ping(b"hey")
        # websockets resolves the waiter only with a pong of the ping's payload.
        await asyncio.wait_for(pong_waiter, TIMEOUT)


# -- handler errors --------------------------------------------------------------------------


async def test_exception_in_on_text_closes_that_connection_with_1011(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "boom":
            recorder.add("repr", repr(ws))
            raise RuntimeError("handler exploded")
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv, "/ws?a")) as bad, connect(ws_url(srv, "/ws?b")) as good:
        bad_port = bad.local_address[1]
        await good.send("before")
        assert await asyncio.wait_for(good.recv(), TIMEOUT) == "before"
        await bad.send("boom")
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(bad.recv(), TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
        await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
        for i in range(3):
            await good.send(f"after {i}")
            assert await asyncio.wait_for(good.recv(), TIMEOUT) == f"after {i}"
    assert recorder.of("close")[0] == ("a", 1011)
    [(bad_repr,)] = recorder.of("repr")
    assert re.fullmatch(rf"<brioche\.WebSocket #\d+ from 127\.0\.0\.1:{bad_port} state=1>", bad_repr), bad_repr
    # The line names the connection, as it was when its handler raised.
    failures = [r for r in caplog.records if r.name == "brioche" and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        f"on_text handler raised for {bad_repr}; closing the connection with 1011"
    ]
    assert failures[0].exc_info is not None and str(failures[0].exc_info[1]) == "handler exploded"


@pytest.mark.parametrize("when", ["before_await", "after_await"])
async def test_exception_in_async_on_text_closes_with_1011(serve: ServeFn, when: str) -> None:
    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "boom":
            if when == "after_await":
                await asyncio.sleep(0)
            raise RuntimeError("async handler exploded")
        await asyncio.sleep(0)
        ws.send(text)

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as bad, connect(ws_url(srv)) as good:
        await bad.send("boom")
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(bad.recv(), TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
        for i in range(3):
            await good.send(f"still {i}")
            assert await asyncio.wait_for(good.recv(), TIMEOUT) == f"still {i}"


async def test_exception_in_async_on_open_closes_with_1011(serve: ServeFn) -> None:
    async def on_open(ws: brioche.WebSocket[Any]) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("open exploded")

    srv = await serve(websocket.init().on_open(on_open))
    async with connect(ws_url(srv)) as client:
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert client.close_code == 1011


# -- ordering --------------------------------------------------------------------------------


async def test_async_handlers_run_one_at_a_time_in_order(serve: ServeFn, recorder: Recorder) -> None:
    count = 60

    async def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open-start")
        for _ in range(3):
            await asyncio.sleep(0)
        recorder.add("open-end")

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        n = int(text)
        recorder.add("start", n)
        if n % 3 == 0:
            await asyncio.sleep(0)
        if n % 7 == 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(fut.set_result, None)
            await fut
        recorder.add("end", n)
        ws.send(text)

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close-start", code)
        await asyncio.sleep(0)
        recorder.add("close-end", code)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        for i in range(count):
            await client.send(str(i))
        received = [await asyncio.wait_for(client.recv(), TIMEOUT) for _ in range(count)]
        assert received == [str(i) for i in range(count)]
    await recorder.wait_for(lambda: bool(recorder.of("close-end")), TIMEOUT)
    await asyncio.wait_for(srv.stop(), TIMEOUT)

    expected: list[tuple[Any, ...]] = [("open-start",), ("open-end",)]
    for i in range(count):
        expected += [("start", i), ("end", i)]
    expected += [("close-start", 1000), ("close-end", 1000)]
    assert recorder.events == expected


async def _wait_until_unregistered(srv: brioche.Server[Any], recorder: Recorder) -> None:
    """Return once the engine has queued every event of the connections that are gone.

    A connection is unregistered only after its close event is queued, so a connection opened
    after ``pending_websockets`` reaches 0 has its open event queued behind those: seeing that
    open in a handler means Python has taken the earlier close event off the queue.
    """
    for _ in range(1000):  # bounded: at most ~5 s
        if srv.pending_websockets == 0:
            break
        await asyncio.sleep(0.005)
    assert srv.pending_websockets == 0
    async with connect(ws_url(srv, "/ws?barrier")):
        await recorder.wait_for(lambda: ("open", "barrier") in recorder.events, TIMEOUT)


@pytest.mark.parametrize("how", ["client_close", "server_terminate"])
async def test_on_close_waits_for_a_suspended_handler(serve: ServeFn, recorder: Recorder, how: str) -> None:
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws.data)

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("start", ws.data, text)
        if how == "server_terminate":
            ws.terminate()
        await release
        recorder.add("end", ws.data, text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv, "/ws?a")) as client:
        # After terminate nothing more is read, so that case sends just one message.
        messages = ["1", "2"] if how == "client_close" else ["1"]
        for message in messages:
            await client.send(message)
        await recorder.wait_for(lambda: ("start", "a", "1") in recorder.events, TIMEOUT)
        if how == "client_close":
            await client.close(4000, "early")
        else:
            await asyncio.wait_for(client.wait_closed(), TIMEOUT)
    await _wait_until_unregistered(srv, recorder)
    assert not release.done()
    assert [e for e in recorder.events if e[1] == "a"] == [("open", "a"), ("start", "a", "1")]
    release.set_result(None)
    await recorder.wait_for(lambda: any(e[0] == "close" and e[1] == "a" for e in recorder.events), TIMEOUT)
    code = 4000 if how == "client_close" else 1006
    expected: list[tuple[Any, ...]] = [("open", "a")]
    for message in messages:
        expected += [("start", "a", message), ("end", "a", message)]
    expected.append(("close", "a", code))
    assert [e for e in recorder.events if e[1] == "a"] == expected


async def test_exception_in_on_close_is_logged_and_server_keeps_working(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, repr(ws))
        raise RuntimeError("close exploded")

    caplog.set_level(logging.ERROR, logger="brioche")
    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        first_port = client.local_address[1]
        await client.close(4000, "x")
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    async with connect(ws_url(srv)) as client:
        await client.send("again")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "again"
    # The second client's on_close raises too, maybe after these lines: the first is checked.
    _, closed_repr = recorder.of("close")[0]
    assert re.fullmatch(rf"<brioche\.WebSocket #\d+ from 127\.0\.0\.1:{first_port} state=3>", closed_repr), closed_repr
    failures = [r for r in caplog.records if r.name == "brioche" and r.levelno == logging.ERROR]
    assert failures[0].getMessage() == f"on_close handler raised for {closed_repr}"
    assert failures[0].exc_info is not None and str(failures[0].exc_info[1]) == "close exploded"


async def test_plain_sync_handlers_work(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open")
        ws.send("welcome")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text)
        ws.send(text.upper())

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("bytes", data)
        ws.send_bytes(data[::-1])

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    config = websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes).on_close(on_close)
    srv = await serve(config)
    async with connect(ws_url(srv)) as client:
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "welcome"
        await client.send("abc")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "ABC"
        await client.send(b"\x01\x02\x03")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == b"\x03\x02\x01"
        await client.close(1000, "fine")
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.events == [("open",), ("text", "abc"), ("bytes", b"\x01\x02\x03"), ("close", 1000, "fine")]


async def test_module_function_style_works(serve: ServeFn, recorder: Recorder) -> None:
    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("status", websocket.send(ws, f"{websocket.data(ws)}:{text}"))

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("status", websocket.send_bytes(ws, data))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    config = websocket.on_close(websocket.on_bytes(websocket.on_text(websocket.init(), on_text), on_bytes), on_close)
    srv = await serve(config)
    async with connect(ws_url(srv, "/ws?ctx")) as client:
        await client.send("hi")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "ctx:hi"
        await client.send(b"\x00\xff")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == b"\x00\xff"
        await client.close(4010, "module style")
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.events == [("status", MessageSent(6)), ("status", MessageSent(2)), ("close", 4010, "module style")]


# -- argument validation ---------------------------------------------------------------------


async def _run_in_on_text(serve: ServeFn, action: Any) -> tuple[str, Any]:
    """Run ``action(ws)`` inside on_text; return ("ok", result) or ("raised", exception type)."""
    outcome: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "act":
            try:
                outcome.set_result(("ok", action(ws)))
            except Exception as exc:
                outcome.set_result(("raised", type(exc)))
        ws.send(f"open:{ws.ready_state}")

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("act")
        result = await asyncio.wait_for(outcome, TIMEOUT)
        # A rejected call must leave the connection open and usable.
        if result[0] == "raised":
            assert await asyncio.wait_for(client.recv(), TIMEOUT) == "open:1"
    return result


@pytest.mark.parametrize("code", [999, 1004, 1015, 2999, 5000])
async def test_close_with_invalid_code_raises_value_error(serve: ServeFn, code: int) -> None:
    assert await _run_in_on_text(serve, lambda ws: ws.close(code, "")) == ("raised", ValueError)


@pytest.mark.parametrize(
    "args",
    [(), (0, "dropped with the code"), (1005, "dropped with the code"), (1006, "dropped")],
    ids=["no-arguments", "0", "1005", "1006"],
)
async def test_what_a_close_sends_and_on_close_gets(
    serve: ServeFn, recorder: Recorder, args: tuple[Any, ...]
) -> None:
    """``close()`` sends 1000 and no reason. 0, 1005 and 1006, as in Bun's close, send a frame
    without a code (nor the reason), so a code on_close got can be passed on as it is (they were
    a ValueError); websockets, and on_close after its echo, read such a frame as 1005."""

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(*args)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    expected = (1000, "") if not args else (1005, "")
    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        received = client.protocol.close_rcvd
        assert received is not None  # a close frame came
        assert (received.code, received.reason) == expected
    await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
    assert recorder.of("close") == [expected]


@pytest.mark.parametrize("code", [-1, 65536, 2**70])
async def test_close_code_outside_16_bits_is_the_same_value_error(serve: ServeFn, code: int) -> None:
    # Not an OverflowError, which `except ValueError` would let through.
    assert await _run_in_on_text(serve, lambda ws: ws.close(code, "")) == ("raised", ValueError)


@pytest.mark.parametrize("code", [True, 1000.0, "1000"])
async def test_close_code_that_is_not_an_int_raises_type_error(serve: ServeFn, code: object) -> None:
    assert await _run_in_on_text(serve, lambda ws: ws.close(code, "")) == ("raised", TypeError)


async def test_close_takes_a_close_code_member_and_defaults_to_1000(serve: ServeFn) -> None:
    codes = iter([websocket.CloseCode.GOING_AWAY, None])

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        code = next(codes)
        if code is None:
            ws.close()
        else:
            ws.close(code)

    srv = await serve(websocket.init().on_text(on_text))
    for expected in (1001, 1000):
        async with connect(ws_url(srv)) as client:
            await client.send("x")
            await asyncio.wait_for(client.wait_closed(), TIMEOUT)
            assert (client.close_code, client.close_reason) == (expected, "")


@pytest.mark.parametrize(
    ("reason", "sent"),
    [
        ("é" * 61 + "x", "é" * 61 + "x"),
        ("é" * 62, "é" * 61),
        ("x" * 200, "x" * 123),
        ("x" + "✓" * 41, "x" + "✓" * 40),
    ],
    ids=["exactly-123-bytes", "124-bytes-of-2-byte-characters", "200-ascii",
         "124-bytes-ending-in-3-byte-characters"],
)
async def test_a_close_reason_over_123_bytes_is_cut_at_a_character_boundary(
    serve: ServeFn, reason: str, sent: str
) -> None:
    """As Bun's close cuts it: to the 123 bytes a close frame has room for, whole characters
    only. It was a ValueError, which turned a close made with an error message into an error."""

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(4000, reason)

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert (client.close_code, client.close_reason) == (4000, sent)
    assert 120 < len(sent.encode()) <= 123


async def test_close_with_1014_reaches_the_client(serve: ServeFn) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(1014, "bad gateway")

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert (client.close_code, client.close_reason) == (1014, "bad gateway")


@pytest.mark.parametrize("method", ["ping", "pong"])
async def test_control_payload_over_125_bytes_raises_value_error(serve: ServeFn, method: str) -> None:
    payload = b"p" * 126
    assert await _run_in_on_text(serve, lambda ws: getattr(ws, method)(payload)) == ("raised", ValueError)


@pytest.mark.parametrize("method", ["ping", "pong"])
async def test_control_payload_of_125_bytes_is_sent(serve: ServeFn, method: str) -> None:
    payload = b"p" * 125
    assert await _run_in_on_text(serve, lambda ws: getattr(ws, method)(payload)) == ("ok", MessageSent(125))


async def test_a_message_of_the_wrong_type_is_named_by_the_call_that_refused_it(
    serve: ServeFn, recorder: Recorder
) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        for call in (ws.send, ws.ping, ws.pong):
            try:
                call(1)  # type: ignore[arg-type]
            except TypeError as exc:
                recorder.add("refused", str(exc))
        # A str, which `send` and `publish` would take, is the likely mistake here.
        bytes_only: tuple[Callable[[Any], object], ...] = (
            ws.send_bytes, lambda text: ws.publish_bytes("topic", text)
        )
        for send in bytes_only:
            try:
                send("text")
            except TypeError as exc:
                recorder.add("refused", str(exc))
        # A released memoryview is bytes-like, but unreadable: its own ValueError, not a
        # TypeError saying that it is of the wrong type.
        released = memoryview(b"gone")
        released.release()
        any_payload: tuple[Callable[[Any], object], ...] = (
            ws.send, ws.send_bytes, ws.ping, lambda view: ws.publish("topic", view)
        )
        for send in any_payload:
            try:
                send(released)
            except ValueError as exc:
                recorder.add("released", str(exc))
        # Any bytes-like payload is taken, as send takes it.
        recorder.add("sent", ws.ping(bytearray(b"pi")), ws.pong(memoryview(b"po")))
        ws.send("done")

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "done"
    assert recorder.events == [
        ("refused", f"{name}() takes a str or a bytes-like object, got int") for name in ("send", "ping", "pong")
    ] + [
        ("refused", f"{name}() takes a bytes-like object, got str") for name in ("send_bytes", "publish_bytes")
    ] + [("released", "operation forbidden on released memoryview object")] * 4 + [
        ("sent", MessageSent(2), MessageSent(2))
    ]


async def test_send_after_close_returns_message_dropped(serve: ServeFn, recorder: Recorder) -> None:
    sockets: list[brioche.WebSocket[Any]] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        sockets.append(ws)
        ws.close(1000, "closing")
        recorder.add("after-close", ws.send("late"), ws.send_bytes(b"late"), ws.ping(b""), ws.pong(b""))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("in-on-close", ws.send("late"), websocket.send_bytes(ws, b"late"))

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.recv(), TIMEOUT)  # no "late" message arrives first
        assert client.close_code == 1000
    await recorder.wait_for(lambda: bool(recorder.of("in-on-close")), TIMEOUT)
    dropped = MessageDropped()
    assert recorder.of("after-close") == [(dropped, dropped, dropped, dropped)]
    assert recorder.of("in-on-close") == [(dropped, dropped)]
    assert sockets[0].send("later still") == dropped


def reset_by_peer(sock: socket.socket, data: bytes) -> bool:
    """In a thread, after the peer's FIN: write ``data``; whether the peer answers with a reset
    (it no longer holds the connection: the socket goes from CLOSE_WAIT to CLOSE) within 1 s."""
    assert tcp_state(sock) == TCP_CLOSE_WAIT
    sock.sendall(data)
    for _ in range(100):  # recv() reports nothing after a FIN: poll the state for the RST
        if tcp_state(sock) == TCP_CLOSE:
            return True
        time.sleep(0.01)
    return False


async def test_client_that_never_answers_the_close_frame_is_cut_after_the_close_timeout(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's close frame goes unanswered: 5 s later (the close timeout) the server lets
    go of the connection, the client's read meets the end of the stream only then, and on_close
    reports 1006, not the code it sent. A frame the client writes after that is answered with
    a reset. The cut is logged, as an idle timeout is (it was not)."""
    caplog.set_level(logging.INFO, logger="brioche")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(4001, "bye")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    sock = await asyncio.to_thread(blocking_connect, srv.port)
    client_port = sock.getsockname()[1]
    try:
        await asyncio.to_thread(sock.sendall, encode_frame(OP_TEXT, b"close me"))
        start = time.monotonic()
        # Reads, never answers: the end of the stream comes at the close timeout, not with the
        # close frame (it came with it until the server waited for the closing handshake).
        data = await asyncio.to_thread(read_until_eof, sock, TIMEOUT + 5)
        eof_after = time.monotonic() - start
        assert eof_after >= 4.5, f"the end of the stream came {eof_after:.2f} s after the close"
        frames, tail = parse_frames(data)
        assert [(f.opcode, f.close_code, f.close_reason) for f in frames] == [(OP_CLOSE, 4001, "bye")]
        assert tail == b""
        await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT + 3)
        elapsed = time.monotonic() - start
        assert 4.5 <= elapsed <= 6.5, f"on_close after {elapsed:.2f}s"
        assert recorder.of("close") == [(1006, "")]
        assert await asyncio.to_thread(reset_by_peer, sock, encode_frame(OP_CLOSE, close_payload(4001)))
    finally:
        sock.close()
    assert log_lines(caplog, "brioche.ws") == [(
        logging.INFO,
        f"closed the connection from 127.0.0.1:{client_port} (1006): no answer to the close frame within the close "
        "timeout",
    )]
