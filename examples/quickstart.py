import asyncio
import brioche
from brioche import server, websocket
from brioche import MessageSent, MessageBackpressured, MessageDropped

async def on_open(ws: brioche.WebSocket[str]) -> None:
    ws.send(f"hello {ws.data}")

async def on_text(ws: brioche.WebSocket[str], text: str) -> None:
    match websocket.send(ws, "echo: " + text):          # the spec's style: module functions
        case MessageSent(bytes_sent=n): ...
        case MessageBackpressured() | MessageDropped(): ...

def on_bytes(ws: brioche.WebSocket[str], data: bytes) -> None:   # plain functions work too
    ws.send_bytes(data)

async def on_close(ws: brioche.WebSocket[str], code: int, reason: str) -> None: ...

def ws_config() -> websocket.Config[str]:
    return websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes).on_close(on_close)

async def handler(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
    if request.path == "/ws":
        session_id = brioche.random_uuid_v7()
        # the spec's style: the last argument answers a request that is not a WebSocket handshake
        return server.upgrade(srv, request, [("x-session", session_id)], session_id, server.bad_request)
    return server.text("hello from brioche")

async def main() -> None:
    srv = await server.handler(handler).websocket(ws_config()).hostname("127.0.0.1").port(0).serve()
    print(srv.port)
    await srv.stop()

if __name__ == "__main__":
    asyncio.run(main())
