"""Text and binary messages round-trip byte-exact through real sockets."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.asyncio.client import connect

import brioche
from brioche import MessageSent, websocket
from conftest import Recorder, ServeFn, ws_url


def echo_config(recorder: Recorder | None = None) -> websocket.Config[Any]:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        status = ws.send(text)
        if recorder is not None:
            recorder.add("sent", status)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data)

    return websocket.init().on_text(on_text).on_bytes(on_bytes)


@pytest.mark.parametrize(
    "message",
    ["", "a", "héllo wörld ✓ 🥐", "x" * 125, "y" * 126, "z" * 65_536, "€" * (1024 * 1024 // 3)],
    ids=["empty", "1-byte", "non-ascii", "125", "126", "64KiB", "1MiB-utf8"],
)
async def test_text_echo_is_exact(serve: ServeFn, message: str) -> None:
    srv = await serve(echo_config())
    async with connect(ws_url(srv), max_size=None) as client:
        await client.send(message)
        assert await client.recv() == message


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", bytes(range(256)), b"\xff" * (1024 * 1024)],
    ids=["empty", "1-byte", "all-byte-values", "1MiB"],
)
async def test_binary_echo_is_exact(serve: ServeFn, payload: bytes) -> None:
    srv = await serve(echo_config())
    async with connect(ws_url(srv), max_size=None) as client:
        await client.send(payload)
        reply = await client.recv()
        assert isinstance(reply, bytes)
        assert reply == payload


async def test_one_frame_binary_messages_pipelined_come_back_exact_and_in_order(serve: ServeFn) -> None:
    """One-frame binary messages that arrive over several reads reach the handler still masked
    and are unmasked by the copy into ``bytes``, alone or several in one drain (a run). Each
    payload differs at every position, so a key applied at the wrong offset shows."""
    srv = await serve(echo_config())
    sizes = [1, 31, 33, 40_000, 70_001, 300_000, 1024 * 1024 + 5]
    payloads = [bytes((i * 7 + n) % 251 for i in range(size)) for n, size in enumerate(sizes)]
    async with connect(ws_url(srv), max_size=None) as client:
        for payload in payloads:
            await client.send(payload)
        for payload in payloads:
            assert await client.recv() == payload


async def test_one_frame_texts_of_64kib_and_more_come_back_exact_and_in_order(serve: ServeFn) -> None:
    """Text of 64 KiB or more in one frame reaches the loop still masked and is unmasked by the
    copy into its ``str``, ASCII checked in the same pass, anything else through the decoder.
    Around the size where that starts, ASCII and not, with the one non-ASCII character first,
    last or in a 32-byte block's tail; each payload differs at every position, so a key applied
    at the wrong offset shows."""
    srv = await serve(echo_config())

    def ascii_of(size: int, n: int) -> str:
        return "".join(chr(32 + (i * 7 + n) % 95) for i in range(size))

    messages = [ascii_of(size, n) for n, size in enumerate([65_535, 65_536, 65_537, 300_001])]
    messages += [
        "é" + ascii_of(70_000, 1),
        ascii_of(70_000, 2) + "🥐",
        ascii_of(70_003, 3)[:-5] + "ü" + ascii_of(3, 4),
        "€" * (1024 * 1024 // 3),
        ascii_of(1024 * 1024 + 5, 5),
        "small after them",
    ]
    async with connect(ws_url(srv), max_size=None) as client:
        for message in messages:
            await client.send(message)
        for message in messages:
            assert await client.recv() == message


async def test_send_reports_utf8_length(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    async with connect(ws_url(srv)) as client:
        await client.send("héllo 🥐")
        assert await client.recv() == "héllo 🥐"
    assert recorder.of("sent") == [(MessageSent(len("héllo 🥐".encode())),)]
