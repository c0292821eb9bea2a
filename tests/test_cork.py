"""ws.cork(callback): runs the callback, returns its result, and writes what it sent in one go."""

from __future__ import annotations

import asyncio
import queue
import socket
import time
from typing import Any

import pytest

import brioche
from brioche import MessageBackpressured, MessageSent, server, websocket
from conftest import Recorder, ServeFn
from rawws import OP_BINARY, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, blocking_connect, encode_frame, parse_frames

PONG_SIZE = 4  # an unmasked pong echoing a 2-byte ping payload


class PingBarrier:
    """Between two sends inside a cork, make the server's connection task write on its own.

    The callback blocks the loop; a client thread sends a ping, whose pong the server's task
    queues after the frames sent so far and then flushes at once. Corked, that flush writes
    nothing and ``buffered_amount`` grows by the pong; uncorked (or an inner uncork that let go
    of the outer cork), the queue goes out and the first frame reaches the client alone. In a
    handler the sends are deferred to the end of the batch anyway: the pong's flush is the one
    write that a cork must hold back.
    """

    def __init__(self) -> None:
        self.requests: queue.Queue[bytes] = queue.Queue()
        self.pings = [b"p1", b"p2"]

    def __call__(self, ws: brioche.WebSocket[Any]) -> None:
        before = ws.buffered_amount
        self.requests.put(b"ping now")
        for _ in range(5000):  # at most 5 s, polled: the pong has no event on the loop thread
            if ws.buffered_amount in (0, before + PONG_SIZE):
                return
            time.sleep(0.001)
        raise AssertionError(f"the server never queued the pong ({ws.buffered_amount} bytes queued)")

    def client(self, sock: socket.socket, trigger: bytes) -> bytes:
        """In a thread: send ``trigger``, a ping per barrier, then one blocking recv."""
        sock.settimeout(5)
        sock.sendall(trigger)
        for payload in self.pings:
            self.requests.get(timeout=5)
            sock.sendall(encode_frame(OP_PING, payload))
        return sock.recv(65536)


def send_three(ws: brioche.WebSocket[Any], barrier: PingBarrier) -> list[Any]:
    statuses = [ws.send("one")]
    barrier(ws)
    statuses.append(ws.send("two"))
    barrier(ws)
    statuses.append(ws.send_bytes(b"three"))
    return statuses


def send_three_nested(ws: brioche.WebSocket[Any], barrier: PingBarrier) -> list[Any]:
    statuses = [ws.send("one")]
    barrier(ws)
    statuses.append(websocket.cork(ws, lambda w: w.send("two")))  # the inner uncork flushes nothing
    barrier(ws)
    statuses.append(ws.send_bytes(b"three"))
    return statuses


def send_three_with_a_publish(ws: brioche.WebSocket[Any], barrier: PingBarrier) -> list[Any]:
    statuses = [ws.send("one")]
    barrier(ws)
    statuses.append(ws.data.publish("t", "two"))  # reaches ws, which is subscribed: corked too
    barrier(ws)
    statuses.append(ws.send_bytes(b"three"))
    return statuses


@pytest.mark.parametrize("where", ["task", "handler", "nested", "publish"])
async def test_frames_sent_inside_cork_arrive_in_one_write(
    serve: ServeFn, recorder: Recorder, where: str
) -> None:
    tasks: set[asyncio.Task[None]] = set()
    barrier = PingBarrier()

    async def later(ws: brioche.WebSocket[Any]) -> None:
        await asyncio.sleep(0)  # outside any handler now
        recorder.add("statuses", ws.cork(lambda w: send_three(w, barrier)))

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if where == "task":
            task = asyncio.get_running_loop().create_task(later(ws))
            tasks.add(task)
        elif where == "handler":
            recorder.add("statuses", ws.cork(lambda w: send_three(w, barrier)))
        elif where == "nested":
            recorder.add("statuses", ws.cork(lambda w: send_three_nested(w, barrier)))
        else:
            ws.subscribe("t")
            recorder.add("statuses", ws.cork(lambda w: send_three_with_a_publish(w, barrier)))

    async def upgrade_with_server(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        return server.upgrade(srv, request, [], srv, server.bad_request)  # ws.data is the server

    srv = await serve(websocket.init().on_text(on_text), handler=upgrade_with_server)
    sock = await asyncio.to_thread(blocking_connect, srv.port)
    try:
        data = await asyncio.to_thread(barrier.client, sock, encode_frame(OP_TEXT, b"go"))
    finally:
        sock.close()
    frames, tail = parse_frames(data)
    assert [(f.opcode, f.payload) for f in frames] == [
        (OP_TEXT, b"one"), (OP_PONG, b"p1"), (OP_TEXT, b"two"), (OP_PONG, b"p2"), (OP_BINARY, b"three")
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


async def test_an_async_callback_is_a_type_error_not_sends_lost_silently(
    serve: ServeFn, recorder: Recorder
) -> None:
    """An ``async def`` callback's body has not run when cork returns: before, cork returned its
    coroutine, nothing was sent and nothing said so (but a "never awaited" warning at collection)."""

    async def callback(ws: brioche.WebSocket[Any]) -> None:
        ws.send("never")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        for cork in (ws.cork, lambda cb: websocket.cork(ws, cb)):
            try:
                cork(callback)
            except TypeError as exc:
                recorder.add("refused", str(exc))
        ws.send("after")

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("go")
        assert (await client.recv_frame()).payload == b"after"
    message = ("cork: the callback is a coroutine function, whose body would run after the cork "
               "(if at all); cork a plain function, and await outside it")
    assert recorder.of("refused") == [(message,), (message,)]


async def test_terminate_inside_a_cork_still_writes_what_was_sent_first(serve: ServeFn) -> None:
    """terminate() writes what was queued before it (as Bun's), the cork's frames included: the
    cork held them back from that write, and the end then freed them unsent."""

    def corked(ws: brioche.WebSocket[Any]) -> None:
        ws.send("one")
        ws.send_bytes(b"two")
        ws.terminate()

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.cork(corked)

    srv = await serve(websocket.init().on_text(on_text))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("go")
        frames, how = await client.frames_until_end()
    assert [(f.opcode, f.payload) for f in frames] == [(OP_TEXT, b"one"), (OP_BINARY, b"two")]
    assert how == "eof"


async def test_a_cork_whose_last_send_passes_the_limit_still_gets_its_on_drain(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Eight sends of 8 KiB in a cork, with a limit of 64 KiB: the fifth passes the high-water
    mark (Backpressured from then on), and the eighth the limit, so the queue is written at once,
    inside the cork, and the kernel takes it all. The congestion those statuses reported is
    over: ``on_drain`` follows, and a send from it is Sent. With the first version of the
    cork's overflow, the uncork found the queue empty and owed no flush, and only a flush
    clears the congestion: no ``on_drain``, and every later send Backpressured with nothing
    queued."""

    def burst(ws: brioche.WebSocket[Any]) -> list[object]:
        return [ws.send_bytes(bytes([i]) * 8192) for i in range(8)]

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("statuses", ws.cork(burst))

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("drain", ws.buffered_amount, ws.send("after"))

    srv = await serve(websocket.init().on_text(on_text).on_drain(on_drain).backpressure_limit(65536))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_text("go")
        frames = [await client.recv_frame(timeout=5) for _ in range(9)]
    assert [(f.opcode, f.payload) for f in frames] == [
        *((OP_BINARY, bytes([i]) * 8192) for i in range(8)), (OP_TEXT, b"after")
    ]
    assert recorder.of("statuses") == [([MessageSent(8192)] * 4 + [MessageBackpressured()] * 4,)]
    assert recorder.of("drain") == [(0, MessageSent(5))]
