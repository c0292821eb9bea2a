"""Send a client N numbered messages as fast as it reads them, pausing while it is congested.

`send` never blocks: it tells you what happened. On MessageBackpressured stop, and carry on
from on_drain; MessageDropped means the message was discarded (here: the client left).
"""

from __future__ import annotations

from dataclasses import dataclass

import brioche
from brioche import MessageBackpressured, MessageDropped, MessageSent, server, websocket


@dataclass
class Stream:  # ws.data: messages 0..total-1, then "done" (number total); next is the one to send
    next: int = 1
    total: int = 0


def pump(ws: brioche.WebSocket[Stream]) -> None:
    stream = ws.data
    while stream.next <= stream.total:
        message = "done" if stream.next == stream.total else f"{stream.next} " + "x" * 1000
        match ws.send(message):
            case MessageSent():
                stream.next += 1
            case MessageBackpressured():
                stream.next += 1  # queued, but the client is slow: wait for on_drain
                return
            case MessageDropped():
                return  # not sent: the socket is closing or over its limit


def on_text(ws: brioche.WebSocket[Stream], text: str) -> None:
    ws.data.total = int(text)  # "how many?"
    ws.data.next = 0
    pump(ws)


def fetch(request: server.Request, srv: brioche.Server[Stream]) -> server.Response | None:
    return server.upgrade(srv, request, [], Stream(), server.bad_request)


app = server.handler(fetch).websocket(websocket.init().on_text(on_text).on_drain(pump))

if __name__ == "__main__":
    app.run()
