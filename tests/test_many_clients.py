"""Many simultaneous clients, each getting its own messages back, complete and in order."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import connect

import brioche
from brioche import websocket
from conftest import Recorder, ServeFn, ws_url

CLIENTS = 200
MESSAGES = 100


async def test_200_clients_each_get_100_echoes_in_order(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws.data)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", ws.data, code)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_close(on_close))
    all_connected = asyncio.Event()
    connected = 0

    async def client(n: int) -> list[str]:
        nonlocal connected
        async with connect(ws_url(srv, f"/ws?{n}"), open_timeout=30) as ws:
            connected += 1
            if connected == CLIENTS:
                all_connected.set()
            # Every client is connected at the same time before anyone sends.
            await all_connected.wait()
            for i in range(MESSAGES):
                await ws.send(f"{n}:{i}")
            return [await ws.recv() for _ in range(MESSAGES)]  # type: ignore[misc]

    results = await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(CLIENTS))), 60)

    for n, received in enumerate(results):
        assert received == [f"{n}:{i}" for i in range(MESSAGES)], f"client {n}"
    await recorder.wait_for(lambda: len(recorder.of("close")) == CLIENTS, 30)
    assert sorted(recorder.of("open")) == sorted((str(n),) for n in range(CLIENTS))
    assert sorted(recorder.of("close")) == sorted((str(n), 1000) for n in range(CLIENTS))


async def test_200_clients_binary_interleaved_round_trips(serve: ServeFn) -> None:
    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data)

    srv = await serve(websocket.init().on_bytes(on_bytes))

    async def client(n: int) -> list[bytes]:
        async with connect(ws_url(srv), open_timeout=30) as ws:
            got: list[bytes] = []
            for i in range(20):
                payload = n.to_bytes(2, "big") + i.to_bytes(2, "big") + bytes([i]) * i
                await ws.send(payload)
                reply = await ws.recv()
                assert isinstance(reply, bytes) and reply == payload, (n, i)
                got.append(reply)
            return got

    results = await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(CLIENTS))), 60)
    assert len(results) == CLIENTS and all(len(r) == 20 for r in results)
