"""Incoming limits and protocol violations: the server closes with the RFC 6455 code, then EOF."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

import brioche
from brioche import websocket
from conftest import Recorder, ServeFn, reset_peak_rss, status_kib, ws_url
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    blocking_connect,
    close_payload,
    encode_frame,
)

MIB = 1 << 20


def recording_echo(recorder: Recorder) -> websocket.Config[Any]:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text)
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("bytes", data)
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    return websocket.init().on_text(on_text).on_bytes(on_bytes).on_close(on_close)


async def test_oversized_message_closes_with_1009(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(recording_echo(recorder).max_payload_length(4))
    async with connect(ws_url(srv)) as client:
        await client.send("Hello!")
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(client.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1009,)]
    assert recorder.of("text") == []


async def test_oversized_binary_frame_closes_with_1009_then_eof(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(recording_echo(recorder).max_payload_length(4))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_bytes(b"12345")
        close = await client.expect_close_then_eof()
        assert close.close_code == 1009
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1009,)]
    assert recorder.of("bytes") == []


async def test_message_of_exactly_max_payload_length_is_accepted(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(recording_echo(recorder).max_payload_length(4))
    async with connect(ws_url(srv)) as client:
        await client.send("Hell")
        assert await asyncio.wait_for(client.recv(), 5) == "Hell"
        await client.send(b"\x00\x01\x02\x03")
        assert await asyncio.wait_for(client.recv(), 5) == b"\x00\x01\x02\x03"
        await client.send("€")  # 3 UTF-8 bytes
        assert await asyncio.wait_for(client.recv(), 5) == "€"
    assert recorder.of("text") == [("Hell",), ("€",)]


async def test_fragmented_message_over_the_limit_closes_with_1009(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(recording_echo(recorder).max_payload_length(4))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_frame(OP_TEXT, b"abc", fin=False)
        await client.send_frame(OP_CONTINUATION, b"de", fin=True)
        close = await client.expect_close_then_eof()
        assert close.close_code == 1009
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1009,)]
    assert recorder.of("text") == []


async def test_default_limit_accepts_16_mib_and_closes_1009_one_byte_over(serve: ServeFn, recorder: Recorder) -> None:
    """With no max_payload_length set: a 16 MiB message (one frame) is delivered; 16 MiB + 1,
    in one frame or as a 16 MiB fragment and one more byte, closes with 1009."""

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("bytes", len(data), data[:1], data[-1:])
        ws.send(str(len(data)))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)

    srv = await serve(websocket.init().on_bytes(on_bytes).on_close(on_close))
    async with await RawWebSocket.connect(srv.port, "/ws?fragments") as client:
        await client.send_bytes(b"a" + b"\x00" * (16 * MIB - 2) + b"z")
        assert (await client.recv_frame(timeout=10)).payload == str(16 * MIB).encode()
        await client.send_frame(OP_BINARY, b"\x01" * (16 * MIB), fin=False)
        await client.send_frame(OP_CONTINUATION, b"\x02")
        close = await client.expect_close_then_eof(timeout=10)
        assert close.close_code == 1009
    async with await RawWebSocket.connect(srv.port, "/ws?one-frame") as client:
        header = encode_frame(OP_BINARY, b"")[:2]  # FIN+binary, mask bit: the length comes next
        await client.send_raw(bytes([header[0], 0x80 | 127]) + struct.pack(">Q", 16 * MIB + 1) + b"mask")
        close = await client.expect_close_then_eof()
        assert close.close_code == 1009
    await recorder.wait_for(lambda: len(recorder.of("close")) == 2)
    assert sorted(recorder.of("close")) == [("fragments", 1009), ("one-frame", 1009)]
    assert recorder.of("bytes") == [(16 * MIB, b"a", b"z")]


VIOLATIONS = {
    "invalid-utf8-text": ([encode_frame(OP_TEXT, b"ok \xff\xfe")], 1007),
    "invalid-utf8-across-fragments": (
        [encode_frame(OP_TEXT, b"\xe2\x82", fin=False), encode_frame(OP_CONTINUATION, b"\x28")], 1007
    ),
    # 64 KiB and over in one frame, text is checked on the loop thread, in its copy into a str:
    # ASCII up to one bad byte, text that is not ASCII, and a sequence cut at the very end.
    "invalid-utf8-large-ascii-text": ([encode_frame(OP_TEXT, b"a" * 70_000 + b"\xff" + b"b" * 30_000)], 1007),
    "invalid-utf8-large-text": ([encode_frame(OP_TEXT, "é".encode() * 40_000 + b"\xc3\x28")], 1007),
    "truncated-utf8-large-text": ([encode_frame(OP_TEXT, "€".encode() * 30_000 + "€".encode()[:2])], 1007),
    "unmasked-frame": ([encode_frame(OP_TEXT, b"hi", mask=False)], 1002),
    "rsv1-set": ([encode_frame(OP_TEXT, b"hi", rsv=4)], 1002),
    "rsv2-set": ([encode_frame(OP_BINARY, b"hi", rsv=2)], 1002),
    "rsv3-set": ([encode_frame(OP_TEXT, b"hi", rsv=1)], 1002),
    "reserved-data-opcode-0x3": ([encode_frame(0x3, b"hi")], 1002),
    "reserved-control-opcode-0xb": ([encode_frame(0xB, b"hi")], 1002),
    "fragmented-ping": ([encode_frame(OP_PING, b"hi", fin=False)], 1002),
    "continuation-without-start": ([encode_frame(OP_CONTINUATION, b"hi")], 1002),
    "control-frame-over-125-bytes": ([encode_frame(OP_PING, b"p" * 126)], 1002),
    "new-message-inside-fragmented-one": (
        [encode_frame(OP_TEXT, b"a", fin=False), encode_frame(OP_TEXT, b"b")], 1002
    ),
}


@pytest.mark.parametrize("frames,code", list(VIOLATIONS.values()), ids=list(VIOLATIONS))
async def test_protocol_violation_closes_with_code_then_eof_and_spares_other_clients(
    serve: ServeFn, recorder: Recorder, frames: list[bytes], code: int
) -> None:
    srv = await serve(recording_echo(recorder))
    async with connect(ws_url(srv)) as bystander, await RawWebSocket.connect(srv.port) as client:
        await bystander.send("before")
        assert await asyncio.wait_for(bystander.recv(), 5) == "before"

        await client.send_raw(b"".join(frames))
        close = await client.expect_close_then_eof()
        assert close.close_code == code, close

        await recorder.wait_for(lambda: bool(recorder.of("close")))
        assert recorder.of("close") == [(code,)]
        assert recorder.of("bytes") == []
        await bystander.send("after")
        assert await asyncio.wait_for(bystander.recv(), 5) == "after"
    assert recorder.of("text") == [("before",), ("after",)], "the bad frames never reached a handler"


async def test_replies_to_messages_before_a_violation_go_out_before_the_close(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Valid messages that arrived just before a protocol error are handled and their echoes
    delivered; only then does the close frame follow (Autobahn 3.2, 4.1.3, 5.15 want this)."""
    srv = await serve(recording_echo(recorder))
    async with await RawWebSocket.connect(srv.port) as client:
        good = b"".join(encode_frame(OP_TEXT, b"hello %d" % i) for i in range(3))
        await client.send_raw(good + encode_frame(OP_TEXT, b"bad", rsv=4))
        frames, how = await client.frames_until_end()
    assert [(f.opcode, f.payload) for f in frames[:3]] == [(OP_TEXT, b"hello %d" % i) for i in range(3)]
    assert [f.close_code for f in frames[3:]] == [1002]
    assert how == "eof"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1002,)]


async def test_after_an_invalid_large_text_nothing_more_is_handled_and_the_close_is_1007(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A text message of 64 KiB or more in one frame has its UTF-8 checked on the loop thread,
    after the worker has read on: the messages that came after an invalid one are dropped, those
    before it answered first, and the close is 1007 then EOF, as when the worker finds it."""
    srv = await serve(recording_echo(recorder))
    bad = bytearray(b"x" * 100_000)
    bad[50_000] = 0xFF
    accented = "é" * 40_000
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_raw(
            encode_frame(OP_TEXT, b"before")
            + encode_frame(OP_TEXT, accented.encode())
            + encode_frame(OP_TEXT, bytes(bad))
            + encode_frame(OP_TEXT, b"after")
            + encode_frame(OP_BINARY, b"after")
            + encode_frame(OP_PING, b"after")
            + encode_frame(OP_TEXT, b"y" * 100_000)
        )
        frames, how = await client.frames_until_end()
    texts = [(f.opcode, f.payload) for f in frames if f.opcode == OP_TEXT]
    assert texts == [(OP_TEXT, b"before"), (OP_TEXT, accented.encode())]
    assert frames[-1].close_code == 1007
    assert how == "eof"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1007,)]
    assert recorder.of("text") == [("before",), (accented,)]
    assert recorder.of("bytes") == []


@pytest.mark.parametrize(
    "behind",
    [encode_frame(OP_CLOSE, close_payload(1000)), encode_frame(OP_TEXT, b"bad", rsv=4)],
    ids=["the-client-s-close", "a-protocol-error"],
)
async def test_an_invalid_large_text_followed_by_a_close_or_a_violation_is_closed_with_1007(
    serve: ServeFn, recorder: Recorder, behind: bytes
) -> None:
    """The client's close frame (or a protocol error) right behind an invalid text of 64 KiB or
    more does not win: the text came first, so the connection fails with 1007, on the client
    and in ``on_close``, as when nothing follows it. Checked on the loop thread, the text was
    refused after the connection's task had read what followed it and handed that over to the
    loop too, which answered it: the client got its own 1000 (or 1002) back."""
    srv = await serve(recording_echo(recorder))
    bad = bytearray(b"x" * 100_000)
    bad[50_000] = 0xFF
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_raw(encode_frame(OP_TEXT, b"before") + encode_frame(OP_TEXT, bytes(bad)) + behind)
        frames, how = await client.frames_until_end()
    assert [(f.opcode, f.payload) for f in frames[:1]] == [(OP_TEXT, b"before")]
    assert [f.close_code for f in frames[1:]] == [1007]
    assert how == "eof"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1007,)]
    assert recorder.of("text") == [("before",)]


@pytest.mark.parametrize("size", [10, 100_000], ids=["found-by-the-worker", "found-on-the-loop"])
async def test_invalid_text_behind_a_suspended_handler_closes_once_it_returns(
    serve: ServeFn, recorder: Recorder, size: int
) -> None:
    """Invalid UTF-8 that arrives while an ``async`` handler of an earlier message is suspended
    closes the connection with 1007 once that handler has returned and its reply gone out (the
    close frame after it, then EOF), whether the worker found it (a small text) or the loop
    thread (64 KiB and more); the message after it never reaches a handler. The reply and the
    close are queued back to back, which raced with the task sealing the queue: the close frame
    was sometimes refused, and the client got EOF without one."""
    release = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", text)
        if text == "wait":
            await release.wait()
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close))
    bad = b"x" * size + b"\xff"
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_raw(
            encode_frame(OP_TEXT, b"wait") + encode_frame(OP_TEXT, bad) + encode_frame(OP_TEXT, b"after")
        )
        await recorder.wait_for(lambda: bool(recorder.of("text")))
        release.set()
        frames, how = await client.frames_until_end()
    assert [(f.opcode, f.payload) for f in frames[:-1]] == [(OP_TEXT, b"wait")], frames
    assert frames[-1].close_code == 1007, frames
    assert how == "eof"
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    assert recorder.of("close") == [(1007,)]
    assert recorder.of("text") == [("wait",)]


async def test_fragmented_text_message_is_reassembled_and_delivered_once(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(recording_echo(recorder))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_frame(OP_TEXT, "hé".encode()[:2], fin=False)  # splits the é
        await client.send_frame(OP_CONTINUATION, "hé".encode()[2:], fin=False)
        await client.send_frame(OP_PING, b"mid")  # control frames may come between fragments
        await client.send_frame(OP_CONTINUATION, b"llo", fin=True)
        pong = await client.recv_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
        echo = await client.recv_frame()
        assert (echo.opcode, echo.fin, echo.payload) == (OP_TEXT, True, "héllo".encode())
        await client.send_text("next")
        nxt = await client.recv_frame()
        assert nxt.payload == b"next", "the fragments were delivered once"
    assert recorder.of("text") == [("héllo",), ("next",)]


async def test_fragmented_binary_message_is_reassembled(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(recording_echo(recorder))
    async with await RawWebSocket.connect(srv.port) as client:
        await client.send_frame(OP_BINARY, b"\x00\x01", fin=False)
        await client.send_frame(OP_CONTINUATION, b"", fin=False)
        await client.send_frame(OP_CONTINUATION, b"\x02", fin=True)
        echo = await client.recv_frame()
        assert (echo.opcode, echo.payload) == (OP_BINARY, b"\x00\x01\x02")
    assert recorder.of("bytes") == [(b"\x00\x01\x02",)]


def _in_flight(server_port: int, client_ports: set[int]) -> int:
    """Bytes from these clients that the server has not read yet: the clients' send queues and
    the server sockets' receive queues, from /proc/net/tcp."""
    total = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
            tx_queue, rx_queue = (int(q, 16) for q in fields[4].split(":"))
            if local in client_ports and remote == server_port:
                total += tx_queue
            elif local == server_port and remote in client_ports:
                total += rx_queue
    return total


def _wait_until_read(server_port: int, socks: list[socket.socket], timeout: float = 10) -> None:
    """Block until the server has read everything these sockets sent (the loop does not run)."""
    ports = {s.getsockname()[1] for s in socks}
    deadline = time.monotonic() + timeout
    while _in_flight(server_port, ports) > 0:
        assert time.monotonic() < deadline, f"the server did not read within {timeout} s"
        time.sleep(0.005)


async def test_large_frames_arriving_slowly_are_held_once_at_their_size(serve: ServeFn, recorder: Recorder) -> None:
    """Eight connections each send a 16 MiB binary frame in pieces, all at the same time: the
    server holds each in one buffer of the frame's size, reserved from the header, and hands it
    on without a copy. The server runs in this process: its peak RSS grows by the eight frames
    and at most 1 MiB each, while they are all partial and as they complete (before the loop
    turns them into bytes objects, which it cannot do while this test blocks it). A buffer that
    grew by doubling and was copied out once complete peaked at +159 MiB here."""
    if not reset_peak_rss():
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    size, clients, piece = 16 * MIB, 8, 256 * 1024

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("bytes", len(data), data.count(0) == len(data))

    srv = await serve(websocket.init().on_bytes(on_bytes).max_payload_length(size))
    socks = list(await asyncio.gather(*(asyncio.to_thread(blocking_connect, srv.port) for _ in range(clients))))
    key = os.urandom(4)
    head = struct.pack(">BBQ", 0x82, 0x80 | 127, size) + key
    masked = memoryview(key * (size // 4))  # a payload of zeros, masked

    def send_all_but_the_last_byte(sock: socket.socket) -> None:
        sock.sendall(head)
        for at in range(0, size - 1, piece):
            sock.sendall(masked[at:min(at + piece, size - 1)])

    try:
        assert reset_peak_rss()
        baseline = status_kib("VmHWM")
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(clients) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, send_all_but_the_last_byte, s) for s in socks))
        # From here the loop is blocked on purpose: the engine's threads read and complete the
        # frames, and no bytes object is made until the peak is measured.
        _wait_until_read(srv.port, socks)
        partial = status_kib("VmHWM")
        for sock in socks:
            sock.sendall(masked[size - 1:])
        _wait_until_read(srv.port, socks)
        # The engine counts a message in once it has parsed it and queued it for Python.
        deadline = time.monotonic() + 10
        while srv.stats()["messages_in"] < clients:
            assert time.monotonic() < deadline, f"{srv.stats()['messages_in']} of {clients} frames parsed in 10 s"
            time.sleep(0.001)
        peak = status_kib("VmHWM")
        growth = (peak - baseline) * 1024
        limit = clients * (size + MIB)
        assert growth < limit, (
            f"peak RSS +{growth / MIB:.0f} MiB for {clients} x 16 MiB frames "
            f"(+{(partial - baseline) / 1024:.0f} MiB while partial; limit {limit / MIB:.0f} MiB)"
        )
        await recorder.wait_for(lambda: len(recorder.of("bytes")) == clients, timeout=20)
        assert recorder.of("bytes") == [(size, True)] * clients
    finally:
        for sock in socks:
            sock.close()
