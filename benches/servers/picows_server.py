"""picows bench server (on uvloop, as picows recommends).

usage: picows_server.py PORT [uvloop|asyncio]
  any path: echo;  /sub: subscribed to "bench";  /pub: each message is sent to every /sub
  ("#x ..." to the subscribers of x);  /t/a,b,c: subscribed to a, b and c, "+x"/"-x"
  (un)subscribe (S8). picows has no topics: a dict of sets here.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from common import listening, setup, topics_of

subscribers: set[WSTransport] = set()
by_topic: defaultdict[str, set[WSTransport]] = defaultdict(set)


def _close(transport: WSTransport, frame: WSFrame) -> None:
    transport.send_close(frame.get_close_code(), frame.get_close_message())
    transport.disconnect()


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT or frame.msg_type == WSMsgType.BINARY:
            transport.send(frame.msg_type, frame.get_payload_as_memoryview())
        elif frame.msg_type == WSMsgType.CLOSE:
            _close(transport, frame)


class Sub(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        subscribers.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        subscribers.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            _close(transport, frame)


class Topics(WSListener):
    def __init__(self, topics: list[str]) -> None:
        self.topics = set(topics)

    def on_ws_connected(self, transport: WSTransport) -> None:
        for topic in self.topics:
            by_topic[topic].add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for topic in self.topics:
            by_topic[topic].discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            text = frame.get_payload_as_ascii_text()
            topic = text[1:]
            if text[:1] == "+":
                self.topics.add(topic)
                by_topic[topic].add(transport)
            elif text[:1] == "-":
                self.topics.discard(topic)
                by_topic[topic].discard(transport)
            transport.send(WSMsgType.TEXT, text.encode())
        elif frame.msg_type == WSMsgType.CLOSE:
            _close(transport, frame)


class Pub(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT or frame.msg_type == WSMsgType.BINARY:
            payload = frame.get_payload_as_bytes()
            kind = frame.msg_type
            if payload[:1] == b"#":
                topic = payload[1:payload.index(b" ")].decode()
                for sub in by_topic.get(topic, ()):
                    sub.send(kind, payload)
                return
            for sub in subscribers:
                sub.send(kind, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            _close(transport, frame)


def route(request: WSUpgradeRequest) -> WSListener:
    if request.path == b"/sub":
        return Sub()
    if request.path == b"/pub":
        return Pub()
    if request.path.startswith(b"/t/"):
        return Topics(topics_of(request.path.decode()))
    return Echo()


async def main(port: int, loop_name: str) -> None:
    server = await ws_create_server(route, "127.0.0.1", port, backlog=4096)
    listening(f"picows ({loop_name})", port)
    await server.serve_forever()


if __name__ == "__main__":
    port = setup()
    loop_name = sys.argv[2] if len(sys.argv) > 2 else "uvloop"
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main(port, loop_name))
    else:
        asyncio.run(main(port, loop_name))
