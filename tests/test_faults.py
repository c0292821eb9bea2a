"""Faults: clients that vanish, handlers that raise, block or never return, stop() mid-stream.

In every test another client keeps being served, and checks an echo at the end.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

import brioche
from brioche import MessageBackpressured, MessageDropped, MessageSent, server, websocket
from conftest import Recorder, ServeFn, echo, ws_url
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    RawWebSocket,
    blocking_connect,
    close_payload,
    encode_frame,
    holders_of_server_end,
    numbered,
    parse_frames,
    poll_until,
    tcp_state,
)

TIMEOUT = 5
ACCEPTED = (MessageSent, MessageBackpressured)

def seen(recorder: Recorder, kind: str, data: Any) -> list[tuple[Any, ...]]:
    return [e[1:] for e in recorder.of(kind) if e[0] == data]

def recording_echo(recorder: Recorder) -> websocket.Config[Any]:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws.data, ws)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code, reason)

    return websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes).on_close(on_close)

def rst_close(client: RawWebSocket) -> None:
    """Close the client's socket with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = client.writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()

# -- a client vanishing mid-frame ------------------------------------------------------------

HALF_FRAMES = {
    "half-a-header": encode_frame(OP_BINARY, b"x" * 300)[:3],
    "before-the-mask-key": encode_frame(OP_BINARY, b"x" * 300)[:5],
    "half-the-payload": encode_frame(OP_BINARY, b"x" * 300)[:150],
    "half-a-fragmented-message": encode_frame(OP_TEXT, b"first", fin=False),
    "half-a-close-frame": encode_frame(OP_CLOSE, close_payload(1000, "bye"))[:6],
}

@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("half", list(HALF_FRAMES.values()), ids=list(HALF_FRAMES))
async def test_client_vanishing_mid_frame_gives_one_on_close_with_1006(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, half: bytes, how: str
) -> None:
    srv = await serve(recording_echo(recorder))
    bystander = await bystander_of(srv)
    client = await RawWebSocket.connect(srv.port, "/ws?vanishing")
    await client.send_frame(OP_TEXT, b"complete message")
    assert (await client.recv_data_frame()).payload == b"complete message"
    await client.send_raw(half)
    if how == "rst":
        rst_close(client)
    else:
        client.close()
    await recorder.wait_for(lambda: bool(seen(recorder, "close", "vanishing")))
    await echo(bystander, "bystander after")
    assert srv.pending_websockets == 1  # only the bystander
    # Stopping waits for every connection's task, and on_close comes before Stopped: any second
    # on_close for the vanished client would be recorded by now.
    await asyncio.wait_for(srv.stop(close_active_connections=True), 10)
    assert seen(recorder, "close", "vanishing") == [(1006, "")]
    assert len(seen(recorder, "open", "vanishing")) == 1

# -- a client vanishing during the handshake -------------------------------------------------

UPGRADE = ("GET /ws?{} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

async def test_clients_vanishing_during_the_handshake_leave_nothing_behind(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    """Reset right after the request, and reset while an async HTTP handler is deciding: no
    socket may open without closing, and none counts in pending_websockets, even for a moment."""
    entered: asyncio.Queue[str] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.query.startswith("held"):
            entered.put_nowait(request.query)
            await release.wait()
        return server.upgrade(srv, request, [], request.query, server.bad_request)

    srv = await serve(recording_echo(recorder), handler=handler)
    bystander = await bystander_of(srv)
    loop = asyncio.get_running_loop()
    # pending_websockets, read on every turn of the loop from the first reset to the end: a
    # connection whose client left before its 101 never counts, not even between the handler's
    # upgrade and the write of the 101 that fails.
    counts: set[int] = set()
    sampling = asyncio.Event()

    async def sample() -> None:
        for _ in range(1_000_000):
            counts.add(srv.pending_websockets)
            if sampling.is_set():
                return
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())

    async def request_then_reset(query: str, wait_for_handler: bool) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", srv.port)), TIMEOUT)
            await loop.sock_sendall(sock, UPGRADE.format(query).encode())
            if wait_for_handler:
                assert await asyncio.wait_for(entered.get(), TIMEOUT) == query
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    for i in range(100):
        await request_then_reset(f"fast{i}", wait_for_handler=False)
    for i in range(30):
        await request_then_reset(f"held{i}", wait_for_handler=True)
    release.set()
    await echo(bystander, "bystander after")
    sampling.set()
    await sampler
    assert counts == {1}, "only the bystander counts"
    await asyncio.wait_for(srv.stop(close_active_connections=True), 10)
    opened = [e[0] for e in recorder.of("open") if e[0] != "bystander"]
    closed = [e[0] for e in recorder.of("close") if e[0] != "bystander"]
    assert sorted(opened) == sorted(closed), "every socket that opened was closed exactly once"

async def test_the_data_of_an_upgrade_whose_client_left_is_released(serve: ServeFn) -> None:
    """A client resets while an async HTTP handler is deciding, and the handler then upgrades
    with some `data`: the connection never opens, and nothing keeps `data`. Before, when the
    upgrade's answer reached hyper only after it had seen the reset, the request's future was
    dropped with the answer unread, and `data` and the context stayed in the engine for ever."""
    import weakref

    from rawws import poll_until

    class Token:
        pass

    entered: asyncio.Queue[str] = asyncio.Queue()
    release = asyncio.Event()
    tokens: list[weakref.ref[Token]] = []
    upgraded: list[bool] = []

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        entered.put_nowait(request.query)
        await release.wait()
        token = Token()
        tokens.append(weakref.ref(token))
        upgraded.append(srv.upgrade(request, data=token))
        return None if upgraded[-1] else server.bad_request()

    srv = await serve(websocket.init(), handler=handler)
    loop = asyncio.get_running_loop()
    for i in range(10):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", srv.port)), TIMEOUT)
            await loop.sock_sendall(sock, UPGRADE.format(f"left{i}").encode())
            assert await asyncio.wait_for(entered.get(), TIMEOUT) == f"left{i}"
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    release.set()
    assert await poll_until(lambda: len(upgraded) == 10, TIMEOUT), upgraded
    assert await poll_until(lambda: all(token() is None for token in tokens), TIMEOUT), (
        f"{sum(token() is not None for token in tokens)} of 10 kept; upgrade returned {upgraded}")
    assert srv.pending_websockets == 0


# -- handlers that raise ---------------------------------------------------------------------

@pytest.mark.parametrize("style", ["sync", "async-before-suspending", "async-after-suspending"])
async def test_handler_that_raises_closes_only_its_connection_with_1011(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, caplog: pytest.LogCaptureFixture, style: str
) -> None:
    def boom_sync(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "boom":
            raise RuntimeError("handler failure")
        ws.send(text)

    async def boom_async(ws: brioche.WebSocket[Any], text: str) -> None:
        if style == "async-after-suspending":
            await asyncio.sleep(0)
        if text == "boom":
            raise RuntimeError("handler failure")
        ws.send(text)

    config = recording_echo(recorder).on_text(boom_sync if style == "sync" else boom_async)
    srv = await serve(config)
    bystander = await bystander_of(srv)
    caplog.set_level(logging.ERROR, logger="brioche")
    async with connect(ws_url(srv, "/ws?victim"), open_timeout=TIMEOUT) as victim:
        await echo(victim, "fine")
        await victim.send("boom")
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(victim.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    await recorder.wait_for(lambda: bool(seen(recorder, "close", "victim")))
    assert [c[0] for c in seen(recorder, "close", "victim")] == [1011]
    assert any("handler failure" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    for i in range(20):
        await echo(bystander, f"bystander {i}")
    assert seen(recorder, "close", "bystander") == []

# -- a handler that blocks the loop ----------------------------------------------------------

BLOCK_SECONDS = 1.0
MESSAGES_DURING_BLOCK = 300

def read_echoes(sock: socket.socket, count: int, deadline: float) -> tuple[list[bytes], float]:
    """Read ``count`` data frames on a blocking socket; their payloads and when the first came."""
    buf = b""
    payloads: list[bytes] = []
    first_at = 0.0
    for _ in range(100_000):
        if len(payloads) >= count:
            break
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection ended after {len(payloads)} echoes")
        if not first_at:
            first_at = time.monotonic()
        buf += chunk
        frames, buf = parse_frames(buf)
        payloads += [f.payload for f in frames if f.opcode not in (OP_PING, OP_PONG)]
    return payloads, first_at

async def test_handler_blocking_the_loop_delays_other_clients_without_loss_or_reordering(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    blocking = threading.Event()
    unblocked_at: list[float] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "block":
            blocking.set()
            time.sleep(BLOCK_SECONDS)  # a sync handler hogging the event loop
            unblocked_at.append(time.monotonic())
        ws.send(text)

    srv = await serve(recording_echo(recorder).on_text(on_text))
    bystander = await bystander_of(srv)
    # Thread clients: the test's own asyncio clients share the loop the handler blocks.
    socks = [await asyncio.to_thread(blocking_connect, srv.port, f"/ws?thread{i}") for i in range(3)]

    def client(sock: socket.socket, name: str) -> tuple[list[bytes], float]:
        assert blocking.wait(TIMEOUT), "the blocking handler never ran"
        # Everything is sent while the loop is blocked.
        sock.sendall(b"".join(encode_frame(OP_TEXT, f"{name} {i}".encode()) for i in range(MESSAGES_DURING_BLOCK)))
        return read_echoes(sock, MESSAGES_DURING_BLOCK, time.monotonic() + 30)

    try:
        results = [asyncio.to_thread(client, sock, f"t{i}") for i, sock in enumerate(socks)]
        gathered = asyncio.gather(*results)
        async with connect(ws_url(srv, "/ws?blocker"), open_timeout=TIMEOUT) as blocker:
            await blocker.send("block")
            assert await asyncio.wait_for(blocker.recv(), TIMEOUT + BLOCK_SECONDS) == "block"
        outcomes = await asyncio.wait_for(gathered, 40)
    finally:
        for sock in socks:
            sock.close()
    for i, (payloads, first_at) in enumerate(outcomes):
        assert payloads == [f"t{i} {n}".encode() for n in range(MESSAGES_DURING_BLOCK)]
        assert first_at >= unblocked_at[0], "an echo was sent while the loop was blocked"
    await echo(bystander, "bystander after")

# -- a handler that never returns -------------------------------------------------------------

async def test_handler_that_never_returns_holds_back_only_its_own_connection(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    never = asyncio.Event()
    handled: list[tuple[str, str]] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        handled.append((ws.data, text))
        if text == "hang":
            await never.wait()
        ws.send(text)

    srv = await serve(recording_echo(recorder).on_text(on_text))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?stuck") as stuck:
        await stuck.send_text("hang")
        # More than the 64 events that may be parked: the server stops reading this socket.
        for i in range(100):
            await stuck.send_text(f"later {i}")
        # Other connections: a new one and the bystander are unaffected.
        async with connect(ws_url(srv, "/ws?other"), open_timeout=TIMEOUT) as other:
            for i in range(200):
                await echo(other, f"other {i}")
                if i % 20 == 0:
                    await echo(bystander, f"bystander {i}")
        # The stuck connection's later messages wait: no handler saw them, and once released
        # "hang"'s answer comes first (below).
        assert [t for who, t in handled if who == "stuck"] == ["hang"]
        assert srv.pending_websockets == 2  # stuck and the bystander
        # Released, everything it held back follows in order.
        never.set()
        for expected in ["hang", *(f"later {i}" for i in range(100))]:
            frame = await stuck.recv_data_frame(timeout=TIMEOUT)
            assert (frame.opcode, frame.payload) == (OP_TEXT, expected.encode())
    await echo(bystander, "bystander after")

# -- stop() while messages are in flight ------------------------------------------------------

async def read_all_then_answer_close(client: RawWebSocket, timeout: float = 30) -> tuple[list[bytes], int | None, str]:
    """Read every frame, answer the server's close frame, then read to EOF.

    Returns the data payloads, the close code (None without a close frame) and how it ended.
    """
    payloads: list[bytes] = []
    code: int | None = None

    async def loop() -> str:
        nonlocal code
        for _ in range(1_000_000):
            frame = await client._recv_frame()
            if frame.opcode == OP_CLOSE:
                code = frame.close_code
                await client.send_close(code or 1000)
                _, how = await client.frames_until_end(TIMEOUT)
                return how
            if frame.opcode in (OP_TEXT, OP_BINARY):
                payloads.append(frame.payload)
        raise AssertionError("too many frames")

    how = await asyncio.wait_for(loop(), timeout)
    return payloads, code, how

async def wait_open(recorder: Recorder, data: str) -> brioche.WebSocket[Any]:
    await recorder.wait_for(lambda: bool(seen(recorder, "open", data)))
    return seen(recorder, "open", data)[0][0]  # type: ignore[no-any-return]

@pytest.mark.parametrize("count,size", [(2000, 4096), (200, 64 * 1024)])
async def test_stop_closing_connections_delivers_every_accepted_message_then_1001(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, count: int, size: int
) -> None:
    srv = await serve(recording_echo(recorder))
    bystander = await bystander_of(srv)
    client = await RawWebSocket.connect(srv.port, "/ws?reader", rcvbuf=64 * 1024, limit=64 * 1024)
    try:
        ws = await wait_open(recorder, "reader")
        client.pause_reading()  # the client lags: much of what is sent is still queued at stop()
        statuses = [ws.send_bytes(numbered(i, size)) for i in range(count)]
        assert ws.buffered_amount > 0
        stopping = asyncio.ensure_future(srv.stop(close_active_connections=True))
        await asyncio.sleep(0)  # one loop step: the task runs stop()'s synchronous start
        assert ws.ready_state == 2, "stop(close_active_connections=True) started the close"
        late = ws.send_bytes(b"after stop")
        client.resume_reading()
        payloads, code, how = await read_all_then_answer_close(client)
        await asyncio.wait_for(stopping, 10)
    finally:
        client.close()
    accepted = [numbered(i, size) for i, s in enumerate(statuses) if isinstance(s, ACCEPTED)]
    assert len(accepted) == count, "under the default 16 MiB limit nothing is dropped"
    assert payloads == accepted, f"got {len(payloads)} of {len(accepted)} accepted messages"
    assert code == 1001
    assert late == MessageDropped()
    assert [c[0] for c in seen(recorder, "close", "reader")] == [1001]
    await assert_closed_with_1001(bystander)

async def assert_closed_with_1001(client: ClientConnection) -> None:
    """A well-behaved client was served to the end: a clean close with 1001 from stop()."""
    await asyncio.wait_for(client.wait_closed(), TIMEOUT)
    assert client.close_code == 1001

async def test_stop_closing_connections_while_handlers_echo_loses_no_accepted_echo(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    statuses: list[tuple[str, object]] = []
    stop_task: list[asyncio.Future[None]] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        statuses.append((text, ws.send(text)))
        if len(statuses) == 150:
            stop_task.append(asyncio.ensure_future(srv.stop(close_active_connections=True)))

    srv = await serve(recording_echo(recorder).on_text(on_text))
    bystander = await bystander_of(srv)
    statuses.clear()  # the bystander's first echo
    client = await RawWebSocket.connect(srv.port, "/ws?echoing")
    try:
        await client.send_raw(b"".join(encode_frame(OP_TEXT, f"m{i}".encode()) for i in range(500)))
        payloads, code, how = await read_all_then_answer_close(client)
        await recorder.wait_for(lambda: bool(stop_task))
        await asyncio.wait_for(stop_task[0], 10)
    finally:
        client.close()
    accepted = [text.encode() for text, status in statuses if isinstance(status, ACCEPTED)]
    # At most 128 messages wait for the loop per connection, so stop() lands mid-stream.
    assert 150 <= len(accepted) < len(statuses) == 500
    assert payloads == accepted
    assert code == 1001
    assert all(isinstance(s, MessageDropped) for _, s in statuses[len(accepted):])
    await assert_closed_with_1001(bystander)

async def test_stop_without_closing_lets_a_reading_client_get_everything(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    srv = await serve(recording_echo(recorder))
    bystander = await bystander_of(srv)
    client = await RawWebSocket.connect(srv.port, "/ws?reader", rcvbuf=64 * 1024, limit=64 * 1024)
    try:
        ws = await wait_open(recorder, "reader")
        client.pause_reading()
        statuses = [ws.send_bytes(numbered(i, 4096)) for i in range(2000)]
        stopping = asyncio.ensure_future(srv.stop())
        client.resume_reading()
        payloads = [(await client.recv_data_frame(TIMEOUT)).payload for _ in range(2000)]
        assert not stopping.done(), "stop() waits for open connections to end"
        assert ws.send("still open after stop()") == MessageSent(23)
        assert (await client.recv_data_frame(TIMEOUT)).payload == b"still open after stop()"
        await echo(bystander, "bystander served while stopping")
        await bystander.close()
        await client.send_close(1000)
        close = await client.expect_close_then_eof()
        assert close.close_code == 1000
        await asyncio.wait_for(stopping, 10)
    finally:
        client.close()
    assert all(isinstance(s, ACCEPTED) for s in statuses)
    assert payloads == [numbered(i, 4096) for i in range(2000)]
    assert [c[0] for c in seen(recorder, "close", "reader")] == [1000]


def send_back(ws: brioche.WebSocket[Any], text: str) -> None:
    ws.send(text)


async def test_a_panic_in_a_connection_task_releases_the_connection(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the engine's connection task (tokio catches the panic) must not leak the socket,
    keep the connection counted, or lose on_close: it ends like a handler error, with 1011."""
    monkeypatch.setenv("BRIOCHE_TEST_HOOKS", "1")

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code, reason)

    srv = await serve(websocket.init().on_open(on_open).on_text(send_back).on_close(on_close))
    bystander = await bystander_of(srv)
    await recorder.wait_for(lambda: len(recorder.of("open")) == 1)
    client = await connect(ws_url(srv, "/ws?victim"), open_timeout=TIMEOUT, ping_interval=None)
    await recorder.wait_for(lambda: len(recorder.of("open")) == 2)
    assert srv.pending_websockets == 2
    victim = recorder.of("open")[1][0]
    # The server's own end of this connection, found by the client's port: a count of this
    # process's descriptors would also move with sockets that earlier tests' servers close late.
    def server_end_held() -> bool:
        return holders_of_server_end(srv.port, client.local_address[1], ["self"]) == ["self"]

    assert server_end_held()

    victim._inject_panic()

    await recorder.wait_for(lambda: len(recorder.of("close")) == 1)
    assert recorder.of("close") == [("victim", 1011, "internal error")]
    assert srv.pending_websockets == 1
    assert await poll_until(lambda: not server_end_held(), TIMEOUT), "the server's socket is closed"
    with pytest.raises(ConnectionClosedError) as closed:
        await asyncio.wait_for(client.recv(), TIMEOUT)
    assert closed.value.rcvd is None, "the socket is cut, without a close frame"
    await client.close()
    await echo(bystander, "bystander after")


async def test_the_panic_hook_is_refused_outside_tests(
    serve: ServeFn, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BRIOCHE_TEST_HOOKS", raising=False)
    srv = await serve(websocket.init().on_open(lambda ws: recorder.add("open", ws)).on_text(send_back))
    async with connect(ws_url(srv), open_timeout=TIMEOUT) as client:
        await recorder.wait_for(lambda: bool(recorder.of("open")))
        with pytest.raises(RuntimeError, match="BRIOCHE_TEST_HOOKS"):
            recorder.of("open")[0][0]._inject_panic()
        await echo(client, "still open")


# -- a clean close while the client is still sending: FIN and a lingering read, not a RST ------------

async def test_a_close_while_the_client_still_sends_is_a_fin_not_a_reset(serve: ServeFn, recorder: Recorder) -> None:
    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().max_payload_length(1024).on_close(on_close))
    client = await RawWebSocket.connect(srv.port)
    sock = client.writer.get_extra_info("socket")

    try:
        # A frame declared 4 MiB long is refused (1009) at its header, with far more of its body
        # already on its way than the server reads at once: bytes it will never parse.
        header = bytes([0x82, 0xFF]) + struct.pack(">Q", 4 << 20) + b"\0\0\0\0"
        client.writer.write(header + b"x" * 300_000)
        await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
        assert recorder.of("close") == [(1009,)]
        assert await poll_until(lambda: tcp_state(sock) != TCP_ESTABLISHED, TIMEOUT), "no FIN from the server"
        frame = await client.recv_data_frame(TIMEOUT)
        assert (frame.opcode, frame.close_code) == (OP_CLOSE, 1009), frame
        # The server shut its side (FIN) and goes on reading what the client sends, instead of
        # closing a socket with unread bytes, which answers with a RST: a client's TCP stack
        # may then drop the close frame before the client reads it, and its sends fail.
        assert tcp_state(sock) == TCP_CLOSE_WAIT
        await client.send_close(1009)
        assert tcp_state(sock) == TCP_CLOSE_WAIT
    finally:
        await client.aclose()
