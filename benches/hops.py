"""Measure the cost of each hop of the bridge, for ARCHITECTURE.md.

    .venv/bin/python benches/hops.py

Prints ns per operation for: `ws.send` (Python -> Rust queue), drain + dispatch per event (the
loop side of Rust -> Python), the loop thread's CPU time per message with a sync and with an
await-free `async def` echo handler (an eager task on 3.12+, a plain task before), the round
trip of one 32-byte message through a sync Python echo handler, seen by a raw blocking client in
another process (the sum of all hops, plus the client), and the loop thread's CPU time per
WebSocket handshake under S9's churn (32 clients connecting, upgrading and closing: `run.py`'s
load generator, pinned to CPU 1 as there, in a thread so the loop keeps serving; needs
`benches/loadgen` built, as `run.py` does). Numbers vary with the machine; compare them with
each other, not across machines.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sys
import time
from pathlib import Path

import brioche
from brioche import server, websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOADGEN, loadgen  # noqa: E402

CLIENT = r"""
import base64, os, socket, struct, sys, time
port, count, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
payload = b"x" * 32
frame = bytes([0x81, 0x80 | 32]) + b"\0\0\0\0" + payload   # zero mask: payload unchanged
if mode == "flood":
    s.sendall(frame * count)
    s.sendall(bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]))
    while s.recv(65536):
        pass
    sys.exit()
rtts = []
for _ in range(count):
    t = time.perf_counter_ns()
    s.sendall(frame)
    got = 0
    while got < 34:
        got += len(s.recv(65536))
    rtts.append(time.perf_counter_ns() - t)
rtts.sort()
print(rtts[len(rtts) // 2], rtts[len(rtts) * 99 // 100])
"""


def raw_connect(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


async def main() -> None:
    results: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    send_cost: asyncio.Future[float] = loop.create_future()
    subscribed = asyncio.Event()
    texts = 0
    subscribers = 100

    def on_open(ws: brioche.WebSocket[str]) -> None:
        if ws.data == "send":
            message = "x" * 32
            n = 100_000
            t = time.perf_counter_ns()
            for _ in range(n):
                ws.send(message)
            send_cost.set_result((time.perf_counter_ns() - t) / n)
        elif ws.data == "sub":
            ws.subscribe("hops")
            if srv.subscriber_count("hops") == subscribers:
                subscribed.set()

    def on_text(ws: brioche.WebSocket[str], text: str) -> None:
        nonlocal texts
        texts += 1
        if ws.data == "echo":
            ws.send(text)

    def handler(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
        return server.upgrade(srv, request, [], request.query or "echo", server.bad_request)

    config = websocket.init().on_open(on_open).on_text(on_text).backpressure_limit(0)
    srv = await server.handler(handler).websocket(config).hostname("127.0.0.1").port(0).serve()

    # Python -> Rust: ws.send encodes a frame and queues it (written when the batch ends).
    sock = raw_connect(srv.port, "/ws?send")
    results["ws.send, 32 B (ns/call)"] = await asyncio.wait_for(send_cost, 30)
    sock.close()

    # Fan-out: srv.publish to 100 subscribers, per recipient.
    subs = [raw_connect(srv.port, "/ws?sub") for _ in range(subscribers)]
    await asyncio.wait_for(subscribed.wait(), 30)
    n = 2_000
    t = time.perf_counter_ns()
    for _ in range(n):
        srv.publish("hops", "x" * 32)
    results["srv.publish, per recipient (ns)"] = (time.perf_counter_ns() - t) / n / subscribers
    for s in subs:
        s.close()

    # Rust -> Python: time in the loop callback (drain + dispatch + a counting handler) per event.
    spent = [0, 0]
    real_wake = srv._on_wake

    def timed_wake() -> None:
        t = time.perf_counter_ns()
        real_wake()
        spent[0] += time.perf_counter_ns() - t
        spent[1] += 1

    loop.remove_reader(srv._fd)
    loop.add_reader(srv._fd, timed_wake)
    count = 200_000
    before = texts
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(srv.port), str(count), "flood")
    await asyncio.wait_for(client.wait(), 120)
    handled = texts - before
    results["drain + dispatch (ns/event)"] = spent[0] / handled
    results["events per loop wake-up (mean)"] = handled / spent[1]
    loop.remove_reader(srv._fd)
    loop.add_reader(srv._fd, real_wake)

    # The loop thread's CPU per echoed message, everything included (drain, dispatch, the task a
    # coroutine handler runs in, the replies' writes): sync handler, then an await-free async one.
    async def async_echo(ws: brioche.WebSocket[str], text: str) -> None:
        ws.send(text)

    def sync_echo(ws: brioche.WebSocket[str], text: str) -> None:
        ws.send(text)

    for name, fn in (("sync", sync_echo), ("async def", async_echo)):
        echo_config = websocket.init().on_text(fn).backpressure_limit(0)
        echo_srv = await (server.handler(handler).websocket(echo_config).hostname("127.0.0.1")
                          .port(0).serve())
        cpu = time.thread_time_ns()
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(echo_srv.port), str(count), "flood")
        await asyncio.wait_for(client.wait(), 120)
        results[f"loop CPU per echo, {name} handler (ns)"] = (time.thread_time_ns() - cpu) / count
        await echo_srv.stop(close_active_connections=True)

    # The whole path: one 32-byte message through a sync echo handler and back, one in flight.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(srv.port), "20000", "rtt", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    p50, p99 = map(int, out.split())
    results["echo round trip p50 (ns)"] = p50
    results["echo round trip p99 (ns)"] = p99

    # A handshake: the request, the handler (it only upgrades), `upgrade`, `on_open` and the
    # close event, all the loop thread does for it with 32 clients churning (as S9 does).
    if LOADGEN.exists():
        cycles = 20_000
        cpu = time.thread_time_ns()
        r = await asyncio.to_thread(
            loadgen, "churn", srv.port,
            {"cycles": cycles, "mark": cycles // 10, "concurrency": 32, "echo": 0, "hold": 0}, 120)
        if r.get("ok") != cycles:
            raise SystemExit(f"churn: {r.get('ok')} of {cycles} cycles ({r.get('first_error')})")
        results["loop CPU per handshake, S9's churn (ns)"] = (time.thread_time_ns() - cpu) / cycles
    else:
        print(f"(no handshake row: build {LOADGEN.parent.parent.parent} with cargo first)")

    await srv.stop(close_active_connections=True)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:>10.1f}")


asyncio.run(main())
