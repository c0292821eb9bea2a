"""A second brioche process sharing topics through Redis; prints its port once listening.

``redis_peer.py REDIS_URL [NAMESPACE [sharded]]``. ``/ws?a,b`` subscribes to a and b on open.
Text commands: ``pub <topic> <message>`` publishes from that socket, ``sub <topic>`` and
``unsub <topic>`` (un)subscribe it, ``churn <n> <topic>`` subscribes it to and unsubscribes it
from ``topic`` ``n`` times (``#`` in ``topic`` replaced by 0, 1, ... for distinct topics) and
answers ``churned``, ``stats`` answers the server's stats as JSON, ``count <topic>`` answers
``subscriber_count``. Runs until killed.
"""

import asyncio
import json
import sys
from typing import Any

import brioche
from brioche import server, websocket

url = sys.argv[1]
namespace = sys.argv[2] if len(sys.argv) > 2 else "brioche:"
sharded = len(sys.argv) > 3 and sys.argv[3] == "sharded"
servers: list[brioche.Server[Any]] = []


def on_open(ws: brioche.WebSocket[Any]) -> None:
    for topic in (ws.data or "").split(","):
        if topic:
            ws.subscribe(topic)


def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
    command, _, rest = text.partition(" ")
    if command == "pub":
        topic, _, message = rest.partition(" ")
        ws.publish(topic, message)
    elif command == "sub":
        ws.subscribe(rest)
    elif command == "unsub":
        ws.unsubscribe(rest)
    elif command == "churn":
        count, _, pattern = rest.partition(" ")
        for i in range(int(count)):
            topic = pattern.replace("#", str(i))
            ws.subscribe(topic)
            ws.unsubscribe(topic)
        ws.send("churned")
    elif command == "stats":
        ws.send(json.dumps(servers[0].stats()))
    elif command == "count":
        ws.send(str(servers[0].subscriber_count(rest)))


def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
    return server.upgrade(srv, request, [], request.query or None, server.bad_request)


async def main() -> None:
    ws_config = websocket.init().on_open(on_open).on_text(on_text)
    config = server.handler(handler).websocket(ws_config).hostname("127.0.0.1").port(0)
    config = config.pubsub_redis(url, sharded=sharded, namespace=namespace)
    srv = await config.serve()
    servers.append(srv)
    print(srv.port, flush=True)
    await srv.serve_forever()


asyncio.run(main())
