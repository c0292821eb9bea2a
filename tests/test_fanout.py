"""Fan-out: one topic, 1,000 subscribers, 100 server publishes: all delivered, in order, once."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

import brioche
from brioche import MessageBackpressured, MessageSent, websocket
from conftest import Recorder, ServeFn, ws_url

SUBSCRIBERS = 1_000
PUBLISHES = 100
CONNECT_CONCURRENCY = 50


def raise_open_file_limit(needed: int) -> None:
    """Client and server sockets share this process: 2 descriptors per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    assert soft == resource.RLIM_INFINITY or soft >= needed, f"RLIMIT_NOFILE {soft} < {needed}"


async def test_every_subscriber_receives_every_publish_in_order_once(serve: ServeFn, recorder: Recorder) -> None:
    raise_open_file_limit(2 * SUBSCRIBERS + 200)

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("fan")
        recorder.add("open")

    srv = await serve(websocket.init().on_open(on_open))
    url = ws_url(srv)
    clients: list[ClientConnection] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one() -> None:
        async with gate:
            clients.append(await connect(url, ping_interval=None, open_timeout=10))

    try:
        for batch in range(0, SUBSCRIBERS, 250):
            await asyncio.wait_for(
                asyncio.gather(*(open_one() for _ in range(min(250, SUBSCRIBERS - batch)))), 20
            )
        await recorder.wait_for(lambda: len(recorder.of("open")) == SUBSCRIBERS, timeout=10)
        assert srv.subscriber_count("fan") == SUBSCRIBERS

        messages = [f"message {i:03d}" for i in range(PUBLISHES)]
        statuses = [srv.publish("fan", m) for m in messages]
        statuses.append(srv.publish("fan", "end"))
        assert all(s == MessageSent(len("message 000")) or s == MessageBackpressured() for s in statuses[:-1]), (
            {repr(s) for s in statuses}
        )

        async def collect(client: ClientConnection) -> list[str | bytes]:
            got: list[str | bytes] = []
            for _ in range(PUBLISHES + 1):
                got.append(await client.recv())
            return got

        received = await asyncio.wait_for(asyncio.gather(*(collect(c) for c in clients)), 20)
        wrong = [i for i, got in enumerate(received) if got != [*messages, "end"]]
        assert wrong == [], f"{len(wrong)} subscribers got a wrong sequence, e.g. {received[wrong[0]][:5]}"
    finally:
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in clients), return_exceptions=True), 20)
