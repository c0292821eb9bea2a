"""Read-side flow control: when Python falls behind, brioche stops reading instead of buffering.

A handler that is suspended holds back its connection's later events; past a small cap the
server stops reading that socket, so the client's writes block in the kernel (TCP
backpressure). Nothing the client managed to send is lost: once the handler resumes, every
message is handled, in order.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from typing import Any

import pytest

import brioche
from brioche import websocket
from conftest import Recorder, ServeFn
from rawws import OP_TEXT, blocking_connect, encode_frame

pytestmark = pytest.mark.both_loops

MESSAGE = 1024  # bytes per message
MAX_MESSAGES = 100_000  # 100 MiB: far more than any kernel buffers on loopback


def flood_until_stalled(sock: socket.socket) -> tuple[int, bytes]:
    """Send numbered 1 KiB text frames until the socket stays unwritable for 1 s.

    Returns how many frames went out whole and the unsent tail of the frame in progress.
    """
    sock.setblocking(False)
    for i in range(MAX_MESSAGES):
        frame = encode_frame(OP_TEXT, f"{i:08d}".encode().ljust(MESSAGE, b"."))
        while frame:
            try:
                frame = frame[sock.send(frame):]
            except BlockingIOError:
                # Elapsed time is the point here: a reader that stopped stays stopped.
                _, writable, _ = select.select([], [sock], [], 1.0)
                if not writable:
                    return i, frame
    raise AssertionError(f"the server kept reading all {MAX_MESSAGES} messages")


async def resume_and_expect_everything(
    sock: socket.socket, whole: int, tail: bytes, received: list[str], recorder: Recorder
) -> None:
    """Finish the frame in progress, send "end", and expect every message once, in order."""
    sock.setblocking(True)
    await asyncio.to_thread(sock.sendall, tail + encode_frame(OP_TEXT, b"end"))
    expected = whole + (1 if tail else 0) + 1
    await recorder.wait_for(lambda: len(received) >= expected, timeout=30)
    numbers = [int(text[:8]) for text in received[:-1]]
    assert numbers == list(range(len(numbers))), "messages arrive once each, in order"
    assert received[-1] == "end"
    assert len(received) == expected


async def test_suspended_handler_stops_reading_and_loses_nothing(
    serve: ServeFn, recorder: Recorder
) -> None:
    release = asyncio.Event()
    received: list[str] = []

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "hold":
            await release.wait()
            return
        received.append(text)
        recorder.add("text")

    srv = await serve(websocket.init().on_text(on_text))
    sock = await asyncio.to_thread(blocking_connect, srv.port)
    try:
        sock.sendall(encode_frame(OP_TEXT, b"hold"))
        whole, tail = await asyncio.to_thread(flood_until_stalled, sock)
        # Everything sent fits in the kernel's buffers plus the server's small per-socket cap
        # (64 parked + 128 queued messages): the server did not read on without bound.
        assert whole * MESSAGE < 32 * 1024 * 1024, f"{whole} messages were accepted while stalled"
        assert received == [], "the handler for 'hold' is still suspended"

        release.set()
        await resume_and_expect_everything(sock, whole, tail, received, recorder)
    finally:
        sock.close()


async def test_blocked_loop_stops_reading_at_the_queue_cap(serve: ServeFn, recorder: Recorder) -> None:
    stalled = threading.Event()
    received: list[str] = []

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if text == "hold":
            # Blocks the whole loop (as a slow sync handler would) until the client stalls.
            assert stalled.wait(60), "the client never stalled"
            return
        received.append(text)
        recorder.add("text")

    srv = await serve(websocket.init().on_text(on_text))
    sock = await asyncio.to_thread(blocking_connect, srv.port)

    def hold_then_flood() -> tuple[int, bytes]:
        sock.sendall(encode_frame(OP_TEXT, b"hold"))
        try:
            return flood_until_stalled(sock)
        finally:
            stalled.set()

    try:
        whole, tail = await asyncio.to_thread(hold_then_flood)
        # The events the server queued for the blocked loop are capped per socket (128 messages
        # or 1 MiB); the rest waits in the kernel.
        assert whole * MESSAGE < 32 * 1024 * 1024, f"{whole} messages were accepted while stalled"
        await resume_and_expect_everything(sock, whole, tail, received, recorder)
    finally:
        sock.close()
