"""picows bench server (on uvloop, as picows recommends).

usage: picows_server.py PORT [uvloop|asyncio]
  any path: echo;  /sub: subscribed to "bench";  /pub: each message is sent to every /sub.
"""

from __future__ import annotations

import asyncio
import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from common import listening, setup

subscribers: set[WSTransport] = set()


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


class Pub(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT or frame.msg_type == WSMsgType.BINARY:
            payload = frame.get_payload_as_bytes()
            kind = frame.msg_type
            for sub in subscribers:
                sub.send(kind, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            _close(transport, frame)


def route(request: WSUpgradeRequest) -> WSListener:
    if request.path == b"/sub":
        return Sub()
    if request.path == b"/pub":
        return Pub()
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
