"""What the core counts (`srv.stats()`) and what it tells the `brioche` loggers, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import brioche
from brioche import MessageBackpressured, MessageDropped, server, websocket
from conftest import Recorder, ServeFn, log_lines, ws_url
from test_hostile import exchange as hostile_exchange
from rawws import OP_TEXT, RawWebSocket, SendRecord, encode_frame, fill, numbered, poll_until


def echo_config(recorder: Recorder) -> websocket.Config[Any]:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code)

    return websocket.init().on_text(on_text).on_bytes(on_bytes).on_close(on_close)


async def test_a_thousand_echoes_are_a_thousand_in_and_a_thousand_out(serve: ServeFn, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder))
    assert srv.stats()["connections_opened"] == 0
    async with connect(ws_url(srv), ping_interval=None) as client:
        for i in range(500):
            await client.send(f"text {i:04}")  # 9 bytes
            assert await client.recv() == f"text {i:04}"
            await client.send(bytes(100))
            assert await client.recv() == bytes(100)
    await recorder.wait_for(lambda: bool(recorder.of("close")))
    stats = srv.stats()
    assert {key: stats[key] for key in ("messages_in", "messages_out", "bytes_in", "bytes_out")} == {
        "messages_in": 1000, "messages_out": 1000, "bytes_in": 500 * 109, "bytes_out": 500 * 109,
    }
    assert (stats["connections_opened"], stats["connections_closed"]) == (1, 1)
    assert stats["closes_by_code"] == {1000: 1}
    assert (stats["open_connections"], stats["incoming_bytes"]) == (0, 0)
    assert (stats["publishes"], stats["deliveries"], stats["sends_dropped"]) == (0, 0, 0)


async def test_on_open_and_on_close_see_their_own_connection_counted(serve: ServeFn, recorder: Recorder) -> None:
    started: list[brioche.Server[Any]] = []

    def counts(*keys: str) -> tuple[object, ...]:
        stats = started[0].stats()
        return tuple(stats[key] for key in keys)  # type: ignore[literal-required]

    # Only its own event's count: a client that closes at once may be counted closed before
    # the loop has run its on_open.
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", counts("connections_opened"))

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", counts("connections_closed", "closes_by_code"))

    def closed(count: int) -> Callable[[], bool]:
        return lambda: len(recorder.of("close")) == count

    started.append(await serve(websocket.init().on_open(on_open).on_close(on_close)))
    for count in (1, 2, 3):
        async with connect(ws_url(started[0]), ping_interval=None):
            pass
        # This connection's own on_close, not a count that already matched: the client can be
        # done with its close handshake (the task answers it) before the loop has run either
        # handler.
        await recorder.wait_for(closed(count))
    assert recorder.of("open") == [((1,),), ((2,),), ((3,),)]
    assert recorder.of("close") == [((1, {1000: 1}),), ((2, {1000: 2}),), ((3, {1000: 3}),)]


async def test_publishes_count_once_and_deliveries_once_per_subscriber(serve: ServeFn, recorder: Recorder) -> None:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.subscribe("room")
        recorder.add("open")

    srv = await serve(echo_config(recorder).on_open(on_open))
    clients = [await connect(ws_url(srv), ping_interval=None) for _ in range(3)]
    await recorder.wait_for(lambda: len(recorder.of("open")) == 3)
    for i in range(10):
        srv.publish("room", f"news {i}")
    srv.publish("nobody", "news")  # no subscriber: dropped, no delivery
    for client in clients:
        assert [await client.recv() for _ in range(10)] == [f"news {i}" for i in range(10)]
        await client.close()
    stats = srv.stats()
    assert (stats["publishes"], stats["deliveries"]) == (11, 30)
    assert (stats["messages_out"], stats["bytes_out"]) == (30, 30 * 6)
    assert stats["sends_dropped"] == 0


async def test_drops_and_backpressure_are_counted_and_drops_logged_once_per_episode(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops reading: every send is counted by its status, and the hundreds of
    drops give one warning."""
    caplog.set_level(logging.INFO, logger="brioche")
    records: list[SendRecord] = []
    done = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await fill(ws, (numbered(i, 64 * 1024) for i in range(300)), records=records)
        done.set()

    srv = await serve(websocket.init().on_text(on_text).backpressure_limit(1024 * 1024))
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await asyncio.wait_for(done.wait(), 30)
        stats = srv.stats()
        dropped = sum(isinstance(r.status, MessageDropped) for r in records)
        backpressured = sum(isinstance(r.status, MessageBackpressured) for r in records)
        assert dropped > 100 and backpressured > 0
        assert (stats["sends_dropped"], stats["sends_backpressured"]) == (dropped, backpressured)
        assert stats["messages_out"] == 300 - dropped
        # The warning comes through the event queue: an open pushed after it flushes it through.
        async with connect(ws_url(srv), ping_interval=None):
            pass
        assert log_lines(caplog, "brioche.ws") == [(
            logging.WARNING,
            f"dropping messages to 127.0.0.1:{client.local_port}: backpressure limit exceeded; "
            "more drops are not logged until its queue drains",
        )]


async def test_a_close_for_the_backpressure_limit_is_counted_and_logged_once(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """close_on_backpressure_limit: the send that finds the limit exceeded ends the connection,
    on_close gets 1008, and one warning says so (the sends after it are dropped, not logged)."""
    caplog.set_level(logging.INFO, logger="brioche")
    records: list[SendRecord] = []
    done = asyncio.Event()

    async def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        await fill(ws, (numbered(i, 64 * 1024) for i in range(300)), records=records)
        done.set()

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    config = (
        websocket.init().on_text(on_text).on_close(on_close)
        .backpressure_limit(1024 * 1024).close_on_backpressure_limit(True)
    )
    srv = await serve(config)
    async with await RawWebSocket.connect(srv.port, rcvbuf=4096) as client:
        client.pause_reading()
        await client.send_text("go")
        await asyncio.wait_for(done.wait(), 30)
        await recorder.wait_for(lambda: bool(recorder.of("close")))
        client_port = client.local_port
    assert recorder.of("close") == [(1008, "backpressure limit exceeded")]
    dropped = sum(isinstance(r.status, MessageDropped) for r in records)
    assert dropped > 100
    stats = srv.stats()
    assert (stats["sends_dropped"], stats["closes_by_code"]) == (dropped, {1008: 1})
    assert log_lines(caplog, "brioche.ws") == [(
        logging.WARNING,
        f"dropped the connection to 127.0.0.1:{client_port} without a close frame (on_close gets 1008): "
        "backpressure limit exceeded",
    )]


async def test_refusals_are_counted_and_logged_with_their_status_and_reason(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brioche")
    srv = await serve(websocket.init(), max_request_body_size=10, max_connections=1)
    port = srv.port

    client_ports: list[int] = []

    def exchange(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            client_ports.append(sock.getsockname()[1])
            sock.sendall(request)
            reply = b""
            for _ in range(100):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if b"\r\n\r\n" in reply:
                    break
            return reply

    upgrade = ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    bad_version = await asyncio.to_thread(exchange, (upgrade + "Sec-WebSocket-Version: 8\r\n\r\n").encode())
    assert bad_version.startswith(b"HTTP/1.1 426 ")
    no_version = await asyncio.to_thread(exchange, (upgrade + "\r\n").encode())
    assert no_version.startswith(b"HTTP/1.1 426 ")
    too_big = await asyncio.to_thread(exchange, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n" + b"x" * 11)
    assert too_big.startswith(b"HTTP/1.1 413 ")
    many_headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))  # past hyper's 100
    huge_head = await asyncio.to_thread(exchange, b"GET / HTTP/1.1\r\nHost: x\r\n" + many_headers + b"\r\n")
    assert huge_head.startswith(b"HTTP/1.1 431 ")
    gzipped = await asyncio.to_thread(exchange, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                      b"3\r\nabc\r\n0\r\n\r\n")
    assert gzipped.startswith(b"HTTP/1.1 501 ")
    async with connect(ws_url(srv), ping_interval=None):
        full = await asyncio.to_thread(exchange, (upgrade + "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        assert full.startswith(b"HTTP/1.1 503 ")
    # A refusal hyper answers itself (the 431) is counted and logged when its connection ends,
    # after the client has closed; a line reaches `logging` through the event queue. The core
    # counts each refusal before it sends the line, so with the last line all of them are counted.
    await poll_until(lambda: len(log_lines(caplog, "brioche.http")) >= 6, 5)
    stats = srv.stats()
    assert (stats["handshakes_rejected"], stats["requests_rejected"]) == (3, 3)
    # Each line names its client's own port; the 431's may come after the 503's.
    bad_version_port, no_version_port, too_big_port, huge_head_port, gzipped_port, full_port = client_ports
    assert sorted(log_lines(caplog, "brioche.http")) == sorted([
        (logging.INFO, "refused a WebSocket handshake from 127.0.0.1:%d: 426, unsupported Sec-WebSocket-Version"
         % bad_version_port),
        (logging.INFO, "refused a WebSocket handshake from 127.0.0.1:%d: 426, missing Sec-WebSocket-Version"
         % no_version_port),
        (logging.INFO, "refused a request from 127.0.0.1:%d: 413, body over max_request_body_size" % too_big_port),
        (logging.INFO, "refused a request from 127.0.0.1:%d: 431, request head too large" % huge_head_port),
        # Why, not the status's phrase again ("Not Implemented", before).
        (logging.INFO, "refused a request from 127.0.0.1:%d: 501, a transfer coding other than chunked"
         % gzipped_port),
        (logging.INFO, "refused a WebSocket handshake from 127.0.0.1:%d: 503, max_connections reached" % full_port),
    ])


async def test_protocol_errors_and_idle_timeouts_are_logged_per_connection(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brioche")
    srv = await serve(echo_config(recorder).idle_timeout(1).send_pings(False))
    async with await RawWebSocket.connect(srv.port) as client:
        client_port = client.local_port
        await client.send_raw(encode_frame(OP_TEXT, b"unmasked", mask=False))
        assert (await client.expect_close_then_eof()).close_code == 1002
    async with await RawWebSocket.connect(srv.port) as silent:
        silent_port = silent.local_port
        _, how = await silent.frames_until_end(timeout=5)
        assert how == "eof"
    await recorder.wait_for(lambda: len(recorder.of("close")) == 2)
    # Each names its client by IP and port, as the HTTP lines do: the IP alone did not tell two
    # clients behind one address (a NAT, a proxy) apart.
    assert log_lines(caplog, "brioche.ws") == [
        (logging.INFO, f"closing the connection from 127.0.0.1:{client_port} with 1002: protocol error"),
        (logging.INFO, f"closed the connection from 127.0.0.1:{silent_port} (1006): idle timeout"),
    ]
    assert srv.stats()["closes_by_code"] == {1002: 1, 1006: 1}


CARRIED = " more like this were not logged before it)"
SUMMARY = re.compile(r"^(\d+) more lines like 'refused a WebSocket handshake from …: …, …' "
                     r"were not logged \(at most ten of a kind a second\)$")
BAD_HANDSHAKE = ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n").encode()  # no key: 400


def refused_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(BAD_HANDSHAKE)
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")


def lines_accounted(caplog: pytest.LogCaptureFixture) -> int:
    """Refusals logged, each line counting itself and the lines it says were left out."""
    total = 0
    for _, message in log_lines(caplog, "brioche.http"):
        if match := SUMMARY.match(message):
            total += int(match[1])
        elif message.endswith(CARRIED):
            total += 1 + int(message.rsplit("(", 1)[1].removesuffix(CARRIED))
        else:
            total += 1
    return total


async def test_a_flood_of_bad_clients_gives_ten_lines_a_second_and_a_count_of_the_rest(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brioche")
    srv = await serve(websocket.init())

    async def flush_events() -> None:
        # A request through the same queue: once it is answered, the lines before it are in.
        async with connect(ws_url(srv), ping_interval=None):
            pass

    started = time.monotonic()
    for _ in range(50):
        await asyncio.to_thread(refused_once, srv.port)
    await flush_events()
    spanned = time.monotonic() - started
    first = len(log_lines(caplog, "brioche.http"))
    # 10 a second: the 50 fall in one second or two (more on a machine slow enough that they
    # took a second or more).
    assert 10 <= first <= 10 * (2 + int(spanned)), (first, spanned)
    # No refusal after the flood: the count of the rest comes in a line of its own, a second
    # after the line that filled its second (the behaviour under test is time). Before, it
    # waited for the next refusal, for ever if none came.
    assert await poll_until(lambda: lines_accounted(caplog) == 50, 5), log_lines(caplog, "brioche.http")
    logged = [message for _, message in log_lines(caplog, "brioche.http")]
    assert any(SUMMARY.match(m) for m in logged), logged
    # The next refusal carries no count: the summary took it.
    await asyncio.to_thread(refused_once, srv.port)
    await flush_events()
    last_level, last = log_lines(caplog, "brioche.http")[-1]
    assert last_level == logging.INFO
    assert re.fullmatch(r"refused a WebSocket handshake from 127\.0\.0\.1:\d+: 400, "
                        r"missing or invalid Sec-WebSocket-Key", last), last
    assert srv.stats()["handshakes_rejected"] == 51


async def test_a_flood_over_several_seconds_is_counted_to_its_last_line(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals for 2.5 s, about a hundred a second, then none: every second fills, and every
    refusal is in the log, as a line or in a count, within a second of the flood's end. The
    first version asked for the count a second after the first line that filled a second and
    ignored the fills while that was due: the lines a later second left out after the count
    was taken waited for a line that never came (29 refusals, 24 in the log, in the review's
    run)."""
    caplog.set_level(logging.INFO, logger="brioche")
    srv = await serve(websocket.init())

    def flood() -> int:
        sent, deadline = 0, time.monotonic() + 2.5
        while time.monotonic() < deadline and sent < 1000:
            refused_once(srv.port)
            sent += 1
            time.sleep(0.01)  # pacing the client: about a hundred a second
        return sent

    sent = await asyncio.to_thread(flood)
    assert sent > 100, sent
    assert await poll_until(lambda: lines_accounted(caplog) == sent, 5), (
        sent, lines_accounted(caplog), log_lines(caplog, "brioche.http")[-5:]
    )
    assert srv.stats()["handshakes_rejected"] == sent


def test_the_demo_documents_its_options() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "brioche", "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for option in ("--host", "--port", "--log-level"):
        assert option in done.stdout


async def test_a_request_cut_off_by_the_deadline_is_one_408_refusal(
    serve: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brioche")
    srv = await serve(websocket.init(), handshake_timeout=0.5)

    reply, how = await hostile_exchange(srv.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part of it")
    assert reply.startswith(b"HTTP/1.1 408 ") and how == "eof"
    # Counted, then logged, once the connection ends: after the client has closed its side.
    await poll_until(lambda: len(log_lines(caplog, "brioche.http")) >= 1, 5)
    assert srv.stats()["requests_rejected"] == 1
    [(level, message)] = log_lines(caplog, "brioche.http")
    assert level == logging.INFO
    assert message.startswith("refused a request from 127.0.0.1:") and message.endswith(": 408, request too slow")


async def test_handler_failures_are_counted(serve: ServeFn, caplog: pytest.LogCaptureFixture) -> None:
    """``handler_errors`` counts what is logged at ERROR for a handler: a WebSocket handler that
    raised (``on_text``, closing with 1011; ``on_close``), an HTTP handler that raised, or that
    answered None without upgrading or something other than a ``Response`` (500 each). A
    handler past its ``srv.timeout`` (503, WARNING) is not one. Before, nothing counted them."""
    caplog.set_level(logging.INFO, logger="brioche")

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        raise RuntimeError("on_text failed")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        raise RuntimeError("on_close failed")

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> Any:
        if request.path == "/ws":
            return None if srv.upgrade(request) else server.bad_request()
        if request.path == "/raise":
            raise RuntimeError("fetch failed")
        if request.path == "/none":
            return None
        if request.path == "/str":
            return "not a Response"
        srv.timeout(request, 0.2)
        await asyncio.sleep(30)  # the slow handler under test: past its timeout
        return server.text("late")

    srv = await serve(websocket.init().on_text(on_text).on_close(on_close), handler=handler)
    assert srv.stats()["handler_errors"] == 0
    async with connect(ws_url(srv)) as client:
        await client.send("x")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.recv(), 5)
        assert client.close_code == 1011
    async with httpx.AsyncClient() as http:
        statuses = [(await http.get(f"http://127.0.0.1:{srv.port}{path}", timeout=5)).status_code
                    for path in ("/raise", "/none", "/str", "/slow")]
    assert statuses == [500, 500, 500, 503]
    # on_close ran once the connection was over, maybe after the client saw it end.
    assert await poll_until(lambda: srv.stats()["handler_errors"] == 5, 5), srv.stats()["handler_errors"]
    errors = [m for level, m in log_lines(caplog, "brioche") if level == logging.ERROR]
    assert len(errors) == 5, errors
