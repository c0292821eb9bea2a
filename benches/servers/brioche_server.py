"""brioche bench server: one Python handler per message.

usage: brioche_server.py PORT [asyncio|uvloop] [sync|async|async-sleep0]
  any path: echo (``ws.send(text)`` in ``on_text``);  /sub: subscribed to "bench";
  /pub: each text message is published to "bench" with ``srv.publish``;
  /t/a,b,c: subscribed to a, b and c, "+x"/"-x" (un)subscribe (S8; the sync mode only).
With ``BRIOCHE_BENCH_REDIS=redis://...`` in the environment the topic is shared with the other
processes using that Redis (``pubsub_redis``; S6).

The handler mode says what ``on_text`` is (``on_open`` and ``on_bytes`` stay plain functions):
  sync          ``def on_text``: a direct call per message (the default)
  async         ``async def on_text`` that never awaits: a task per message that finishes in
                its first step (eager on 3.12+, so no loop iteration; a plain Task before)
  async-sleep0  ``async def on_text`` that awaits ``asyncio.sleep(0)`` before sending: every
                message suspends once, and that connection's later messages park behind it
  deflate       ``sync`` with permessage-deflate accepted and every echo and publish sent with
                ``compress=True``, negotiated as Bun's ``perMessageDeflate: true`` is (no context
                takeover either way: its shared compressor and decompressor), for the same work
                on both sides; Bun sends with ``send(msg, true)``, ``publish(topic, msg, true)``
  deflate-takeover  ``deflate`` with brioche's default ``per_message_deflate(True)``: context
                takeover both ways, so each connection keeps its compressor and decompressor
                (S4d's second brioche row: what that default costs per connection)
"""

from __future__ import annotations

import asyncio
import os
import sys

import brioche
from brioche import server, websocket

from common import (TOPIC, TOPICS_PATH, backpressure_limit, listening, publish_topic, setup,
                    topics_of)

SUB, PUB, ECHO = "sub", "pub", "echo"
MODES = ("sync", "async", "async-sleep0", "deflate", "deflate-takeover")
_srv: brioche.Server[str] | None = None


def on_open(ws: brioche.WebSocket[str]) -> None:
    if ws.data == SUB:
        ws.subscribe(TOPIC)
    elif ws.data.startswith(TOPICS_PATH):
        for topic in topics_of(ws.data):
            ws.subscribe(topic)


def on_text(ws: brioche.WebSocket[str], text: str) -> None:
    # The echo first: S1's path pays one comparison, as before S8's topics.
    role = ws.data
    if role == ECHO:
        ws.send(text)
    elif role == PUB:
        assert _srv is not None
        _srv.publish(publish_topic(text), text)
    elif role == SUB:
        ws.send(text)
    elif text[:1] == "+":
        ws.subscribe(text[1:])
        ws.send(text)
    elif text[:1] == "-":
        ws.unsubscribe(text[1:])
        ws.send(text)


async def on_text_async(ws: brioche.WebSocket[str], text: str) -> None:
    if ws.data == PUB:
        assert _srv is not None
        _srv.publish(TOPIC, text)
    else:
        ws.send(text)


async def on_text_sleep0(ws: brioche.WebSocket[str], text: str) -> None:
    await asyncio.sleep(0)
    if ws.data == PUB:
        assert _srv is not None
        _srv.publish(TOPIC, text)
    else:
        ws.send(text)


def on_text_deflate(ws: brioche.WebSocket[str], text: str) -> None:
    if ws.data == PUB:
        assert _srv is not None
        _srv.publish(TOPIC, text, compress=True)
    else:
        ws.send(text, compress=True)


def on_bytes(ws: brioche.WebSocket[str], data: bytes) -> None:
    ws.send_bytes(data)


def handler(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
    path = request.path
    role = (SUB if path == "/sub" else PUB if path == "/pub"
            else path if path.startswith(TOPICS_PATH) else ECHO)
    if srv.upgrade(request, data=role):
        return None
    return server.text("brioche bench server")


async def main(port: int, loop_name: str, mode: str) -> None:
    global _srv
    text = {"sync": on_text, "async": on_text_async, "async-sleep0": on_text_sleep0,
            "deflate": on_text_deflate, "deflate-takeover": on_text_deflate}[mode]
    # Over the limit, sends to that connection are dropped and it stays open: what Bun's
    # backpressureLimit and socketify's max_backpressure do with closeOnBackpressureLimit off.
    config = (websocket.init().on_open(on_open).on_text(text).on_bytes(on_bytes)
              .backpressure_limit(backpressure_limit()).close_on_backpressure_limit(False))
    if mode == "deflate":
        config = config.per_message_deflate(websocket.DeflateOptions(
            server_no_context_takeover=True, client_no_context_takeover=True))
    elif mode == "deflate-takeover":
        config = config.per_message_deflate(True)
    server_config = server.handler(handler).websocket(config).hostname("127.0.0.1").port(port)
    redis_url = os.environ.get("BRIOCHE_BENCH_REDIS")
    if redis_url:
        server_config = server_config.pubsub_redis(redis_url)
    if os.environ.get("BENCH_TLS_CERT"):
        # benches/run.py's TLS scenarios (S1T, S3T).
        server_config = server_config.tls(os.environ["BENCH_TLS_CERT"], os.environ["BENCH_TLS_KEY"])
    _srv = await server_config.serve()
    version = ".".join(map(str, sys.version_info[:3]))
    listening(f"brioche ({loop_name}, {mode} on_text, CPython {version})", _srv.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port = setup()
    loop_name = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    mode = sys.argv[3] if len(sys.argv) > 3 else "sync"
    if mode not in MODES:
        sys.exit(f"unknown handler mode {mode!r}: one of {', '.join(MODES)}")
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main(port, loop_name, mode))
    else:
        asyncio.run(main(port, loop_name, mode))
