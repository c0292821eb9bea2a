"""socketify (uWebSockets via cffi) bench server.

usage: socketify_server.py PORT
  any path: echo;  /sub: subscribed to "bench";  /pub: messages are ``app.publish``ed to "bench"
  ("#x ..." to the topic x);  /t/a,b,c: subscribed to a, b and c, "+x"/"-x" (un)subscribe (S8).
"""

from __future__ import annotations

from socketify import App, CompressOptions, OpCode

from common import TOPIC, backpressure_limit, listening, publish_topic, setup, topics_of

MIB = 1024 * 1024


def main(port: int) -> None:
    app = App()
    base = {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 16 * MIB,
        "max_backpressure": backpressure_limit(),
        "close_on_backpressure_limit": False,
        "idle_timeout": 120,
    }

    def echo(ws, message, opcode):  # type: ignore[no-untyped-def]
        ws.send(message, opcode)

    def sub_open(ws):  # type: ignore[no-untyped-def]
        ws.subscribe(TOPIC)

    def publish(ws, message, opcode):  # type: ignore[no-untyped-def]
        topic = publish_topic(message) if isinstance(message, str) else TOPIC
        app.publish(topic, message, opcode)

    def topics_upgrade(res, req, context):  # type: ignore[no-untyped-def]
        # The path is only known here: it rides to open() as the socket's user data.
        res.upgrade(req.get_header("sec-websocket-key"), req.get_header("sec-websocket-protocol"),
                    req.get_header("sec-websocket-extensions"), context, req.get_url())

    def topics_open(ws):  # type: ignore[no-untyped-def]
        for topic in topics_of(ws.get_user_data()):
            ws.subscribe(topic)

    def topics_message(ws, message, opcode):  # type: ignore[no-untyped-def]
        if message[:1] == "+":
            ws.subscribe(message[1:])
        elif message[:1] == "-":
            ws.unsubscribe(message[1:])
        ws.send(message, opcode)

    def ignore(ws, message, opcode):  # type: ignore[no-untyped-def]
        pass

    app.ws("/sub", {**base, "open": sub_open, "message": ignore})
    app.ws("/pub", {**base, "message": publish})
    app.ws("/t/*", {**base, "upgrade": topics_upgrade, "open": topics_open,
                    "message": topics_message})
    app.ws("/*", {**base, "message": echo})
    app.any("/*", lambda res, req: res.end("socketify bench server"))
    app.listen(
        {"port": port, "host": "127.0.0.1"},
        lambda config: listening("socketify", port),
    )
    app.run()


if __name__ == "__main__":
    main(setup())
