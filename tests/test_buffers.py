"""send_bytes, publish_bytes and ping take any buffer, not only bytes: under abi3 (no PyBuffer
before 3.11) the other buffers go through memoryview(...).tobytes()."""

from __future__ import annotations

import array
from typing import Any

import pytest
from websockets.asyncio.client import connect

import brioche
from brioche import MessageSent, websocket
from conftest import Recorder, ServeFn, ws_url

PAYLOAD = bytes(range(256)) * 3


def as_buffer(kind: str) -> Any:
    if kind == "bytearray":
        return bytearray(PAYLOAD)
    if kind == "memoryview":
        return memoryview(PAYLOAD)
    if kind == "memoryview-slice":
        return memoryview(b"-" + PAYLOAD + b"-")[1:-1]
    if kind == "strided":  # not contiguous: every other byte of a buffer twice as long
        return memoryview(bytes(b for byte in PAYLOAD for b in (byte, 0)))[::2]
    assert kind == "array"
    return array.array("B", PAYLOAD)


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "memoryview-slice", "strided", "array"])
async def test_send_bytes_takes_any_buffer(serve: ServeFn, recorder: Recorder, kind: str) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("sent", ws.send_bytes(as_buffer(kind)))

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("go")
        assert await client.recv() == PAYLOAD
    assert recorder.of("sent") == [(MessageSent(len(PAYLOAD)),)]


async def test_send_bytes_refuses_what_is_not_a_buffer(serve: ServeFn, recorder: Recorder) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        values: list[Any] = [3, "text", None]
        for value in values:
            try:
                ws.send_bytes(value)
            except TypeError:
                recorder.add("refused", type(value).__name__)
        ws.send("done")

    srv = await serve(websocket.init().on_text(on_text))
    async with connect(ws_url(srv)) as client:
        await client.send("go")
        assert await client.recv() == "done"
    assert recorder.of("refused") == [("int",), ("str",), ("NoneType",)]


async def test_the_type_hints_take_any_buffer(serve: ServeFn, recorder: Recorder) -> None:
    """The annotations say ``Buffer``, as the runtime takes: CI's ``mypy --strict`` of this
    file refused an ``array`` where they said ``bytes | bytearray | memoryview``."""
    payload = array.array("B", PAYLOAD)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.subscribe("t")
        recorder.add("sent", ws.send(payload), websocket.send_bytes(ws, payload))
        recorder.add("published", ws.publish("t", payload), ws.ping(array.array("B", b"p")))

    srv = await serve(websocket.init().on_text(on_text).publish_to_self(True))
    async with connect(ws_url(srv)) as client:
        await client.send("go")
        assert [await client.recv() for _ in range(3)] == [PAYLOAD] * 3
    assert recorder.of("sent") == [(MessageSent(len(PAYLOAD)), MessageSent(len(PAYLOAD)))]
    assert recorder.of("published") == [(MessageSent(len(PAYLOAD)), MessageSent(1))]
