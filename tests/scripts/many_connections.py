"""Open N WebSocket connections to 127.0.0.1:PORT, echo once on each, then reset them all.

    python many_connections.py PORT N

Prints "ready" once every connection has echoed, waits for a line on stdin, then closes every
socket with RST (SO_LINGER 0) and prints "reset". Run as its own process so that the server
and the clients each have their own descriptor limit.
"""

import asyncio
import base64
import os
import resource
import socket
import struct
import sys


async def open_one(port: int, i: int, limit: asyncio.Semaphore) -> asyncio.StreamWriter:
    async with limit:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws?c{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        payload = b"live %d" % i
        writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
        echoed = await reader.readexactly(2 + len(payload))
        assert echoed[2:] == payload, echoed
        return writer


async def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = asyncio.Semaphore(200)
    writers = await asyncio.gather(*(open_one(port, i, limit) for i in range(count)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    print("reset", flush=True)


asyncio.run(main())
