"""socketify (uWebSockets via cffi) bench server.

usage: socketify_server.py PORT
  any path: echo;  /sub: subscribed to "bench";  /pub: messages are ``app.publish``ed to "bench".
"""

from __future__ import annotations

from socketify import App, CompressOptions, OpCode

from common import TOPIC, backpressure_limit, listening, setup

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
        app.publish(TOPIC, message, opcode)

    def ignore(ws, message, opcode):  # type: ignore[no-untyped-def]
        pass

    app.ws("/sub", {**base, "open": sub_open, "message": ignore})
    app.ws("/pub", {**base, "message": publish})
    app.ws("/*", {**base, "message": echo})
    app.any("/*", lambda res, req: res.end("socketify bench server"))
    app.listen(
        {"port": port, "host": "127.0.0.1"},
        lambda config: listening("socketify", port),
    )
    app.run()


if __name__ == "__main__":
    main(setup())
