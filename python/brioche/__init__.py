"""brioche: a WebSocket server for asyncio with a Rust (tokio) core, modelled on Bun's API.

An echo server in upper case, and a client (``websockets``) that talks to it. The examples in
these docstrings run as written, with top-level ``await`` as in ``python -m asyncio``; the
others assume the first two lines of this one.

```pycon
>>> import brioche
>>> from brioche import server, websocket
>>> def on_text(ws, text):
...     ws.send(text.upper())
>>> def handler(request, srv):
...     return server.upgrade(srv, request, [], None, server.bad_request)
>>> config = server.handler(handler).websocket(websocket.init().on_text(on_text))
>>> from websockets.asyncio.client import connect
>>> async with config.hostname("127.0.0.1").port(0).serve() as srv:
...     async with connect(f"ws://127.0.0.1:{srv.port}/") as client:
...         await client.send("hello")
...         print(await client.recv())
HELLO
```
"""

from brioche._brioche import (
    BriocheError,
    MessageBackpressured,
    MessageDropped,
    MessageSent,
    WebSocket,
    __version__,
    random_uuid_v7,
)
from brioche._enums import CloseCode, ReadyState
from brioche._http import SocketAddress
from brioche._server import BindError, Server, Stats
from brioche import server, websocket
from brioche.websocket import SendStatus, WebSocketSendStatus

__all__ = [
    "BindError",
    "BriocheError",
    "CloseCode",
    "MessageBackpressured",
    "MessageDropped",
    "MessageSent",
    "ReadyState",
    "SendStatus",
    "Server",
    "SocketAddress",
    "Stats",
    "WebSocket",
    "WebSocketSendStatus",
    "__version__",
    "random_uuid_v7",
    "server",
    "websocket",
]
