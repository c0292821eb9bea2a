"""Load and resource hygiene: thousands of connections, memory, descriptors and tasks over time.

The server runs in-process, so /proc/self tells its RSS and descriptors (the test's clients
share the process: they are closed and counted too).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

import brioche
from brioche import MessageBackpressured, MessageSent, websocket
from conftest import Recorder, ServeFn, ws_url
from rawws import OP_BINARY, OP_CLOSE, OP_TEXT, RawWebSocket, close_payload, numbered, poll_until

pytestmark = pytest.mark.load

TIMEOUT = 5


def raise_fd_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE to ``needed`` (the hard limit too, which needs root, as in CI)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} and it cannot be raised")
    elif soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Counts:
    """Opens and closes seen by the handlers, with a way to wait for them."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.opens = 0
        self.closes = 0
        self.codes: dict[int, int] = {}
        self.sockets: dict[Any, brioche.WebSocket[Any]] = {}

    def opened(self, ws: brioche.WebSocket[Any]) -> None:
        self.opens += 1
        if ws.data is not None:
            self.sockets[ws.data] = ws
        self.recorder.poke()

    def closed(self, ws: brioche.WebSocket[Any], code: int) -> None:
        self.closes += 1
        self.codes[code] = self.codes.get(code, 0) + 1
        self.sockets.pop(ws.data, None)
        self.recorder.poke()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        await self.recorder.wait_for(predicate, timeout)


def echo_config(counts: Counts) -> websocket.Config[Any]:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        counts.opened(ws)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        counts.closed(ws, code)

    return websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes).on_close(on_close)


async def echo(client: ClientConnection, message: str | bytes) -> None:
    await client.send(message)
    assert await asyncio.wait_for(client.recv(), TIMEOUT) == message


def rst_close(client: RawWebSocket) -> None:
    sock = client.writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def raw_echo(client: RawWebSocket, payload: bytes) -> None:
    await client.send_frame(OP_TEXT, payload)
    frame = await client.recv_data_frame(TIMEOUT)
    assert (frame.opcode, frame.payload) == (OP_TEXT, payload)


@pytest.fixture
async def counted(serve: ServeFn, recorder: Recorder) -> AsyncIterator[tuple[brioche.Server[Any], Counts]]:
    counts = Counts(recorder)
    srv = await serve(echo_config(counts))
    yield srv, counts


# -- 10,000 concurrent connections, then all reset ---------------------------------------------

CONCURRENT = 10_000
MANY_CONNECTIONS = Path(__file__).parent / "scripts" / "many_connections.py"


async def test_10000_concurrent_connections_reset_at_once_leave_nothing_behind(
    counted: tuple[brioche.Server[Any], Counts]
) -> None:
    # The clients run in their own process: client and server sockets together would need more
    # descriptors than one process may have here (20,000).
    raise_fd_limit(CONCURRENT + 200)
    srv, counts = counted
    bystander = await connect(ws_url(srv, "/ws?bystander"), open_timeout=TIMEOUT, ping_interval=None)
    await echo(bystander, "before")
    clients = await asyncio.create_subprocess_exec(
        sys.executable, str(MANY_CONNECTIONS), str(srv.port), str(CONCURRENT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert clients.stdin is not None and clients.stdout is not None
    try:
        ready = await asyncio.wait_for(clients.stdout.readline(), 120)
        assert ready == b"ready\n", (ready, await clients.stderr.read() if clients.stderr else b"")
        # Every one of them is open at once, and each has echoed.
        await counts.wait(lambda: counts.opens == CONCURRENT + 1)
        assert srv.pending_websockets == CONCURRENT + 1
        clients.stdin.write(b"reset\n")
        await clients.stdin.drain()
        assert await asyncio.wait_for(clients.stdout.readline(), 60) == b"reset\n"
        await asyncio.wait_for(clients.wait(), 60)
    finally:
        if clients.returncode is None:
            clients.kill()
            await clients.wait()
    assert clients.returncode == 0
    await counts.wait(lambda: counts.closes == CONCURRENT, timeout=60)
    assert counts.codes == {1006: CONCURRENT}
    assert srv.pending_websockets == 1
    await echo(bystander, "after the resets")
    await bystander.close()
    await counts.wait(lambda: counts.closes == CONCURRENT + 1)
    assert srv.pending_websockets == 0
    async with connect(ws_url(srv, "/ws?fresh"), open_timeout=TIMEOUT) as fresh:
        await echo(fresh, "fresh client after 10,000 resets")


# -- memory over 50,000 connection cycles ------------------------------------------------------


async def one_cycle(port: int, i: int) -> None:
    """Connect, echo, and end the connection one of three ways."""
    client = await RawWebSocket.connect(port, f"/ws?cycle{i}")
    try:
        await raw_echo(client, b"cycle %d " % i + b"x" * (i % 200))
        if i % 4 == 0:
            rst_close(client)
        elif i % 4 == 1:
            client.close()  # FIN without a close frame
        else:
            await client.send_frame(OP_CLOSE, close_payload(1000))
            close = await client.expect_close_then_eof()
            assert close.close_code == 1000
    finally:
        client.close()


async def run_cycles(port: int, start: int, stop: int, workers: int = 8) -> None:
    async def worker(w: int) -> None:
        for i in range(start + w, stop, workers):
            await one_cycle(port, i)

    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(workers))), 300)


async def settled_rss(srv: brioche.Server[Any], counts: Counts, cycles: int) -> int:
    await counts.wait(lambda: counts.closes == cycles)
    assert srv.pending_websockets == 0
    gc.collect()
    return rss_kib()


async def test_rss_is_stable_over_50000_connection_cycles(counted: tuple[brioche.Server[Any], Counts]) -> None:
    srv, counts = counted
    await run_cycles(srv.port, 0, 5_000)
    after_5000 = await settled_rss(srv, counts, 5_000)
    await run_cycles(srv.port, 5_000, 50_000)
    after_50000 = await settled_rss(srv, counts, 50_000)
    assert counts.opens == 50_000
    print(f"VmRSS after 5,000 cycles: {after_5000} KiB, after 50,000: {after_50000} KiB")
    assert after_50000 <= after_5000 * 1.05, (
        f"VmRSS {after_5000} KiB after 5,000 cycles, {after_50000} KiB after 50,000"
    )
    async with connect(ws_url(srv, "/ws?after"), open_timeout=TIMEOUT) as client:
        await echo(client, "still echoing")


# -- a slow client next to fast ones ----------------------------------------------------------

SLOW_MESSAGES = 200
SLOW_SIZE = 64 * 1024
FAST_CLIENTS = 10
FAST_ECHOES = 300


async def test_a_client_that_stops_reading_does_not_hold_up_the_others(
    serve: ServeFn, recorder: Recorder
) -> None:
    counts = Counts(recorder)
    statuses: list[object] = []
    drains: list[Any] = []

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        status = ws.send_bytes(data)
        if ws.data == "slow":
            statuses.append(status)
            recorder.add("slow-echo")

    def on_drain(ws: brioche.WebSocket[Any]) -> None:
        drains.append(ws.data)
        recorder.add("drain")

    srv = await serve(echo_config(counts).on_bytes(on_bytes).on_drain(on_drain))
    slow = await RawWebSocket.connect(srv.port, "/ws?slow", rcvbuf=4096, limit=4096)
    try:
        slow.pause_reading()
        for i in range(SLOW_MESSAGES):
            await slow.send_frame(OP_BINARY, numbered(i, SLOW_SIZE))
        await recorder.wait_for(lambda: len(statuses) == SLOW_MESSAGES)
        slow_ws = counts.sockets["slow"]
        assert slow_ws.buffered_amount > 0, "the slow client's echoes are queued on the server"

        async def fast(n: int) -> None:
            async with connect(ws_url(srv, f"/ws?fast{n}"), open_timeout=TIMEOUT) as client:
                for i in range(FAST_ECHOES):
                    await echo(client, f"fast {n} {i}")

        drains_while_stuck = drains.count("slow")
        await asyncio.wait_for(asyncio.gather(*(fast(n) for n in range(FAST_CLIENTS))), 60)
        # The slow one is still stuck: its echoes are still queued and it has not drained since.
        # (It may have drained before it got stuck: past the high-water mark a socket counts as
        # congested before the kernel refuses anything.)
        assert slow_ws.buffered_amount > 0
        assert drains.count("slow") == drains_while_stuck
        assert all(isinstance(s, (MessageSent, MessageBackpressured)) for s in statuses)
        assert any(isinstance(s, MessageBackpressured) for s in statuses)
        # Once it reads again it gets everything, in order, and drains.
        slow.resume_reading()
        for i in range(SLOW_MESSAGES):
            frame = await slow.recv_data_frame(TIMEOUT)
            assert frame.payload == numbered(i, SLOW_SIZE), f"echo {i}"
        await recorder.wait_for(lambda: drains.count("slow") > drains_while_stuck)
    finally:
        slow.close()


# -- resource hygiene -------------------------------------------------------------------------

HYGIENE_CYCLES = 500
FD_SLACK = 3


def hygiene_config(counts: Counts) -> websocket.Config[Any]:
    async def on_open(ws: brioche.WebSocket[Any]) -> None:
        await asyncio.sleep(0)  # suspends: a task per open
        counts.opened(ws)

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await asyncio.sleep(0)
        if text == "close me":
            ws.close(4000, "as asked")
        elif text == "terminate me":
            ws.terminate()
        else:
            ws.send(text)

    async def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        await asyncio.sleep(0)
        counts.closed(ws, code)

    return websocket.init().on_open(on_open).on_text(on_text).on_close(on_close)


async def http_get(port: int, target: str, extra: str = "") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


async def hygiene_cycle(srv: brioche.Server[Any], i: int) -> bool:
    """One connection, ended one of seven ways; whether it was a WebSocket."""
    kind = i % 7
    if kind == 0:
        async with connect(ws_url(srv, f"/ws?h{i}"), open_timeout=TIMEOUT) as ws_client:
            await echo(ws_client, "clean close")
        return True
    if kind == 5:
        head = await http_get(srv.port, "/plain")
        assert head.startswith(b"HTTP/1.1 200"), head
        return False
    if kind == 6:
        head = await http_get(srv.port, "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n")
        # No Sec-WebSocket-Version: 426, which names the version a client must speak.
        assert head.startswith(b"HTTP/1.1 426 "), head
        return False
    client = await RawWebSocket.connect(srv.port, f"/ws?h{i}")
    try:
        await raw_echo(client, b"hello")
        if kind == 1:
            rst_close(client)
        elif kind == 2:
            client.close()
        elif kind == 3:
            await client.send_text("close me")
            close = await client.recv_frame(TIMEOUT)
            assert (close.opcode, close.close_code) == (OP_CLOSE, 4000)
            # The server's end of the stream follows the client's answer (the closing handshake).
            await client.send_close(4000)
            frames, how = await client.frames_until_end(TIMEOUT)
            assert (frames, how) == ([], "eof")
        else:
            await client.send_text("terminate me")
            frames, how = await client.frames_until_end(TIMEOUT)
            assert [f for f in frames if f.opcode == OP_CLOSE] == []
    finally:
        await client.aclose()
    return True


async def test_no_descriptor_or_task_outlives_its_connection(serve: ServeFn, recorder: Recorder) -> None:
    counts = Counts(recorder)
    srv = await serve(hygiene_config(counts))
    websockets = 0

    async def run(start: int, stop: int) -> None:
        nonlocal websockets
        for i in range(start, stop):
            websockets += await hygiene_cycle(srv, i)
        await counts.wait(lambda: counts.closes == websockets)
        assert srv.pending_websockets == 0

    await run(0, 14)  # warm-up: every kind twice (lazily created state is not a leak)
    fds_before = open_fds()
    tasks_before = len(asyncio.all_tasks())

    await run(14, 14 + HYGIENE_CYCLES)
    assert counts.opens == counts.closes == websockets
    # Descriptors of ended connections close without an event to wait on: poll for a while.
    await poll_until(lambda: open_fds() <= fds_before + FD_SLACK, 5)
    fds_after = open_fds()
    print(f"descriptors: {fds_before} before, {fds_after} after {HYGIENE_CYCLES} cycles; "
          f"tasks: {tasks_before} before")
    assert fds_after <= fds_before + FD_SLACK, f"{fds_before} descriptors before, {fds_after} after"
    await poll_until(lambda: len(asyncio.all_tasks()) <= tasks_before, 5)
    assert len(asyncio.all_tasks()) == tasks_before, [t for t in asyncio.all_tasks()]
    async with connect(ws_url(srv, "/ws?after"), open_timeout=TIMEOUT) as client:
        await echo(client, "still echoing")
