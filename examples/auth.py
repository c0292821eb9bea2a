"""HTTP routes next to the WebSocket, and a token checked before the upgrade.

The handler may be `async def`: it runs as an asyncio task, so it can await a database or an
HTTP API before it decides.
"""

from __future__ import annotations

import asyncio
import contextvars

import brioche
from brioche import server, websocket

TOKENS = {"s3cret": "ada"}  # stands in for a real lookup
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def user_for(token: str) -> str | None:
    await asyncio.sleep(0)  # e.g. a database query
    return TOKENS.get(token)


async def fetch(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
    if request.path == "/health":
        return server.json({"connections": srv.pending_websockets})
    if request.path == "/echo" and request.method == "POST":
        return server.text(request.text())
    if request.path != "/ws":
        return server.not_found()
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    user = await user_for(token)
    if user is None:
        return server.Response(401, (("content-type", "text/plain"),), "who are you?\n")
    # Handlers of this connection run in a copy of this context: they see request_id.
    request_id.set(request.headers.get("x-request-id", "-"))
    return server.upgrade(srv, request, [("x-user", user)], user, server.bad_request)


async def on_open(ws: brioche.WebSocket[str]) -> None:
    ws.send(f"hello {ws.data} (request {request_id.get()})")


async def on_text(ws: brioche.WebSocket[str], text: str) -> None:
    await asyncio.sleep(0.01)  # slow work: this connection's next message waits for it
    ws.send(text.upper())


app = server.handler(fetch).websocket(websocket.init().on_open(on_open).on_text(on_text))

if __name__ == "__main__":
    app.run()
