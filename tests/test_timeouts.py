"""idle_timeout and send_pings: only the client's traffic keeps a connection alive.

These tests measure elapsed time, so they wait on purpose (asyncio.sleep here is the point, not
synchronisation). They use a 2 s timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from websockets.asyncio.client import connect

import brioche
from brioche import MessageBackpressured, MessageSent, websocket
from conftest import Recorder, ServeFn, ws_url
from rawws import OP_CLOSE, OP_PING, OP_TEXT, RawWebSocket, encode_frame, poll_until

IDLE = 2


def config(recorder: Recorder, idle: int = IDLE, send_pings: bool = True) -> websocket.Config[Any]:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    return (
        websocket.init()
        .on_text(on_text)
        .on_close(on_close)
        .idle_timeout(idle)
        .send_pings(send_pings)
    )


async def test_server_pings_a_silent_client_before_the_idle_timeout(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(config(recorder))
    async with await RawWebSocket.connect(srv.port) as client:
        start = time.monotonic()
        frame = await client.recv_frame(timeout=IDLE + 1)
        elapsed = time.monotonic() - start
        assert frame.opcode == OP_PING
        assert elapsed < IDLE, f"pinged after {elapsed:.2f}s, not before the {IDLE}s timeout"


async def test_client_that_answers_pings_stays_connected(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(config(recorder))
    # ping_interval=None: the client sends nothing of its own; it only answers the server's pings.
    async with connect(ws_url(srv), ping_interval=None) as client:
        await asyncio.sleep(IDLE * 2.25)
        await client.send("still here")
        assert await asyncio.wait_for(client.recv(), 5) == "still here"
        assert recorder.of("close") == []


async def test_a_client_reading_a_long_backlog_is_not_idle_though_the_ping_waits_behind_it(
    serve: ServeFn, recorder: Recorder
) -> None:
    """The server queues 300 messages of 64 KiB (19 MiB, all accepted under a 64 MiB
    backpressure limit); the client sends nothing and reads them steadily, about 4 MB/s, for
    longer than the 2 s idle timeout. The server's keep-alive ping waits behind that backlog, so
    the client cannot answer it in the timeout's last quarter; but the kernel taking the bytes
    it had refused says the client is there (uWS resets its idle timer on every write that
    drains backpressure). Before, the client was dropped with 1006 "idle timeout" at 2 s, about
    70 messages short, and the rest of what the server had accepted was lost."""
    count, size = 300, 64 * 1024

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        for i in range(count):
            assert isinstance(ws.send(i.to_bytes(4, "big") * (size // 4)), (MessageSent, MessageBackpressured))

    srv = await serve(config(recorder).on_open(on_open).backpressure_limit(64 * 1024 * 1024))
    got: list[int] = []
    async with connect(ws_url(srv), ping_interval=None, max_size=None, max_queue=2) as client:
        for _ in range(count):
            message = await asyncio.wait_for(client.recv(), IDLE + 3)
            assert isinstance(message, bytes) and len(message) == size
            got.append(int.from_bytes(message[:4], "big"))
            await asyncio.sleep(0.015)  # the pace of a slow reader, the behaviour under test
        assert recorder.of("close") == []
    assert got == list(range(count))
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1000,)]


async def test_client_that_never_answers_pings_is_dropped_with_1006(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(config(recorder))
    start = time.monotonic()  # before the server's idle clock, which starts after the 101
    async with await RawWebSocket.connect(srv.port) as client:
        frames, how = await client.frames_until_end(timeout=IDLE + 3)
        elapsed = time.monotonic() - start
    assert how == "eof"
    assert [f.opcode for f in frames if f.opcode != OP_PING] == [], "dropped, no close frame"
    assert len(frames) >= 1, "it was pinged first"
    assert IDLE - 0.5 <= elapsed <= IDLE + 1, f"closed after {elapsed:.2f}s"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1006,)]


async def test_without_pings_a_silent_client_is_closed_at_the_idle_timeout(
    serve: ServeFn, recorder: Recorder
) -> None:
    srv = await serve(config(recorder, send_pings=False))
    start = time.monotonic()  # before the server's idle clock, which starts after the 101
    async with connect(ws_url(srv), ping_interval=None) as client:
        await asyncio.wait_for(client.wait_closed(), IDLE + 3)
        elapsed = time.monotonic() - start
        assert client.close_code == 1006
    assert IDLE - 0.5 <= elapsed <= IDLE + 1, f"closed after {elapsed:.2f}s"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1006,)]


async def test_without_pings_no_ping_frame_is_ever_sent(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(config(recorder, send_pings=False))
    start = time.monotonic()  # before the server's idle clock, which starts after the 101
    async with await RawWebSocket.connect(srv.port) as client:
        frames, how = await client.frames_until_end(timeout=IDLE + 3)
        elapsed = time.monotonic() - start
    assert frames == [], "no ping, no close frame: the connection is just dropped"
    assert how == "eof"
    assert IDLE - 0.5 <= elapsed <= IDLE + 1, f"closed after {elapsed:.2f}s"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1006,)]


async def test_idle_timeout_zero_never_closes_or_pings(serve: ServeFn, recorder: Recorder) -> None:
    # Off and the 120 s default behave alike for 90 s, so "off" is told from a short timeout
    # instead: the same 2 s timeout, then idle_timeout(0). A control client of a server left at
    # 2 s, connected after the "off" one, is pinged and dropped; the "off" one, silent at least
    # as long, got nothing and still echoes. Taking 0 literally or ignoring it both fail.
    timed = Recorder()
    control_srv = await serve(config(timed))
    off_srv = await serve(config(recorder).idle_timeout(0))
    async with await RawWebSocket.connect(off_srv.port) as off:
        async with await RawWebSocket.connect(control_srv.port) as control:
            frames, how = await control.frames_until_end(timeout=IDLE + 3)
        assert ([f.opcode for f in frames], how) == ([OP_PING], "eof"), (frames, how)
        await timed.wait_for(lambda: bool(timed.of("close")))
        assert timed.of("close") == [(1006,)]
        await off.send_text("alive")
        frame = await off.recv_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"alive"), "no ping came before the echo"
        assert recorder.of("close") == []


async def test_server_traffic_does_not_keep_a_silent_client_alive(serve: ServeFn, recorder: Recorder) -> None:
    async def tick(ws: brioche.WebSocket[Any]) -> None:
        for i in range(100):  # at most 10 s
            if ws.ready_state != 1:
                return
            ws.send(f"tick {i}")
            await asyncio.sleep(0.1)

    tasks: set[asyncio.Task[None]] = set()

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        task = asyncio.get_running_loop().create_task(tick(ws))
        tasks.add(task)

    srv = await serve(config(recorder).on_open(on_open))
    async with await RawWebSocket.connect(srv.port) as client:
        start = time.monotonic()
        frames, how = await client.frames_until_end(timeout=IDLE + 3)
        elapsed = time.monotonic() - start
    assert how == "eof"
    assert len([f for f in frames if f.opcode == OP_TEXT]) >= 10, "the server kept sending"
    assert OP_CLOSE not in [f.opcode for f in frames]
    assert elapsed <= IDLE + 1, f"closed after {elapsed:.2f}s"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1006,)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_client_messages_keep_a_connection_alive_without_pongs(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(config(recorder))
    async with await RawWebSocket.connect(srv.port) as client:
        for i in range(9):  # 4.5 s, more than twice the timeout, never answering a ping
            await asyncio.sleep(0.5)
            await client.send_text(f"m{i}")
            frame = await client.recv_data_frame()
            assert frame.payload == f"m{i}".encode()
        assert recorder.of("close") == []


def unread_by_server(server_port: int, client_port: int) -> int:
    """The bytes of this connection in the server socket's receive queue (/proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
            if (local, remote) == (server_port, client_port):
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no server socket for client port {client_port}")


async def test_time_spent_not_reading_is_not_the_clients_silence(serve: ServeFn, recorder: Recorder) -> None:
    """An async handler holds the first message while 100 more arrive: 64 parked events pause
    reading. The client goes on sending, one message every 0.25 s for 2.5 s, none of which the
    server reads. With a 1 s idle timeout and no pings the last read is 2.5 timeouts old when
    the handler lets go, but the server was the one not reading: the connection lives, and every
    message is echoed in order."""
    release = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "hold":
            await release.wait()
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(
        websocket.init().on_text(on_text).on_close(on_close).idle_timeout(1).send_pings(False)
    )
    burst = ["hold"] + [f"m{i}" for i in range(100)]
    paced = [f"t{i}" for i in range(10)]
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_raw(b"".join(encode_frame(OP_TEXT, m.encode()) for m in burst))
        for message in paced:
            await asyncio.sleep(0.25)  # pacing the client: 10 x 0.25 s is 2.5 idle timeouts
            await client.send_text(message)
        # The last frame may reach the server's receive queue a little after the send returns;
        # a server that reads them leaves less there, and never the whole.
        client_port = client.writer.get_extra_info("sockname")[1]
        sent = sum(len(encode_frame(OP_TEXT, m.encode())) for m in paced)
        assert await poll_until(lambda: unread_by_server(srv.port, client_port) == sent, 5), (
            f"paused: {unread_by_server(srv.port, client_port)} of {sent} bytes unread")
        release.set()
        echoed = [(await client.recv_frame()).payload.decode() for _ in burst + paced]
        assert echoed == burst + paced
        await client.send_close(1000)
        close = await client.expect_close_then_eof()
        assert close.close_code == 1000
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1000,)]


async def test_a_client_silent_while_the_server_is_not_reading_is_not_timed_out(
    serve: ServeFn, recorder: Recorder
) -> None:
    """As above, but the client says nothing once its burst is sent, and all of it was read
    before reading paused: the task has no reason to wake until its idle timer, which must see
    that Python is the one behind (the pause does not wake the task)."""
    release = asyncio.Event()
    held: list[str] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "hold":
            held.append(text)
            recorder.poke()
            await release.wait()
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(
        websocket.init().on_text(on_text).on_close(on_close).idle_timeout(1).send_pings(False)
    )
    burst = ["hold"] + [f"m{i}" for i in range(100)]
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_raw(b"".join(encode_frame(OP_TEXT, m.encode()) for m in burst))
        await recorder.wait_for(lambda: bool(held))
        await asyncio.sleep(2.5)  # silence: 2.5 idle timeouts (the behaviour under test is time)
        assert recorder.of("close") == []
        release.set()
        echoed = [(await client.recv_frame()).payload.decode() for _ in burst]
        assert echoed == burst
        await client.send_close(1000)
        assert (await client.expect_close_then_eof()).close_code == 1000
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1000,)]
