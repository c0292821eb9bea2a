"""Hostile input: broken HTTP, hostile frame headers, bad close frames, random bytes.

In every test another, well-behaved client keeps being served: a bystander connected before the
hostile input echoes after it, and so does a connection opened afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

import brioche
from brioche import server, websocket
from conftest import Recorder, ServeFn, echo, log_lines, upgrade_ws_path, ws_url
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    Frame,
    RawWebSocket,
    close_payload,
    encode_frame,
    holders_of_server_end,
    mask_payload,
    parse_frames,
    poll_until,
    read_until_eof,
    tcp_state,
)

TIMEOUT = 5
MIB = 1024 * 1024

# Close codes a peer may put on the wire (RFC 6455 7.4.1/7.4.2 and the IANA registry: 1012-1014
# are registered; 1004, 1005, 1006, 1015 and 1016-2999 are not to be sent; 5000+ are invalid).
WIRE_VALID_CODES = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)])


def echo_config(recorder: Recorder | None = None) -> websocket.Config[Any]:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        if recorder is not None:
            recorder.add("open", ws.data)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        if recorder is not None:
            recorder.add("text", ws.data, text)
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        if recorder is not None:
            recorder.add("bytes", ws.data, data)
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        if recorder is not None:
            recorder.add("close", ws.data, code, reason)

    return websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes).on_close(on_close)


def sending_on_open(recorder: Recorder, data: str, size: int) -> Callable[[brioche.WebSocket[Any]], None]:
    """An ``on_open`` that records each socket and sends ``size`` bytes to the one whose
    ``ws.data`` is ``data`` (a queue for a client that reads it slowly, or not at all)."""

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws.data)
        if ws.data == data:
            ws.send_bytes(b"x" * size)

    return on_open


def seen(recorder: Recorder, kind: str, data: str) -> list[tuple[Any, ...]]:
    """What the handlers of ``kind`` saw for the connection whose ``ws.data`` is ``data``."""
    return [e[1:] for e in recorder.of(kind) if e[0] == data]


async def closed(recorder: Recorder, data: str) -> list[tuple[Any, ...]]:
    """Wait for the ``on_close`` of connection ``data``; every (code, reason) it got."""
    await recorder.wait_for(lambda: bool(seen(recorder, "close", data)))
    return seen(recorder, "close", data)



async def assert_still_serving(srv: brioche.Server[Any], bystander: ClientConnection) -> None:
    """The bystander (connected before the hostile input) and a brand-new client both echo."""
    await echo(bystander, "bystander still served")
    async with connect(ws_url(srv, "/ws?fresh"), open_timeout=TIMEOUT) as fresh:
        await echo(fresh, "fresh client served")


async def exchange(
    port: int, data: bytes, timeout: float = TIMEOUT, enough: Callable[[bytes], bool] | None = None
) -> tuple[bytes, str]:
    """Send ``data`` on a new TCP connection and read until the server ends it.

    Returns what was read and how it ended: "eof", "reset", or "open" when the server still held
    the connection after ``timeout`` (keep-alive after a complete answer), or once what was read
    is ``enough``. A write the server refuses by closing ("broken pipe"/reset) is not an error:
    what it answered is still read.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), timeout)
        except (ConnectionResetError, BrokenPipeError):
            pass
        chunks: list[bytes] = []

        async def loop() -> str:
            for _ in range(100_000):
                try:
                    chunk = await reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    # asyncio hands a failed write's error to the reader too.
                    return "reset"
                if not chunk:
                    return "eof"
                chunks.append(chunk)
                if enough is not None and enough(b"".join(chunks)):
                    return "open"
            raise AssertionError("more than 100,000 reads")

        try:
            how = await asyncio.wait_for(loop(), timeout)
        except asyncio.TimeoutError:
            how = "open"
        return b"".join(chunks), how
    finally:
        writer.close()


def responses(data: bytes) -> list[tuple[str, int, bytes]]:
    """Split pipelined HTTP/1.x responses (Content-Length bodies) into (version, status, body)."""
    out: list[tuple[str, int, bytes]] = []
    for _ in range(100):
        if not data:
            break
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status = status_line.split(" ")[:2]
        length = 0
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        out.append((version, int(status), rest[:length]))
        data = rest[length:]
    return out


def upgrade_head(path: str = "/ws", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (
        f"GET {path} {version}\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()




# -- handshake -------------------------------------------------------------------------------

GARBAGE = {
    "random-binary": random.Random(6455).randbytes(512),
    "tls-client-hello": bytes.fromhex("16030100c4010000c00303") + random.Random(1).randbytes(180),
    "text-not-http": b"HELLO THERE this is not HTTP at all\r\n\r\n",
    "nul-bytes": b"\x00" * 64 + b"\r\n\r\n",
    "bad-request-line": b"GET\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
    "bad-version": b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    "conflicting-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
}


@pytest.mark.parametrize("data", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_instead_of_http_gets_400_then_close(serve: ServeFn, bystander_of: Any, data: bytes) -> None:
    srv = await serve(echo_config())
    bystander = await bystander_of(srv)
    answer, how = await exchange(srv.port, data)
    assert how == "eof", f"the connection was not ended cleanly after garbage: {how} {answer!r}"
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert responses(answer) == [("HTTP/1.1", 400, b"")], answer
    await assert_still_serving(srv, bystander)


async def test_request_line_over_the_limit_is_refused(serve: ServeFn, bystander_of: Any) -> None:
    # Observed: hyper answers 414 URI Too Long (its request-target limit is 65,534 bytes) and closes.
    srv = await serve(echo_config())
    bystander = await bystander_of(srv)
    answer, how = await exchange(srv.port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert how in ("eof", "reset"), answer[:200]
    assert answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), answer[:200]
    assert responses(answer) == [("HTTP/1.1", 414, b"")], answer[:200]
    await assert_still_serving(srv, bystander)


@pytest.mark.parametrize("shape", ["one-1MiB-header", "200-headers", "1MiB-of-small-headers"])
async def test_headers_over_the_limit_are_refused(serve: ServeFn, bystander_of: Any, shape: str) -> None:
    # Observed: 431 Request Header Fields Too Large with no body, then close: hyper's own refusal,
    # its read buffer full of an incomplete head (a head that fits one read is brioche's to
    # refuse: test_the_head_limit_holds_to_the_byte). More than 100 headers is always 431.
    srv = await serve(echo_config())
    bystander = await bystander_of(srv)
    if shape == "one-1MiB-header":
        headers = b"X-Big: " + b"a" * MIB + b"\r\n"
    elif shape == "200-headers":
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    else:
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(1100))
    answer, how = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert how in ("eof", "reset"), answer[:200]
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert responses(answer) == [("HTTP/1.1", 431, b"")], answer[:200]
    await assert_still_serving(srv, bystander)


async def test_a_refused_request_is_closed_with_a_fin_while_the_client_still_sends(
    serve: ServeFn, bystander_of: Any
) -> None:
    """The 431 goes out while the client is still sending its head. Closing a socket with the
    rest unread would answer with a reset, which can make the client's TCP stack drop the 431
    before it is read (the flake this test replaced): the server shuts its side (FIN) and
    reads and throws away what still comes, until the client closes too."""
    srv = await serve(echo_config())
    bystander = await bystander_of(srv)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)

    try:
        # 700 KB of head: past hyper's 408 KiB limit, with bytes it never reads still coming.
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 700_000
        await asyncio.to_thread(sock.sendall, head)
        assert await poll_until(lambda: tcp_state(sock) != TCP_ESTABLISHED, TIMEOUT), "no FIN from the server"
        # FIN, not a reset (which leaves the socket in TCP_CLOSE).
        assert tcp_state(sock) == TCP_CLOSE_WAIT
        await asyncio.to_thread(sock.sendall, b"a" * 65536)
        answer = await asyncio.to_thread(read_until_eof, sock)
        assert responses(answer) == [("HTTP/1.1", 431, b"")], answer[:200]
        assert tcp_state(sock) == TCP_CLOSE_WAIT
    finally:
        sock.close()
    await assert_still_serving(srv, bystander)


async def test_incomplete_request_head_is_cut_after_the_header_read_timeout(
    serve: ServeFn, bystander_of: Any
) -> None:
    """Slowloris: a head that never completes is dropped after ``handshake_timeout``."""
    srv = await serve(echo_config(), handshake_timeout=1)
    bystander = await bystander_of(srv)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        await echo(bystander, "served while a head is pending")
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            rest = b""
        assert rest.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), rest
    finally:
        writer.close()
    await assert_still_serving(srv, bystander)


@pytest.mark.once  # 31 s of a clock that the Python side does not touch
async def test_a_head_may_take_a_handshake_timeout_longer_than_30_s(serve: ServeFn) -> None:
    """hyper's own deadline for a head (30 s, ended without a response) is off: a longer
    ``handshake_timeout`` is the one that applies."""
    srv = await serve(echo_config(), handshake_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        try:
            early: bytes | None = await asyncio.wait_for(reader.read(), 31)
        except asyncio.TimeoutError:
            early = None  # still waiting for the rest of the head, as it should
        assert early is None, f"the server ended the wait for the head at 30 s: {early!r}"
        writer.write(b"1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    finally:
        writer.close()


async def test_a_body_that_does_not_arrive_in_time_gets_408(serve: ServeFn, bystander_of: Any) -> None:
    """The whole request, body included, must arrive within ``handshake_timeout``: a slow body
    would otherwise hold a task and up to ``max_request_body_size`` for as long as it likes."""
    srv = await serve(echo_config(), handshake_timeout=1)
    bystander = await bystander_of(srv)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        writer.write(b"x" * 10)
        await writer.drain()
        await echo(bystander, "served while a body is pending")
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest == b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    finally:
        writer.close()
    await assert_still_serving(srv, bystander)


async def test_an_idle_keep_alive_connection_is_closed_without_a_408(serve: ServeFn) -> None:
    srv = await serve(echo_config(), handshake_timeout=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await asyncio.wait_for(reader.readexactly(length), 5)
        # Nothing more sent: after the limit the connection just ends.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


@pytest.mark.parametrize("refused", ["400-no-connection-upgrade", "426-version-8"])
async def test_a_refusal_before_the_handler_leaves_no_408_behind(serve: ServeFn, refused: str) -> None:
    """A request the core answers itself, before any body is read, is as done as one the handler
    answered: the idle connection after it ends without a second, unasked-for 408 (which a
    client reusing the connection would take for the answer to its next request)."""
    srv = await serve(echo_config(), handshake_timeout=1)
    status, extra = {
        "400-no-connection-upgrade": (400, b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"),
        "426-version-8": (426, b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"),
    }[refused]
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     + extra + b"\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert [code for _, code, _ in responses(answer)] == [status]
    assert srv.stats()["handshakes_rejected"] == 1


@pytest.mark.parametrize("expect", [False, True])
async def test_a_body_declared_over_the_limit_gets_413_at_once(
    serve: ServeFn, recorder: Recorder, expect: bool
) -> None:
    """The size is in the head, so the refusal need not wait for the body (the client may never
    send it: that got a 408 at the deadline instead), nor invite it with `100 Continue`."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        recorder.add("called", len(request.body))
        return server.ok()

    srv = await serve(echo_config(), handler=handler, handshake_timeout=60)
    head = (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n"
            + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n")
    answer, how = await exchange(srv.port, head)
    assert how == "eof"
    assert responses(answer) == [("HTTP/1.1", 413, b"Payload Too Large")]
    assert srv.stats()["requests_rejected"] == 1
    assert recorder.of("called") == []


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_client_that_half_closes_after_its_request_gets_the_answer(serve: ServeFn, method: str) -> None:
    """RFC 9112 9.6: a client may shut its sending side once the request is out (as `nc -N`
    does) and still read the response. hyper by default ended such a connection on the EOF,
    dropping the answer the handler had made."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.text(f"{request.method} {request.body.decode()}")

    srv = await serve(echo_config(), handler=handler)
    body = b"hello" if method == "POST" else b""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(f"{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert responses(answer) == [("HTTP/1.1", 200, f"{method} {body.decode()}".encode())]


@pytest.mark.parametrize("hosts", [[], ["127.0.0.1", "127.0.0.1"], ["user@127.0.0.1"], ["127.0.0.1:http"], ["[zz]"]])
@pytest.mark.parametrize("upgrade", [False, True])
async def test_a_request_without_one_valid_host_gets_400(
    serve: ServeFn, recorder: Recorder, hosts: list[str], upgrade: bool
) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request with no Host, two, or one that is not host[:port] must
    get 400; RFC 6455 4.2.1 requires it of a handshake too. Neither reaches the handler."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        recorder.add("called", request.path)
        return None if srv.upgrade(request) else server.ok()

    srv = await serve(echo_config(), handler=handler)
    head = (b"GET /ws HTTP/1.1\r\n" + b"".join(b"Host: %s\r\n" % h.encode() for h in hosts)
            + (upgrade_head()[len(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"):] if upgrade else b"\r\n"))
    answer, how = await exchange(srv.port, head)
    assert how == "eof"
    assert responses(answer) == [("HTTP/1.1", 400, b"Bad Request")]
    assert srv.stats()["requests_rejected"] == 1
    assert recorder.of("called") == []
    # The same request with its one Host is served.
    good = head.replace(b"GET /ws HTTP/1.1\r\n" + b"".join(b"Host: %s\r\n" % h.encode() for h in hosts),
                        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(good)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 101 " if upgrade else b"HTTP/1.1 200 "), answer[:100]
    assert recorder.of("called") == [("/ws",)]


def server_end_held(port: int, client_port: int) -> bool:
    """Whether this process (whose server it is) still holds the server's end of the connection."""
    return holders_of_server_end(port, client_port, ["self"]) == ["self"]


async def test_a_client_that_reads_none_of_a_response_is_dropped_after_handshake_timeout(
    serve: ServeFn, caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that asks for a large response and never reads held the connection, and the
    response with it, for as long as it liked: a write that waits for the client's reading is
    given ``handshake_timeout``, as the client's sending is. The drop is counted and logged."""
    caplog.set_level(logging.INFO, logger="brioche.http")

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        return None if srv.upgrade(request) else server.Response(body=b"x" * (8 * MIB))

    srv = await serve(echo_config(), handler=handler, handshake_timeout=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: no window scale
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        client_port = sock.getsockname()[1]
        assert await poll_until(lambda: server_end_held(srv.port, client_port), TIMEOUT)
        # The response cannot fit the socket buffers; reading none of it, the client is dropped.
        assert await poll_until(lambda: not server_end_held(srv.port, client_port), 10), \
            "the server still holds the connection"
        # Counted, then logged, once the connection's task has let go of it.
        assert await poll_until(lambda: bool(log_lines(caplog, "brioche.http")), TIMEOUT)
        assert log_lines(caplog, "brioche.http") == [
            (logging.INFO, "dropped the connection from 127.0.0.1:%d: it read nothing of a response "
             "for handshake_timeout" % client_port),
        ]
        assert (srv.stats()["responses_stalled"], srv.stats()["requests_rejected"]) == (1, 0)
    finally:
        sock.close()
    async with connect(ws_url(srv, "/after")) as client:
        await client.send("still serving")
        assert await client.recv() == "still serving"


async def test_a_download_slower_than_handshake_timeout_completes_and_the_connection_serves_on(
    serve: ServeFn,
) -> None:
    """``handshake_timeout`` times the client's sending, not its reading: a response that takes
    longer to read is not cut off (it was, by the request clock), and the next request on the
    connection has the whole limit from when the response is written (it had none left)."""
    body = b"x" * (24 * MIB)

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        return server.Response(body=body if request.path == "/big" else b"small")

    srv = await serve(echo_config(), handler=handler, handshake_timeout=2)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", srv.port))
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        started = loop.time()
        for _ in range(100_000):  # a slow reader: 8 MB/s at most, so more than 3 s in all
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 512 * 1024), TIMEOUT)
            assert chunk, f"cut off after {len(received):,} bytes"
            received += chunk
            if len(received) >= len(body) and b"\r\n\r\n" in received:
                head, _, rest = received.partition(b"\r\n\r\n")
                if len(rest) == len(body):
                    break
            await asyncio.sleep(max(0.0, started + len(received) / 8e6 - loop.time()))
        assert head.startswith(b"HTTP/1.1 200 ") and rest == body
        await loop.sock_sendall(sock, b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        for _ in range(100):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
            if not chunk:
                break
            answer += chunk
        assert responses(answer) == [("HTTP/1.1", 200, b"small")]
    finally:
        sock.close()


async def test_a_handler_slower_than_handshake_timeout_still_answers(serve: ServeFn) -> None:
    """The clock times the client's sending only, not the handler's work."""
    async def slow(request: server.Request, srv: brioche.Server[Any]) -> server.Response:
        await asyncio.sleep(1.5)
        return server.text(f"slow {len(request.body)}")

    srv = await serve(echo_config(), handler=slow, handshake_timeout=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"slow 3"
    finally:
        writer.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_on_the_upgrade_request_is_never_read_as_frames(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, framing: str
) -> None:
    """A GET upgrade with a frame-shaped body, and a frame after it: refused with 400 before any
    handler runs (``test_http``'s refusal, with frames where the body and the stream would be),
    and neither frame is ever read as a message."""
    bodies: list[tuple[str | None, bytes]] = []

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        bodies.append((request.query, request.body))
        return await upgrade_ws_path(request, srv)

    srv = await serve(echo_config(recorder), handler=handler)
    bystander = await bystander_of(srv)
    evil = encode_frame(OP_TEXT, b"EVIL!")
    if framing == "content-length":
        request = upgrade_head("/ws?body", extra=f"Content-Length: {len(evil)}\r\n") + evil
    else:
        request = upgrade_head("/ws?body", extra="Transfer-Encoding: chunked\r\n")
        request += b"%x\r\n" % len(evil) + evil + b"\r\n0\r\n\r\n"
    # Read until the echo of "good" is in, or the server ends the connection.
    echoed = encode_frame(OP_TEXT, b"good", mask=False)
    answer, how = await exchange(srv.port, request + encode_frame(OP_TEXT, b"good"),
                                 enough=lambda got: got.endswith(echoed))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert (head.split(b" ", 2)[1], body, how) == (b"400", b"a WebSocket handshake has no body", "eof"), answer
    assert [query for query, _ in bodies if query == "body"] == [], "the handler saw the request"
    assert seen(recorder, "text", "body") == []
    await assert_still_serving(srv, bystander)


async def test_http_1_0_upgrade_request_gets_400(serve: ServeFn, recorder: Recorder, bystander_of: Any) -> None:
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    answer, how = await exchange(srv.port, upgrade_head("/ws?old", version="HTTP/1.0"))
    [(version, status, body)] = responses(answer)
    assert status == 400, answer
    assert how == "eof", "HTTP/1.0 without keep-alive: the server closes"
    assert seen(recorder, "open", "old") == []
    await assert_still_serving(srv, bystander)


async def path_handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
    if request.path == "/ws":
        return await upgrade_ws_path(request, srv)
    if request.path == "/slow":
        for _ in range(5):  # suspend a few times: a later request must still not overtake it
            await asyncio.sleep(0)
    return server.text(f"{request.method} {request.path} {request.body.decode()}")


async def test_pipelined_plain_requests_are_answered_in_order(serve: ServeFn, bystander_of: Any) -> None:
    srv = await serve(echo_config(), handler=path_handler)
    bystander = await bystander_of(srv)
    pipelined = (
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer, how = await exchange(srv.port, pipelined)
    assert how == "eof"
    assert [(s, b) for _, s, b in responses(answer)] == [
        (200, b"GET /slow "), (200, b"POST /second body"), (200, b"GET /third "),
    ]
    await assert_still_serving(srv, bystander)


async def test_pipelined_request_then_upgrade_and_frame_in_one_write(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    srv = await serve(echo_config(recorder), handler=path_handler)
    bystander = await bystander_of(srv)
    data = (b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n" + upgrade_head("/ws?piped")
            + encode_frame(OP_TEXT, b"in the same write") + encode_frame(OP_CLOSE, close_payload(1000)))
    answer, how = await exchange(srv.port, data)
    first, _, rest = answer.partition(b"\r\n\r\nGET /first ")
    assert first.startswith(b"HTTP/1.1 200"), answer
    assert rest.startswith(b"HTTP/1.1 101"), answer
    frames, tail = parse_frames(rest.partition(b"\r\n\r\n")[2])
    assert not tail
    assert [(f.opcode, f.payload) for f in frames][-1] == (OP_CLOSE, close_payload(1000))
    # The core answers the close itself; the handler may run after the client saw that answer.
    await recorder.wait_for(lambda: bool(seen(recorder, "text", "piped")))
    assert seen(recorder, "text", "piped") == [("in the same write",)]
    await assert_still_serving(srv, bystander)


# -- frame headers ---------------------------------------------------------------------------


async def raw_connect(port: int, path: str) -> RawWebSocket:
    """A RawWebSocket with TCP_NODELAY: rawws passes its own socket to asyncio, which then keeps
    Nagle on, and a frame written in two pieces waits ~40 ms for the server's delayed ACK."""
    client = await RawWebSocket.connect(port, path)
    client.writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def header_only(length: int, opcode: int = OP_BINARY) -> bytes:
    """A masked frame header declaring ``length`` payload bytes (64-bit form), and its mask key."""
    return bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", length) + b"\x01\x02\x03\x04"


async def expect_close(client: RawWebSocket, codes: set[int] | frozenset[int], timeout: float = TIMEOUT) -> Frame:
    """The server sends one close frame with one of ``codes`` and then ends the connection."""
    frames, how = await client.frames_until_end(timeout)
    assert frames and frames[-1].opcode == OP_CLOSE, f"no close frame before {how}: {frames}"
    assert frames[-1].close_code in codes, frames[-1]
    assert all(f.opcode == OP_PONG for f in frames[:-1]), frames
    return frames[-1]


@pytest.mark.parametrize("length", [1 << 63, (1 << 64) - 1], ids=["2^63", "2^64-1"])
async def test_64_bit_length_with_the_most_significant_bit_set_is_refused(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, length: int
) -> None:
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?msb") as client:
        await client.send_raw(header_only(length) + b"abcd")
        close = await expect_close(client, {1002, 1009})
    assert [c[0] for c in await closed(recorder, "msb")] == [close.close_code]
    await assert_still_serving(srv, bystander)


@pytest.mark.parametrize(
    "length,max_payload",
    [(1 << 62, 16 * MIB), (16 * MIB + 1, 16 * MIB), (MIB + 1, MIB)],
    ids=["2^62", "16MiB+1", "1MiB+1-with-1MiB-limit"],
)
async def test_frame_over_the_limit_closes_1009_from_its_header_alone(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, length: int, max_payload: int
) -> None:
    srv = await serve(echo_config(recorder).max_payload_length(max_payload))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?huge") as client:
        await client.send_raw(header_only(length))  # no payload byte follows: nothing to buffer
        await expect_close(client, {1009})
    assert [c[0] for c in await closed(recorder, "huge")] == [1009]
    await assert_still_serving(srv, bystander)


async def test_fragment_taking_the_message_over_the_limit_closes_1009_from_its_header_alone(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    """README: 1009 is "detected from the frame header, before the payload is buffered". For a
    fragmented message the header of the fragment that takes it over the limit is enough."""
    srv = await serve(echo_config(recorder).max_payload_length(MIB))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?frag") as client:
        await client.send_frame(OP_BINARY, b"x" * (MIB // 2), fin=False)
        # Declares MIB // 2 + 1 more bytes (1 byte over the limit in total); none of them follows.
        await client.send_raw(header_only(MIB // 2 + 1, OP_CONTINUATION))
        await expect_close(client, {1009})
    assert [c[0] for c in await closed(recorder, "frag")] == [1009]
    assert seen(recorder, "bytes", "frag") == []
    await assert_still_serving(srv, bystander)


async def test_fragments_adding_up_over_the_limit_close_1009(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    srv = await serve(echo_config(recorder).max_payload_length(MIB))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?frags") as client:
        await client.send_frame(OP_BINARY, b"x" * (MIB // 2), fin=False)
        await client.send_frame(OP_CONTINUATION, b"y" * (MIB // 2), fin=False)  # exactly the limit
        await client.send_frame(OP_CONTINUATION, b"z", fin=True)
        await expect_close(client, {1009})
    assert [c[0] for c in await closed(recorder, "frags")] == [1009]
    assert seen(recorder, "bytes", "frags") == []
    await assert_still_serving(srv, bystander)


def address_space() -> int:
    """This process's virtual size in bytes (the server runs in it): what it has reserved."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


async def test_a_frame_s_declared_length_is_not_reserved_before_its_bytes_come(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    """64 clients each declare a frame of 16 MiB (the default limit) and send one byte of it.
    Reserving what the headers declare took 1 GiB of address space for 64 bytes received; the
    server reserves at most 4 MiB ahead of what has come (and 16 MiB frames that come whole
    still arrive whole, held once: ``test_limits``)."""
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    clients = [await RawWebSocket.connect(srv.port, f"/ws?declares{i}") for i in range(64)]
    try:
        before = address_space()
        for client in clients:
            await client.send_raw(header_only(16 * MIB) + b"x")
        assert await poll_until(lambda: srv.stats()["incoming_bytes"] == 64, TIMEOUT), srv.stats()
        grown = address_space() - before
        # 256 MiB of room ahead, and slack for an allocator arena or two (64 MiB each).
        assert grown < 512 * MIB, f"address space grew by {grown / MIB:.0f} MiB"
        await assert_still_serving(srv, bystander)
    finally:
        for client in clients:
            await client.aclose()
    assert await poll_until(lambda: srv.stats()["incoming_bytes"] == 0, TIMEOUT), srv.stats()


# -- close frames ----------------------------------------------------------------------------

INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
async def test_invalid_close_code_from_the_client_gets_1002(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, code: int
) -> None:
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?badcode") as client:
        await client.send_close(code)
        await expect_close(client, {1002})
    assert [c[0] for c in await closed(recorder, "badcode")] == [1002]
    await assert_still_serving(srv, bystander)


VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000,
                     3999, 4000, 4999]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
async def test_valid_close_code_from_the_client_is_echoed_and_reported(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, code: int
) -> None:
    """Every code brioche lets an application send (`ws.close` accepts 1000-1003, 1007-1014,
    3000-4999) must also be accepted from a client."""
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?goodcode") as client:
        await client.send_close(code, "why")
        await expect_close(client, {code})
    assert await closed(recorder, "goodcode") == [(code, "why")]
    await assert_still_serving(srv, bystander)


CLOSE_PAYLOADS = {
    "invalid-utf8-reason": (struct.pack(">H", 1000) + b"bye \xff\xfe", {1007, 1002}),
    "truncated-utf8-reason": (struct.pack(">H", 1000) + "é".encode()[:1], {1007, 1002}),
    "one-byte-payload": (b"\x03", {1002}),
    "payload-over-125-bytes": (struct.pack(">H", 1000) + b"r" * 124, {1002}),
}


@pytest.mark.parametrize("payload,codes", list(CLOSE_PAYLOADS.values()), ids=list(CLOSE_PAYLOADS))
async def test_malformed_close_frame_is_a_protocol_error(
    serve: ServeFn, recorder: Recorder, bystander_of: Any, payload: bytes, codes: set[int]
) -> None:
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?badclose") as client:
        await client.send_raw(encode_frame(OP_CLOSE, payload))
        close = await expect_close(client, codes)
    assert [c[0] for c in await closed(recorder, "badclose")] == [close.close_code]
    await assert_still_serving(srv, bystander)


async def test_frames_after_the_clients_close_frame_are_ignored(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    srv = await serve(echo_config(recorder))
    bystander = await bystander_of(srv)
    async with await RawWebSocket.connect(srv.port, "/ws?late") as client:
        await client.send_raw(encode_frame(OP_CLOSE, close_payload(1000))
                              + encode_frame(OP_TEXT, b"after close") + b"\xff" * 32)
        await expect_close(client, {1000})
    assert [c[0] for c in await closed(recorder, "late")] == [1000]
    assert seen(recorder, "text", "late") == []
    await assert_still_serving(srv, bystander)


# -- floods ----------------------------------------------------------------------------------

FLOOD_LIMIT = 1024 * 1024
FLOOD_BYTES = 32 * MIB


async def test_ping_flood_from_a_client_that_never_reads_is_bounded(
    serve: ServeFn, recorder: Recorder, bystander_of: Any
) -> None:
    """Pongs are queued like any other send, but a client that pings without ever reading must
    not make the server queue without bound: the server reads all 32 MiB of its pings (and a
    message behind them), and once the client's queue is backed up (64 KiB queued, or the
    kernel refusing bytes) it queues 16 more pongs and drops the rest until the client reads,
    as RFC 6455 5.5.3 allows. Before, pongs were queued up to ``backpressure_limit``."""
    sockets: dict[str, brioche.WebSocket[Any]] = {}

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        sockets[ws.data] = ws
        recorder.poke()  # wakes the wait_for below, whichever of the two comes first

    config = echo_config(recorder).backpressure_limit(FLOOD_LIMIT).on_open(on_open)
    srv = await serve(config)
    bystander = await bystander_of(srv)
    client = await RawWebSocket.connect(srv.port, "/ws?flood", rcvbuf=4096, limit=4096)
    try:
        client.pause_reading()
        await recorder.wait_for(lambda: "flood" in sockets)
        ws = sockets["flood"]
        chunk = encode_frame(OP_PING, b"p" * 125) * (MIB // 131)
        for _ in range(FLOOD_BYTES // len(chunk)):
            client.writer.write(chunk)
            await asyncio.wait_for(client.writer.drain(), TIMEOUT)
        # Once a marker behind the pings reaches on_text, the server has read every ping.
        await client.send_text("marker")
        await recorder.wait_for(lambda: ("marker",) in seen(recorder, "text", "flood"), timeout=30)
        assert ws.ready_state == 1
        backed_up, pong = 64 * 1024, len(encode_frame(OP_PONG, b"p" * 125, mask=False))
        # Below 64 KiB (and the kernel taking bytes) a pong is queued; past it, 16 more, and 16
        # again after a write the kernel took part of; and the marker's echo.
        assert ws.buffered_amount < backed_up + 2 * 17 * pong + len(b"\x81\x06marker"), (
            f"{ws.buffered_amount} bytes of pongs queued for a client that never reads "
            f"(backpressure_limit {FLOOD_LIMIT})"
        )
    finally:
        client.writer.transport.abort()
    await assert_still_serving(srv, bystander)


async def unread_client(
    serve: ServeFn, recorder: Recorder, name: str
) -> tuple[RawWebSocket, brioche.WebSocket[Any]]:
    """An echo server, and a raw client of it (``ws.data`` is ``name``, a 4 KiB receive
    buffer) that reads nothing until it resumes; with its server-side socket."""
    sockets: dict[str, brioche.WebSocket[Any]] = {}

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        sockets[ws.data] = ws
        recorder.poke()

    srv = await serve(echo_config(recorder).on_open(on_open))
    client = await RawWebSocket.connect(srv.port, f"/ws?{name}", rcvbuf=4096, limit=4096)
    client.pause_reading()
    await recorder.wait_for(lambda: name in sockets)
    return client, sockets[name]


async def test_pongs_for_a_client_that_reads_nothing_stop_at_64_kib_and_resume_when_it_reads(
    serve: ServeFn, recorder: Recorder
) -> None:
    """Once a client reads nothing of what is sent (64 KiB queued for it, or the kernel's buffer
    full), only 16 more pongs are queued for it until it reads again; then its pings are
    answered again. Before, pongs were queued up to the backpressure limit (16 MiB by default)
    for as long as it kept pinging."""
    client, ws = await unread_client(serve, recorder, "flood")
    try:
        # 8 MiB of pings: more pongs than the kernel's buffers on both sides hold.
        pings = encode_frame(OP_PING, b"p" * 125) * (MIB // 131)
        for _ in range(8):
            client.writer.write(pings)
            await asyncio.wait_for(client.writer.drain(), 10)
        # Behind the pings: when the marker reaches on_text, every ping was read and answered.
        await client.send_text("marker")
        await recorder.wait_for(lambda: ("marker",) in seen(recorder, "text", "flood"), timeout=30)
        pong, echo_frame = 2 + 125, 2 + len("marker")
        assert ws.buffered_amount <= 64 * 1024 + 16 * pong + echo_frame, ws.buffered_amount
        # Reading again: what was queued arrives, the echo last, and a new ping is answered.
        client.resume_reading()
        for _ in range(200_000):  # bounded: the pongs the kernel held, then the echo
            frame = await client.recv_frame(timeout=10)
            if frame.opcode == OP_TEXT:
                break
        assert frame.payload == b"marker"
        await client.send_frame(OP_PING, b"again")
        frame = await client.recv_frame(timeout=10)
        assert (frame.opcode, frame.payload) == (OP_PONG, b"again")
    finally:
        client.writer.transport.abort()


async def test_a_client_that_reads_slowly_behind_a_full_queue_still_has_its_newest_ping_answered(
    serve: ServeFn, recorder: Recorder
) -> None:
    """The application keeps megabytes queued for a client that reads slowly (never enough to
    bring the queue under 64 KiB). Once the client has read a little, its next ping is
    answered (its pong behind what was queued), whatever it pinged before, as uWS answers
    every ping under the backpressure limit. Before, after 16 pongs the rest were dropped
    until the queue fell under 64 KiB, which for such a client is never: its newest ping
    went unanswered (RFC 6455 5.5.3 lets a server skip only pongs to earlier pings)."""
    client, ws = await unread_client(serve, recorder, "slow")
    try:
        chunk = b"q" * (32 * 1024)
        for _ in range(384):  # 12 MiB: more than the kernel's buffers take (4 MiB to send)
            ws.send_bytes(chunk)
        # Pings while it reads nothing: past 16 while backed up, dropped (bounded, as before).
        await client.send_raw(b"".join(encode_frame(OP_PING, f"p{i}".encode()) for i in range(20)))
        await client.send_text("marker 1")
        await recorder.wait_for(lambda: ("marker 1",) in seen(recorder, "text", "slow"), timeout=10)
        queued = ws.buffered_amount
        assert queued > 1 * MIB, queued
        # It reads 3 MiB (enough for the kernel to call for more), and the server writes more.
        client.resume_reading()
        for _ in range(96):
            assert (await client.recv_data_frame(timeout=10)).payload == chunk
        client.pause_reading()
        assert await poll_until(lambda: ws.buffered_amount < queued, 10), ws.buffered_amount
        assert ws.buffered_amount > 64 * 1024
        await client.send_frame(OP_PING, b"newest")
        await client.send_text("marker 2")
        await recorder.wait_for(lambda: ("marker 2",) in seen(recorder, "text", "slow"), timeout=10)
        client.resume_reading()
        pongs = []
        for _ in range(2_000):  # bounded: the rest of the 384 chunks, the pongs, the two echoes
            frame = await client.recv_frame(timeout=10)
            if frame.opcode == OP_PONG:
                pongs.append(frame.payload)
            if frame.opcode == OP_TEXT and frame.payload == b"marker 2":
                break
        assert pongs[-1] == b"newest", pongs
    finally:
        client.writer.transport.abort()


# -- random bytes after the handshake (property-based) ---------------------------------------
#
# One server for all examples. Per example: a raw connection, the random bytes, then
#  - if the bytes end on a frame boundary, a probe frame: the server must echo it (it is still
#    serving this connection) or close with a valid code;
#  - otherwise EOF (half-close): the server must end the connection, after a close frame with a
#    valid code or abruptly, without hanging.
# Whatever it sent must be well-formed server frames. A bystander echoes after every example.

# 10,000 random byte streams and 3,000 conversations in CI; `make fuzz` (BRIOCHE_FUZZ_SCALE) runs 20x.
_SCALE = int(os.environ.get("BRIOCHE_FUZZ_SCALE", "1"))
RANDOM_EXAMPLES = 10_000 * _SCALE
FRAME_EXAMPLES = 3_000 * _SCALE
PROBE = b"probe \xe2\x9c\x93"


def frame_boundary(data: bytes) -> bool:
    """Whether ``data`` is a whole number of frames by their length fields (no other checks)."""
    pos = 0
    for _ in range(len(data) + 1):
        if pos == len(data):
            return True
        if len(data) - pos < 2:
            return False
        b1 = data[pos + 1]
        n, head = b1 & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                return False
            n, head = struct.unpack_from(">H", data, pos + 2)[0], 4
        elif n == 127:
            if len(data) - pos < 10:
                return False
            n, head = struct.unpack_from(">Q", data, pos + 2)[0], 10
        if b1 & 0x80:
            head += 4
        pos += head + n
        if pos > len(data):
            return False
    return False


@st.composite
def fuzzed_frame(draw: st.DrawFn) -> bytes:
    """A frame with every header field drawn at random, its length field sometimes lying."""
    opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10, 3, 7, 11, 15]))
    fin = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
    rsv = draw(st.integers(0, 7)) if draw(st.integers(0, 7)) == 0 else 0
    masked = draw(st.integers(0, 15)) != 0
    if opcode == OP_CLOSE and draw(st.booleans()):
        code = draw(st.sampled_from([1000, 1001, 1002, 1005, 1006, 1014, 3000, 4999, 5000, 0]))
        payload = struct.pack(">H", code) + draw(st.sampled_from([b"", b"ok", b"\xff", "é".encode()]))
    elif opcode == OP_TEXT and draw(st.booleans()):
        payload = draw(st.text(max_size=40)).encode()
    else:
        payload = draw(st.binary(max_size=140))
    n = len(payload)
    form = draw(st.sampled_from(["true", "true", "true", "16", "64", "lie"]))
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if form == "lie":
        n = draw(st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1)))
    if form == "64" or n > 0xFFFF:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    elif form == "16" or n >= 126:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head.append(mask_bit | n)
    if not masked:
        return bytes(head) + payload
    key = draw(st.binary(min_size=4, max_size=4))
    return bytes(head) + key + mask_payload(payload, key)


hostile_bytes = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.lists(fuzzed_frame(), min_size=1, max_size=5).map(b"".join),
    st.tuples(st.lists(fuzzed_frame(), min_size=1, max_size=3).map(b"".join), st.binary(max_size=20)).map(
        lambda t: t[0] + t[1]
    ),
)


def check_server_frames(frames: list[Frame]) -> None:
    """What a server may send: unmasked, RSV 0, unfragmented, known opcodes, close last."""
    for i, frame in enumerate(frames):
        assert not frame.masked and frame.rsv == 0 and frame.fin, frame
        assert frame.opcode in (OP_TEXT, OP_BINARY, OP_PONG, OP_PING, OP_CLOSE), frame
        if frame.opcode == OP_TEXT:
            frame.payload.decode()  # valid UTF-8
        if frame.opcode == OP_CLOSE:
            assert i == len(frames) - 1, f"frames after a close frame: {frames}"
            assert len(frame.payload) != 1 and len(frame.payload) <= 125, frame
            if frame.payload:
                assert frame.close_code in WIRE_VALID_CODES, frame
                frame.payload[2:].decode()


class FuzzTarget:
    """One server shared by every example, with counters of what its handlers saw."""

    def __init__(self, srv: brioche.Server[Any], bystander: ClientConnection, counts: dict[str, int]) -> None:
        self.srv = srv
        self.bystander = bystander
        self.counts = counts
        self.connections = 0

    async def run(self, data: bytes) -> None:
        client = await raw_connect(self.srv.port, "/ws?fuzz")
        self.connections += 1
        try:
            boundary = frame_boundary(data)
            probe = encode_frame(OP_BINARY, PROBE)
            await self._send(client, data + probe if boundary else data)
            if not boundary:
                try:
                    client.writer.write_eof()
                except OSError:
                    pass
            received, how = await client.read_until_end(timeout=TIMEOUT) if not boundary else await self._until_probe(client)
        finally:
            client.writer.transport.abort()
        frames, tail = parse_frames(received)
        assert not tail, f"the server's stream ended inside a frame ({how}): {received[-40:]!r}"
        check_server_frames(frames)
        if how == "probe":
            assert frames[-1].payload == PROBE
        # Shown by --hypothesis-show-statistics: which paths the examples took.
        close = [f for f in frames if f.opcode == OP_CLOSE]
        event(f"probe sent: {boundary}; ended: {how}; "
              f"close: {close[0].close_code if close else 'none'}")
        await echo(self.bystander, "bystander")

    @staticmethod
    async def _send(client: RawWebSocket, data: bytes) -> None:
        try:
            await client.send_raw(data)
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server already refused an earlier part and closed

    @staticmethod
    async def _until_probe(client: RawWebSocket) -> tuple[bytes, str]:
        """Read until the probe's echo ("probe") or the end of the connection ("eof"/"reset")."""
        buf = b""

        async def loop() -> str:
            nonlocal buf
            for _ in range(10_000):
                try:
                    chunk = await client.reader.read(65536)
                except ConnectionResetError:
                    return "reset"
                if not chunk:
                    return "eof"
                buf += chunk
                frames, _ = parse_frames(buf)
                if frames and frames[-1].opcode == OP_BINARY and frames[-1].payload == PROBE:
                    return "probe"
            raise AssertionError("10,000 reads without the probe or the end")

        how = await asyncio.wait_for(loop(), TIMEOUT)
        return buf, how


@pytest.fixture
async def fuzz_target(serve: ServeFn, recorder: Recorder) -> AsyncIterator[FuzzTarget]:
    counts = {"open": 0, "close": 0}
    bad_close_codes: list[int] = []

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        counts["open"] += 1

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        counts["close"] += 1
        if not (code in WIRE_VALID_CODES or code in (1005, 1006)):
            bad_close_codes.append(code)
        recorder.add("close")

    config = echo_config().on_open(on_open).on_close(on_close)
    srv = await serve(config)
    async with connect(ws_url(srv, "/ws?bystander"), open_timeout=TIMEOUT, ping_interval=None) as bystander:
        target = FuzzTarget(srv, bystander, counts)
        yield target
        await echo(bystander, "bystander after every example")
        async with connect(ws_url(srv, "/ws?fresh"), open_timeout=TIMEOUT) as fresh:
            await echo(fresh, "fresh client after every example")
    # Every connection (the fuzzed ones, the bystander, the fresh one) opened once and got
    # exactly one on_close, with a code on_close may report.
    await recorder.wait_for(lambda: counts["close"] >= target.connections + 2, timeout=30)
    assert counts == {"open": target.connections + 2, "close": target.connections + 2}
    assert bad_close_codes == []
    assert srv.pending_websockets == 0


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
        print_blob=True,
    )


# Marked `load` with the soaks: the fuzzer exercises the engine's parser, the same on every
# CPython, so the default interpreter runs it once rather than each of the matrix's four.
@pytest.mark.load
@fuzz_settings(RANDOM_EXAMPLES)
@given(data=hostile_bytes)
async def test_random_bytes_after_the_handshake_never_hang_the_server(fuzz_target: FuzzTarget, data: bytes) -> None:
    await fuzz_target.run(data)


@st.composite
def valid_conversation(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Messages a correct client may send: text/binary, maybe fragmented, pings in between."""
    items: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["text", "binary", "ping"]))
        if kind == "ping":
            items.append(("ping", draw(st.binary(max_size=125))))
        elif kind == "text":
            items.append(("text", draw(st.text(max_size=300))))
        else:
            items.append(("binary", draw(st.binary(max_size=70_000 if draw(st.integers(0, 20)) == 0 else 300))))
    return items


def encode_conversation(
    items: list[tuple[str, Any]], split: Callable[[int], list[int]]
) -> tuple[bytes, list[bytes]]:
    """The conversation on the wire (fragments with pings between some), and the pongs due."""
    out = bytearray()
    pongs: list[bytes] = []
    for kind, value in items:
        if kind == "ping":
            out += encode_frame(OP_PING, value)
            pongs.append(value)
            continue
        payload = value.encode() if kind == "text" else value
        cuts = split(len(payload))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
        opcode = OP_TEXT if kind == "text" else OP_BINARY
        for i, piece in enumerate(pieces):
            out += encode_frame(opcode if i == 0 else OP_CONTINUATION, piece, fin=i == len(pieces) - 1)
            if i < len(pieces) - 1 and i % 2:
                out += encode_frame(OP_PING, b"between fragments %d" % i)
                pongs.append(b"between fragments %d" % i)
    return bytes(out), pongs


@pytest.mark.load
@fuzz_settings(FRAME_EXAMPLES)
@given(items=valid_conversation(), seed=st.integers(0, 2**32 - 1))
async def test_random_valid_conversations_are_echoed_exactly(
    fuzz_target: FuzzTarget, items: list[tuple[str, Any]], seed: int
) -> None:
    rng = random.Random(seed)

    def split(n: int) -> list[int]:
        if n < 2 or rng.random() < 0.6:
            return []
        return sorted(set(rng.randrange(1, n) for _ in range(rng.randint(1, 4))))

    data, pings = encode_conversation(items, split)
    client = await raw_connect(fuzz_target.srv.port, "/ws?conversation")
    fuzz_target.connections += 1
    try:
        # Sent in up to ~30 random chunks: frame and UTF-8 boundaries fall anywhere.
        pos = 0
        for _ in range(64):
            if pos >= len(data):
                break
            step = max(rng.choice([1, 7, 100, len(data)]), len(data) // 30)
            await client.send_raw(data[pos:pos + step])
            pos += step
        assert pos >= len(data)
        expected = [(OP_TEXT, v.encode()) if k == "text" else (OP_BINARY, v) for k, v in items if k != "ping"]
        echoes: list[tuple[int, bytes]] = []
        pongs: list[bytes] = []
        for _ in range(10_000):
            if len(echoes) == len(expected):
                break
            frame = await client.recv_frame(TIMEOUT)
            assert frame.opcode in (OP_TEXT, OP_BINARY, OP_PONG), frame
            if frame.opcode == OP_PONG:
                pongs.append(frame.payload)
            else:
                echoes.append((frame.opcode, frame.payload))
        assert echoes == expected
        await client.send_close(1000)
        frames, how = await client.frames_until_end(TIMEOUT)
        check_server_frames(frames)
        pongs += [f.payload for f in frames if f.opcode == OP_PONG]
        assert frames[-1].close_code == 1000
        assert pongs == pings
    finally:
        client.writer.transport.abort()
    await echo(fuzz_target.bystander, "bystander")


async def test_headers_over_a_configured_limit_get_431(serve: ServeFn, bystander_of: Any) -> None:
    srv = await serve(echo_config(), max_request_header_size=16 * 1024)
    bystander = await bystander_of(srv)
    small, _ = await exchange(
        srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: " + b"a" * 4096 + b"\r\n\r\n"
    )
    assert responses(small)[0][1] == 200
    big, how = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 40_000 + b"\r\n\r\n")
    assert how in ("eof", "reset")
    assert responses(big)[0][1] == 431
    await assert_still_serving(srv, bystander)


@pytest.mark.parametrize("limit", [None, 32 * 1024])
async def test_the_head_limit_holds_to_the_byte(serve: ServeFn, bystander_of: Any, limit: int | None) -> None:
    """A head of exactly ``max_request_header_size`` bytes (the default, or one configured) is
    served and one a byte longer gets 431. hyper's own limit (its read buffer) is checked only
    while the head is incomplete, and its reads grow in steps, so a head of up to about 1.7
    times the limit got through (a 114,000-byte head with the default 64 KiB)."""
    srv = await (serve(echo_config(), max_request_header_size=limit) if limit else serve(echo_config()))
    size = limit or 64 * 1024
    bystander = await bystander_of(srv)
    start, end = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: ", b"\r\n\r\n"

    def head(length: int) -> bytes:
        return start + b"a" * (length - len(start) - len(end)) + end

    assert len(head(size)) == size
    at, _ = await exchange(srv.port, head(size))
    assert [status for _, status, _ in responses(at)] == [200]
    over, how = await exchange(srv.port, head(size + 1))
    assert how in ("eof", "reset")
    [(_, status, text)] = responses(over)
    assert status == 431
    # brioche's refusal, of the parsed head, has a body and was counted before it went out.
    # hyper's own (its buffer filled to the limit by one read before the last byte came), none,
    # and is counted once its connection ends.
    if text:
        assert text == b"Request Header Fields Too Large"
    assert await poll_until(lambda: srv.stats()["requests_rejected"] == 1, TIMEOUT), srv.stats()
    await assert_still_serving(srv, bystander)


async def test_handshakes_past_max_connections_get_503_until_one_closes(
    serve: ServeFn, recorder: Recorder
) -> None:
    srv = await serve(echo_config(recorder), max_connections=2)
    async with connect(ws_url(srv, "/ws?a")) as first, connect(ws_url(srv, "/ws?b")) as second:
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(srv, "/ws?c"), open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 503
        await echo(first, "first still served")
        await echo(second, "second still served")
        # Plain HTTP is not limited.
        answer, _ = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert responses(answer)[0][1] == 200
    await recorder.wait_for(lambda: srv.pending_websockets == 0 and len(recorder.of("close")) >= 2)
    # A slot comes back as its connection ends, its close written and the client's end seen,
    # which may come just after on_close.
    assert await _upgraded_within(srv, "/ws?d", "a freed slot is reused")


async def _upgraded_within(srv: brioche.Server[Any], path: str, text: str) -> bool:
    """Whether a handshake to ``path`` gets its 101 within about 5 s (until then each gets
    503), and ``text`` its echo."""
    for _ in range(100):
        try:
            async with connect(ws_url(srv, path), open_timeout=TIMEOUT) as client:
                await echo(client, text)
                return True
        except InvalidStatus as refused:
            assert refused.response.status_code == 503
        await asyncio.sleep(0.05)
    return False


async def test_a_connection_closing_with_its_queue_unread_keeps_its_slot_until_it_ends(
    serve: ServeFn, recorder: Recorder
) -> None:
    """With max_connections=1, a client that made the server queue 8 MiB for it, reads none of
    it and sends its close frame: ``on_close`` runs and ``pending_websockets`` drops to 0, but
    the connection still holds its queue (the server tries to flush it for up to 5 s), so the
    slot stays taken: the next handshake gets 503, until the client resets its socket and the
    connection ends. Before, the slot came back at ``on_close``: a client reconnecting after
    each close held one such queue per cycle (40 cycles held a gigabyte under a limit of 5)."""
    queued_at_close: list[int] = []

    on_open = sending_on_open(recorder, "hog", 16 * MIB)
    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        queued_at_close.append(ws.buffered_amount)
        recorder.add("close", ws.data, code, reason)

    srv = await serve(echo_config(recorder).on_open(on_open).on_close(on_close), max_connections=1)
    # A small receive buffer: most of the 16 MiB stays queued whatever the kernel's own sizes.
    hog = await RawWebSocket.connect(srv.port, "/ws?hog", rcvbuf=4096)
    try:
        await hog.send_frame(OP_CLOSE, struct.pack(">H", 1000))
        await recorder.wait_for(lambda: bool(recorder.of("close")), TIMEOUT)
        assert queued_at_close[0] > 8 * MIB, "the test needs a queue the client does not read"
        assert srv.pending_websockets == 0
        assert srv.stats()["open_connections"] == 0
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(srv, "/ws?next"), open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 503
    finally:
        # Unread bytes in its receive buffer: the close is a reset, and the write fails.
        hog.close()
    reset_at = asyncio.get_running_loop().time()
    assert await _upgraded_within(srv, "/ws?after", "the slot came back as the connection ended")
    # The reset freed it, not the flush's 5 s deadline.
    assert asyncio.get_running_loop().time() - reset_at < 3
    assert [e[0] for e in recorder.of("open")] == ["hog", "after"]


async def test_a_client_that_reads_nothing_is_closed_at_the_idle_timeout_however_much_it_sends(
    serve: ServeFn, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A client the server queued 16 MiB for reads none of it, and sends a ping every 0.25 s:
    with a 2 s idle timeout it is closed (1006, logged) once the kernel has taken none of its
    queue for 2 s (the timer sees it within 1.5 s, so 3.5 s in or a little later), instead of holding its
    queue, up to ``backpressure_limit`` and a message, for as long as it goes on sending.
    Before, the pings kept it alive: only what it sent counted. A client that reads, on the
    same server, is served throughout."""
    caplog.set_level(logging.INFO, logger="brioche.ws")

    on_open = sending_on_open(recorder, "hog", 16 * MIB)
    srv = await serve(echo_config(recorder).on_open(on_open).idle_timeout(2))
    # A small receive buffer, and more than the kernel's send buffers hold (4 MiB here): most
    # of the 16 MiB stays queued.
    hog = await RawWebSocket.connect(srv.port, "/ws?hog", rcvbuf=4096, limit=4096)
    hog_port = hog.writer.get_extra_info("sockname")[1]
    try:
        async with connect(ws_url(srv, "/ws?reader")) as reader:
            for i in range(60):  # paced as the client's pings are: 15 s at most
                if seen(recorder, "close", "hog"):
                    break
                try:
                    await hog.send_frame(OP_PING, b"")
                except OSError:
                    break  # the server has reset it
                await echo(reader, f"served {i}")
                await asyncio.sleep(0.25)
            else:
                raise AssertionError("the client that reads nothing was still open after 15 s of pings")
            await recorder.wait_for(lambda: bool(seen(recorder, "close", "hog")), TIMEOUT)
            await echo(reader, "still served")
    finally:
        hog.close()
    assert seen(recorder, "close", "hog") == [(1006, "client not reading")]
    assert log_lines(caplog, "brioche.ws") == [(
        logging.INFO,
        f"closed the connection from 127.0.0.1:{hog_port} (1006): it read none of what was queued "
        "for it within the idle timeout",
    )]


async def test_a_client_that_reads_slowly_is_not_taken_for_one_that_reads_nothing(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A client the server queued 4 MiB for reads it at about 40 KiB/s (4 KiB every 0.1 s,
    through a 4 KiB receive buffer) and pings every 0.5 s: with a 2 s idle timeout it stays
    connected for 6 s. Writability is reported only once a third of the socket's buffer is
    free, so such a client can go longer than the timeout with no write offered to it; the
    check offers the queue again before it decides (without that, it was closed at about
    3 s)."""

    on_open = sending_on_open(recorder, "slow", 4 * MIB)
    srv = await serve(echo_config(recorder).on_open(on_open).idle_timeout(2))
    slow = await RawWebSocket.connect(srv.port, "/ws?slow", rcvbuf=4096, limit=4096)
    received = 0
    try:
        for i in range(60):  # paced as the client reads: 6 s
            chunk = await asyncio.wait_for(slow.reader.read(4096), TIMEOUT)
            assert chunk, f"the server ended the connection after {received} bytes"
            received += len(chunk)
            if i % 5 == 0:
                await slow.send_frame(OP_PING, b"")
            await asyncio.sleep(0.1)
        assert seen(recorder, "close", "slow") == []
        assert received >= 60 * 1024
    finally:
        slow.close()


async def test_a_handshake_whose_body_never_comes_holds_no_slot_of_max_connections(
    serve: ServeFn, recorder: Recorder
) -> None:
    """A handshake that declares a body and never sends it is not yet a request: it takes no
    slot of ``max_connections`` (it is answered 408 at ``handshake_timeout``). Before, it took
    the slot as its head was parsed, for the whole timeout: a few such clients, reconnecting,
    kept every other client out with 503."""
    srv = await serve(echo_config(recorder), max_connections=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        # Pipelined behind a plain request: its head is parsed once that one is answered.
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + upgrade_head("/ws?stalled", extra="Content-Length: 1\r\n"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 "), head
        async with connect(ws_url(srv, "/ws?next"), open_timeout=TIMEOUT) as client:
            await echo(client, "served beside a stalled handshake")
    finally:
        writer.close()
    assert [e[0] for e in recorder.of("open")] == ["next"]


async def test_a_handshake_whose_client_left_before_its_101_gives_its_slot_back(
    serve: ServeFn, recorder: Recorder
) -> None:
    """The one slot of max_connections=1 is taken by a handshake the handler accepts after its
    client reset the socket: the 101 cannot be written, and the slot must come back."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.query == "gone":
            entered.set()
            await release.wait()
        return server.upgrade(srv, request, [], request.query, server.bad_request)

    srv = await serve(echo_config(recorder), handler=handler, max_connections=1)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", srv.port)), TIMEOUT)
        await loop.sock_sendall(sock, upgrade_head("/ws?gone"))
        await asyncio.wait_for(entered.wait(), TIMEOUT)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    release.set()

    # The engine gives the slot back once the 101's write has failed, on its own time: until
    # then a handshake gets 503, after it a 101.
    assert await _upgraded_within(srv, "/ws?next", "the slot came back"), "the one slot never came back"
    assert [e[0] for e in recorder.of("open")] == ["next"]
