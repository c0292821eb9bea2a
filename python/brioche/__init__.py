"""brioche: a WebSocket server for asyncio with a Rust (tokio) core, modelled on Bun's API.

```pycon
>>> import brioche
>>> from brioche import server, websocket
>>> config = websocket.init().on_text(lambda ws, text: ws.send(text) and None)
>>> srv = await server.handler(handler).websocket(config).port(0).serve()
```
"""

from brioche._brioche import (
    BriocheError,
    MessageBackpressured,
    MessageDropped,
    MessageSent,
    WebSocket,
    random_uuid_v7,
)
from brioche._enums import CloseCode, ReadyState
from brioche._http import SocketAddress
from brioche._server import BindError, Server, Stats
from brioche import server, websocket
from brioche.websocket import SendStatus

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
    "random_uuid_v7",
    "server",
    "websocket",
]

__version__ = "0.1.0"
