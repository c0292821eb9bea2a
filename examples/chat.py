"""A chat room per path: /rooms/<room>?name=<name>. Every line goes to everyone in the room."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qs

import brioche
from brioche import server, websocket


@dataclass(frozen=True)
class User:  # what each connection carries, as ws.data
    name: str
    room: str
    server: brioche.Server[User]


def on_open(ws: brioche.WebSocket[User]) -> None:
    ws.subscribe(ws.data.room)
    ws.publish(ws.data.room, json.dumps({"joined": ws.data.name}))


def on_text(ws: brioche.WebSocket[User], text: str) -> None:
    # publish_to_self is on: the sender gets its own line too, in order with everyone else's.
    ws.publish(ws.data.room, json.dumps({"from": ws.data.name, "text": text}))


def on_close(ws: brioche.WebSocket[User], code: int, reason: str) -> None:
    # The socket left its topics when the close began: the server's publish tells the room.
    ws.data.server.publish(ws.data.room, json.dumps({"left": ws.data.name}))


def fetch(request: server.Request, srv: brioche.Server[User]) -> server.Response | None:
    room = request.path.removeprefix("/rooms/")
    name = parse_qs(request.query).get("name", [""])[0]
    if room == request.path or not room or not name:
        return server.bad_request()
    user = User(name=name, room=room, server=srv)
    return server.upgrade(srv, request, [], user, server.bad_request)


ws_config = (
    websocket.init()
    .on_open(on_open)
    .on_text(on_text)
    .on_close(on_close)
    .publish_to_self(True)
)
app = server.handler(fetch).websocket(ws_config)

if __name__ == "__main__":
    app.run()
