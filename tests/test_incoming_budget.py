"""What a client can make the server hold in time and memory: `message_timeout` and the
server-wide `max_incoming_bytes` budget, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from brioche import server, websocket
from conftest import Recorder, ServeFn, echo, log_lines, reset_peak_rss, status_kib
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    blocking_connect,
    encode_frame,
    parse_frames,
    poll_until,
)
from test_limits import recording_echo as limits_echo

MIB = 1 << 20


def recording_echo(recorder: Recorder) -> websocket.Config[Any]:
    """test_limits' recording echo, with each close's reason recorded too."""
    return limits_echo(recorder).on_close(lambda ws, code, reason: recorder.add("close", code, reason))


def test_the_settings_check_their_values_and_have_the_documented_defaults() -> None:
    assert websocket.init().message_timeout_seconds == 120.0
    assert websocket.init().message_timeout(0).message_timeout_seconds == 0.0
    assert websocket.message_timeout(websocket.init(), 2.5).message_timeout_seconds == 2.5
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="message_timeout"):
            websocket.init().message_timeout(bad)
    for wrong in ("1", True, None):
        with pytest.raises(TypeError, match="message_timeout"):
            websocket.init().message_timeout(wrong)  # type: ignore[arg-type]
    config: server.Config[Any] = server.handler(lambda request, srv: None)
    assert config.max_incoming_bytes_value == 1 << 30
    assert server.max_incoming_bytes(config, 0).max_incoming_bytes_value == 0
    with pytest.raises(ValueError, match="max_incoming_bytes"):
        config.max_incoming_bytes(-1)
    for wrong_type in (1.5, True):
        with pytest.raises(TypeError, match="max_incoming_bytes"):
            config.max_incoming_bytes(wrong_type)  # type: ignore[arg-type]


async def test_a_frame_dripped_past_the_message_timeout_closes_with_1008(serve: ServeFn, recorder: Recorder) -> None:
    """A byte every 50 ms keeps the connection from ever being idle; the message deadline
    still ends it, and the bytes received so far are dropped, not delivered."""
    srv = await serve(recording_echo(recorder).message_timeout(0.5).idle_timeout(60))
    async with await RawWebSocket.connect(srv.port) as client:
        frame = encode_frame(OP_BINARY, b"x" * 1000)
        closed = asyncio.ensure_future(client.expect_close_then_eof(timeout=10))
        for i in range(200):  # 10 s of dripping at most; the deadline is 0.5 s
            if closed.done():
                break
            await client.send_raw(frame[i:i + 1])
            await asyncio.sleep(0.05)
        close = await closed
    assert close.close_code == 1008
    assert close.close_reason == "message timeout"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1008, "message timeout")]
    assert recorder.of("bytes") == []
    assert srv._engine.incoming_bytes == 0


async def test_pings_inside_a_fragmented_message_do_not_extend_its_deadline(
    serve: ServeFn, recorder: Recorder
) -> None:
    srv = await serve(recording_echo(recorder).message_timeout(0.5).idle_timeout(60))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_frame(OP_TEXT, b"first fragment", fin=False)
        ended = asyncio.ensure_future(client.frames_until_end(timeout=10))
        for _ in range(100):  # every fragment and ping arrives whole; the last fragment never
            if ended.done():
                break
            await client.send_frame(OP_CONTINUATION, b"more", fin=False)
            await client.send_frame(OP_PING, b"still here")
            await asyncio.sleep(0.05)
        frames, how = await ended
    *pongs, close = frames
    assert how == "eof"
    assert pongs and all((f.opcode, f.payload) == (OP_PONG, b"still here") for f in pongs)
    assert (close.opcode, close.close_code) == (OP_CLOSE, 1008)
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1008, "message timeout")]
    assert recorder.of("text") == []


async def test_the_deadline_is_per_message(serve: ServeFn, recorder: Recorder) -> None:
    """Eight messages each take 0.3 s of a 1 s deadline, 2.4 s in all: all are echoed."""
    srv = await serve(recording_echo(recorder).message_timeout(1))
    async with await RawWebSocket.connect(srv.port) as client:
        for i in range(8):
            frame = encode_frame(OP_TEXT, f"message {i}".encode())
            for piece in (frame[:3], frame[3:6], frame[6:]):
                await client.send_raw(piece)
                await asyncio.sleep(0.1)
            reply = await client.recv_data_frame()
            assert (reply.opcode, reply.payload) == (OP_TEXT, f"message {i}".encode())
        await client.send_close(1000)
        assert (await client.expect_close_then_eof()).close_code == 1000
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("text") == [(f"message {i}",) for i in range(8)]
    assert recorder.of("close") == [(1000, "")]


def _close_code(sock: socket.socket) -> int | None:
    """Read until the server's close frame; its code (None if the connection ended first)."""
    buffer = b""
    try:
        for _ in range(10_000):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            frames, buffer = parse_frames(buffer + chunk)
            for frame in frames:
                if frame.opcode == OP_CLOSE:
                    return frame.close_code
    except OSError:
        return None
    return None


@asynccontextmanager
async def budget_server(budget: int, message_timeout: float) -> AsyncIterator[tuple[int, int]]:
    """tests/scripts/budget_server.py in a process of its own (its RSS and allocator are its
    own), peak RSS reset: its pid and port. Skips where another process's peak cannot be reset."""
    script = Path(__file__).parent / "scripts" / "budget_server.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(budget), str(message_timeout), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        if not reset_peak_rss(proc.pid):
            pytest.skip("the peak RSS of another process cannot be reset here")
        yield proc.pid, port
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def test_the_server_wide_budget_caps_what_drippers_hold_while_others_are_served() -> None:
    """With a 64 MiB budget and a 2 s message timeout, 20 clients each start a 16 MiB message
    and drip it at 5 MiB/s (10 MiB each by their deadline, 200 MiB together): the server stops
    reading from them at the budget, a well-behaved client goes on getting its echoes, and each
    dripper is closed with 1008 at its deadline. The server runs in a process of its own (its
    allocator untouched by other tests): its peak RSS grows by less than the budget plus 16 MiB.
    Without the budget it grew by about 200 MiB."""
    budget, size, drippers, piece, interval = 64 * MIB, 16 * MIB, 20, 128 * 1024, 0.025
    async with budget_server(budget, 2) as (pid, port):
        await _drip_against(pid, port, budget, size, drippers, piece, interval)


async def test_a_client_gone_while_the_budget_keeps_it_unread_gives_its_share_back(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A client sends 1.25 MiB of a 4 MiB message, past a 1 MiB budget, and leaves (its FIN).
    The server, which no longer reads it, notices within a second or so and frees what it held
    (1006): without a message timeout nothing else would. Before, the connection and its MiB
    stayed for good (with the default timeout, for 120 s), and every compressed message and
    every connection holding 64 KiB or more waited behind it."""
    srv = await serve(recording_echo(recorder).message_timeout(0), max_incoming_bytes=MIB)
    size, sent = 4 * MIB, MIB + 256 * 1024
    key = os.urandom(4)
    sock = await asyncio.to_thread(blocking_connect, srv.port)
    sock.settimeout(10)  # bounds the send: the kernel's buffers hold what is not read
    try:
        await asyncio.to_thread(sock.sendall, struct.pack(">BBQ", 0x82, 0x80 | 127, size) + key + key * (sent // 4))
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] >= MIB, 10), srv.stats()
    finally:
        sock.close()
    freed = await poll_until(lambda: srv.stats()["open_connections"] == 0, 10)
    stats = srv.stats()
    assert freed, stats
    assert stats["incoming_bytes"] == 0
    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    assert recorder.of("close") == [(1006, "")]
    assert recorder.of("bytes") == []
    async with connect(f"ws://127.0.0.1:{srv.port}/ws", max_size=None) as client:
        await client.send(b"x" * (100 * 1024))
        assert await asyncio.wait_for(client.recv(), 5) == b"x" * (100 * 1024)


async def test_a_client_that_shut_its_side_after_whole_messages_has_them_handled(
    serve: ServeFn, recorder: Recorder
) -> None:
    """While another client holds the 1 MiB budget, one sends a whole 150 KiB message, a small
    one and a close frame, then shuts its sending side (still reading). The budget keeps it
    unread; its end, once seen, lets the server read what is left: both messages are handled
    and the close is answered. The end is no sign that what arrived before it is unwanted."""
    srv = await serve(recording_echo(recorder).message_timeout(0), max_incoming_bytes=MIB)
    key = os.urandom(4)
    hog = await asyncio.to_thread(blocking_connect, srv.port)
    hog.settimeout(10)
    sender = None
    try:
        await asyncio.to_thread(hog.sendall, struct.pack(">BBQ", 0x82, 0x80 | 127, 4 * MIB) + key + key * (
            (MIB + 256 * 1024) // 4))
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] >= MIB, 10), srv.stats()
        sender = await asyncio.to_thread(blocking_connect, srv.port)
        sender.settimeout(10)
        big = b"y" * (150 * 1024)
        await asyncio.to_thread(sender.sendall, encode_frame(OP_BINARY, big) + encode_frame(OP_BINARY, b"small")
                                + encode_frame(OP_CLOSE, struct.pack(">H", 1000)))
        sender.shutdown(socket.SHUT_WR)
        await recorder.wait_for(lambda: bool(recorder.of("close")), 10)
        assert [len(data) for (data,) in recorder.of("bytes")] == [150 * 1024, 5]
        assert recorder.of("close") == [(1000, "")]
        assert srv.stats()["open_connections"] == 1, "the other client is still served"
    finally:
        hog.close()
        if sender is not None:
            sender.close()


async def test_a_connection_that_stops_reading_for_the_budget_is_counted_and_logged_once_a_minute(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Two clients in turn send 1.25 MiB of a 4 MiB message past a 1 MiB budget: each stops
    being read, and ``reads_paused`` counts both. The first pause is logged at WARNING on
    brioche.ws with that client's port and the limit; the second, within the minute, is not
    (a server under pressure pauses and resumes many times a second). A client sending small
    messages meanwhile is served, and never paused. Before, nothing said why the large messages
    had stopped arriving."""
    caplog.set_level(logging.INFO, logger="brioche.ws")
    srv = await serve(recording_echo(recorder).message_timeout(0), max_incoming_bytes=MIB)
    size, sent = 4 * MIB, MIB + 256 * 1024
    key = os.urandom(4)
    head = struct.pack(">BBQ", 0x82, 0x80 | 127, size) + key
    hogs: list[socket.socket] = []
    async with connect(f"ws://127.0.0.1:{srv.port}/ws", max_size=None) as small:
        try:
            await echo(small, "before")
            assert srv.stats()["reads_paused"] == 0
            for count in (1, 2):
                hog = await asyncio.to_thread(blocking_connect, srv.port)
                hog.settimeout(10)  # bounds the send: the kernel's buffers hold what is not read
                hogs.append(hog)
                await asyncio.to_thread(hog.sendall, head + key * (sent // 4))
                assert await poll_until(lambda: srv.stats()["reads_paused"] == count, 10), srv.stats()
                await echo(small, f"while {count} paused")
            first_port = hogs[0].getsockname()[1]
            expected = [(
                logging.WARNING,
                f"stopped reading from 127.0.0.1:{first_port}: the server holds more than "
                f"max_incoming_bytes ({MIB} bytes) of incoming messages and request bodies; "
                "connections holding 64 KiB or more, and compressed messages to inflate, wait until "
                "it is back under the limit (messages handled, bodies answered, connections ended); "
                'logged at most once a minute per server, stats()["reads_paused"] counts every pause',
            )]
            assert await poll_until(lambda: log_lines(caplog, "brioche.ws") != [], 5)
            # The echo after the second pause went through the same queue as its line would.
            assert log_lines(caplog, "brioche.ws") == expected
            # The second goes first: what it gives back leaves the first over the budget, so
            # nobody reads again (the other order is a third pause: the second client, read
            # again, sends the rest of its 1.25 MiB). With a reset: its FIN would wait behind
            # the bytes the server does not read.
            for hog, connections in ((hogs[1], 2), (hogs[0], 1)):
                hog.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                hog.close()
                assert await poll_until(lambda: srv.stats()["open_connections"] == connections, 10)
        finally:
            for hog in hogs:
                hog.close()
        assert srv.stats()["incoming_bytes"] == 0
        await echo(small, "after")
    assert srv.stats()["reads_paused"] == 2


async def _stats(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{port}/stats", timeout=10)
    stats: dict[str, Any] = reply.json()
    return stats


async def _drip_against(pid: int, port: int, budget: int, size: int, drippers: int, piece: int,
                        interval: float) -> None:
    bystander = await connect(f"ws://127.0.0.1:{port}/ws?bystander", open_timeout=5, ping_interval=None)
    await echo(bystander, "before")
    socks = list(await asyncio.gather(*(asyncio.to_thread(blocking_connect, port) for _ in range(drippers))))
    for sock in socks:
        sock.settimeout(15)  # bounds every send and recv below
    key = os.urandom(4)
    head = struct.pack(">BBQ", 0x82, 0x80 | 127, size) + key
    masked = memoryview(key * (size // 4))  # 16 MiB of zeros, masked
    stops = [threading.Event() for _ in socks]

    def drip(sock: socket.socket, stop: threading.Event) -> None:
        try:
            sock.sendall(head)
            for at in range(0, size - 1, piece):  # never the last byte
                if stop.wait(interval):
                    return
                sock.sendall(masked[at:min(at + piece, size - 1)])
        except OSError:
            return  # the server closed it (or stopped reading for 15 s)

    def read_close(sock: socket.socket, stop: threading.Event) -> int | None:
        try:
            return _close_code(sock)
        finally:
            stop.set()

    echoes_while_full = 0
    try:
        assert reset_peak_rss(pid)
        baseline = status_kib("VmHWM", pid)
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(2 * drippers) as pool:
            for sock, stop in zip(socks, stops):
                loop.run_in_executor(pool, drip, sock, stop)
            codes = asyncio.gather(*(loop.run_in_executor(pool, read_close, s, e) for s, e in zip(socks, stops)))
            for i in range(2000):  # paced: 20 s at most; the drippers end within about 3 s
                if codes.done():
                    break
                await echo(bystander, f"during {i}")
                if (await _stats(port))["incoming_bytes"] >= budget * 3 // 4:
                    echoes_while_full += 1
                await asyncio.sleep(0.01)
            assert await asyncio.wait_for(codes, 20) == [1008] * drippers
        peak = status_kib("VmHWM", pid)
    finally:
        for stop in stops:
            stop.set()
        for sock in socks:
            sock.close()
    growth = (peak - baseline) * 1024
    assert growth < budget + 16 * MIB, f"peak RSS +{growth / MIB:.0f} MiB with a {budget / MIB:.0f} MiB budget"
    assert echoes_while_full > 0, "the well-behaved client got no echo while the budget was full"
    await echo(bystander, "after")
    await bystander.close()
    stats = await _stats(port)
    assert stats["closes_by_code"]["1008"] == drippers
    assert stats["incoming_bytes"] == 0


# -- HTTP request bodies -----------------------------------------------------------------------


async def _post(port: int, body: bytes) -> tuple[int, bytes]:
    """POST `body` on a fresh connection; the response's status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        return int(head.split(b" ")[1]), await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


async def test_request_bodies_are_on_the_budget_until_answered(serve: ServeFn, recorder: Recorder) -> None:
    """A body is held from its first byte until the handler answers, on max_incoming_bytes as
    messages are; one that does not fit gets 503 at once. Before, bodies were outside the
    budget: a thousand clients each sending 1 MiB held a gigabyte past a 64 MiB budget."""
    answer = asyncio.Event()

    async def handler(request: server.Request, srv: Any) -> server.Response:
        recorder.add("body", len(request.body))
        await answer.wait()
        return server.ok()

    srv = await serve(handler=handler, max_incoming_bytes=4 * MIB, max_request_body_size=MIB)
    body = b"b" * (MIB - 1)
    held = [asyncio.ensure_future(_post(srv.port, body)) for _ in range(4)]
    try:
        await recorder.wait_for(lambda: len(recorder.of("body")) == 4, 10)
        assert srv.stats()["incoming_bytes"] == 4 * (MIB - 1)
        # Four bytes of room left: the fifth body is refused, and its handler never runs.
        assert await _post(srv.port, body) == (503, b"Service Unavailable")
        assert srv.stats()["incoming_bytes"] == 4 * (MIB - 1)
    finally:
        answer.set()
    assert [status for status, _ in await asyncio.gather(*held)] == [200] * 4
    assert await poll_until(lambda: srv.stats()["incoming_bytes"] == 0, 5), srv.stats()
    assert (await _post(srv.port, body))[0] == 200
    assert recorder.of("body") == [(MIB - 1,)] * 5


async def test_a_body_in_one_byte_chunks_costs_its_size_not_a_block_per_chunk() -> None:
    """Ten clients each send a chunked body as 200,000 chunks of one byte and withhold the last
    chunk: the server, in a process of its own, holds each body in one buffer. Collected as
    hyper hands it over, each chunk kept its slice of a read buffer and a list entry: about
    37 MiB per MB of body."""
    clients, chunks = 10, 200_000
    async with budget_server(1 << 30, 10) as (pid, port):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(clients)]
        try:
            baseline = status_kib("VmHWM", pid)
            request = (b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"1\r\nc\r\n" * chunks)
            await asyncio.gather(*(asyncio.to_thread(sock.sendall, request) for sock in socks))
            # Held until every body is in: each client's bytes are read before the server answers.
            async with httpx.AsyncClient() as http:
                for _ in range(100):  # bounded: 10 s at most
                    stats = (await http.get(f"http://127.0.0.1:{port}/stats", timeout=10)).json()
                    if stats["incoming_bytes"] == clients * chunks:
                        break
                    await asyncio.sleep(0.1)
            assert stats["incoming_bytes"] == clients * chunks, stats
            growth = (status_kib("VmHWM", pid) - baseline) * 1024
            # 2 MB of bodies in all; before, about 74 MiB (and 37 MiB more per client added).
            assert growth < 16 * MIB, f"peak RSS +{growth / MIB:.1f} MiB for {clients * chunks:,} bytes of bodies"
        finally:
            for sock in socks:
                sock.close()
