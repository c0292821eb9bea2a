"""Where a server listens: IPv6 and dual-stack, every address of a name, Unix domain sockets,
and a socket handed in (``sock()``), each checked with third-party clients over real sockets."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import connect, unix_connect

import brioche
from brioche import server, websocket

from conftest import Recorder, echo, serve_config, upgrade_ws_path

TIMEOUT = 5


def _ipv6_loopback() -> str | None:
    """Why IPv6 loopback cannot be used here, or None when it can."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1 here: {exc}"
    return None


NO_IPV6 = _ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(NO_IPV6 is not None, reason=NO_IPV6 or "")


def echo_config(recorder: Recorder) -> websocket.Config[Any]:
    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("ws", ws.remote_address)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    return websocket.init().on_open(on_open).on_text(on_text)


def recording_handler(recorder: Recorder) -> server.Handler[Any]:
    async def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        recorder.add("request", request.remote_address)
        found = srv.request_ip(request)
        recorder.add("ip", None if found is None else found.family)
        return await upgrade_ws_path(request, srv)

    return handler


def app(recorder: Recorder) -> server.Config[Any]:
    return server.handler(recording_handler(recorder)).websocket(echo_config(recorder))


async def refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


# -- IPv6 and dual-stack ----------------------------------------------------------------------


@needs_ipv6
async def test_ipv6_loopback_serves_clients_and_its_url_is_bracketed(
    started: list[brioche.Server[Any]], recorder: Recorder
) -> None:
    srv = await serve_config(app(recorder).hostname("::1").port(0), started)
    assert srv.hostname == "::1"
    assert srv.url == f"http://[::1]:{srv.port}/"
    async with httpx.AsyncClient() as http:
        reply = await http.get(srv.url)
    assert (reply.status_code, reply.text) == (200, "ok")
    async with connect(f"ws://[::1]:{srv.port}/ws") as client:
        await echo(client, "over IPv6")
    assert recorder.of("request") == [("::1",), ("::1",)]
    assert recorder.of("ws") == [("::1",)]
    assert await refused("127.0.0.1", srv.port)


@needs_ipv6
async def test_the_ipv6_wildcard_takes_ipv4_clients_too(
    started: list[brioche.Server[Any]], recorder: Recorder
) -> None:
    srv = await serve_config(app(recorder).hostname("::").port(0), started)
    assert srv.url == f"http://[::1]:{srv.port}/"
    async with connect(f"ws://[::1]:{srv.port}/ws") as client:
        await echo(client, "IPv6 client")
    async with connect(f"ws://127.0.0.1:{srv.port}/ws") as client:
        await echo(client, "IPv4 client")
    # An IPv4 client shows as the IPv4 address, not as ::ffff:127.0.0.1.
    assert recorder.of("ws") == [("::1",), ("127.0.0.1",)]
    assert recorder.of("request") == [("::1",), ("127.0.0.1",)]
    assert recorder.of("ip") == [("IPv6",), ("IPv4",)]


@needs_ipv6
async def test_a_name_with_several_addresses_listens_on_each_on_one_port(
    started: list[brioche.Server[Any]], recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This host's resolver gives localhost one address; a name with two is made here, where
    # serve() asks the loop (the server then binds real sockets for both).
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[Any] = []

    async def getaddrinfo(host: Any, port: Any, **kwargs: Any) -> Any:
        if host != "both.test":
            return await real(host, port, **kwargs)
        asked.append((host, port))
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    srv = await serve_config(app(recorder).hostname("both.test").port(0), started)
    assert asked == [("both.test", 0)]
    assert srv.hostname == "both.test" and srv.url == f"http://both.test:{srv.port}/"
    for host in ("127.0.0.1", "[::1]"):
        async with connect(f"ws://{host}:{srv.port}/ws") as client:
            await echo(client, host)
    assert recorder.of("ws") == [("127.0.0.1",), ("::1",)]
    await srv.stop()
    assert await refused("127.0.0.1", srv.port) and await refused("::1", srv.port)


async def test_an_address_already_taken_is_a_bind_error(started: list[brioche.Server[Any]], recorder: Recorder) -> None:
    srv = await serve_config(app(recorder).hostname("127.0.0.1").port(0), started)
    with pytest.raises(brioche.BindError) as raised:
        await app(recorder).hostname("127.0.0.1").port(srv.port).serve()
    assert raised.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{srv.port}" in str(raised.value)


# -- Unix domain sockets ----------------------------------------------------------------------


def uds_client(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)))


async def test_a_unix_socket_serves_http_and_websocket_clients(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    srv = await serve_config(server.unix(app(recorder), path), started)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert (srv.unix, srv.port, srv.hostname) == (str(path), 0, "")
    assert srv.url == "http+unix://" + quote(str(path), safe="") + "/"
    async with uds_client(path) as http:
        reply = await http.get("http://localhost/")
    assert (reply.status_code, reply.text) == (200, "ok")
    async with unix_connect(str(path), "ws://localhost/ws") as client:
        await echo(client, "over a unix socket")
        await echo(client, "x" * 200_000)
    # A unix socket's client has no address worth showing: "" (asyncio's peername says the same).
    assert recorder.of("request") == [("",), ("",)]
    assert recorder.of("ws") == [("",)]
    # Bun's requestIP is null for a unix socket's request.
    assert recorder.of("ip") == [(None,), (None,)]


async def test_a_unix_socket_s_client_is_named_alike_by_every_line(
    started: list[brioche.Server[Any]], tmp_path: Path
) -> None:
    """A request's repr (which the lines about its handler quote) names a Unix socket's client
    as the core's own lines and a WebSocket's repr do; it said "a Unix socket client" where
    they say "a unix socket client"."""
    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.path == "/ws":
            return None if srv.upgrade(request) else server.bad_request()
        return server.text(repr(request))

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        ws.send(repr(ws))

    path = tmp_path / "app.sock"
    config = server.handler(handler).websocket(websocket.init().on_open(on_open)).unix(path)
    srv = await serve_config(config, started)
    assert srv.unix == str(path)
    async with uds_client(path) as http:
        reply = await http.get("http://localhost/who?x=1")
    assert reply.text == "<Request GET /who?x=1 from a unix socket client>"
    async with unix_connect(str(path), "ws://localhost/ws") as client:
        named = await asyncio.wait_for(client.recv(), 5)
    assert re.fullmatch(r"<brioche\.WebSocket #\d+ from a unix socket client state=1>", str(named)), named


async def test_stop_removes_the_socket_file(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    srv = await serve_config(app(recorder).unix(str(path)), started)
    await srv.stop()
    assert not path.exists()


async def test_stop_leaves_a_file_it_did_not_create(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    srv = await serve_config(app(recorder).unix(path), started)
    # Someone replaced the socket file (a new deployment, say): it is theirs.
    path.unlink()
    path.write_text("not ours")
    await srv.stop()
    assert path.read_text() == "not ours"


async def test_a_stale_socket_file_is_replaced(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    # A server that died without removing its socket: the file is there, nobody accepts.
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    srv = await serve_config(app(recorder).unix(path), started)
    async with unix_connect(str(path), "ws://localhost/ws") as client:
        await echo(client, "replaced")
    await srv.stop()
    assert not path.exists()


async def test_a_socket_a_server_accepts_on_is_never_taken_over(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    first = await serve_config(app(recorder).unix(path), started)
    with pytest.raises(brioche.BindError) as raised:
        await app(recorder).unix(path).serve()
    assert raised.value.errno == errno.EADDRINUSE and str(path) in str(raised.value)
    async with unix_connect(str(path), "ws://localhost/ws") as client:
        await echo(client, "the first server still has it")
    # Another program's listening socket, with a full backlog: in use as well, and no hang.
    await first.stop()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(0)
        waiting = [socket.socket(socket.AF_UNIX) for _ in range(4)]
        for queued in waiting:
            queued.setblocking(False)
            try:
                queued.connect(str(path))
            except BlockingIOError:
                pass
        with pytest.raises(brioche.BindError) as raised:
            await app(recorder).unix(path).serve()
        assert raised.value.errno == errno.EADDRINUSE
        for queued in waiting:
            queued.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


async def test_a_file_that_is_not_a_socket_is_never_removed(recorder: Recorder, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    path.write_text("precious")
    with pytest.raises(brioche.BindError) as raised:
        await app(recorder).unix(path).serve()
    assert raised.value.errno == errno.EEXIST
    assert path.read_text() == "precious"


async def test_the_socket_file_mode_is_the_umask_s_or_the_one_given(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    default = await serve_config(app(recorder).unix(tmp_path / "default.sock"), started)
    assert default.unix is not None
    assert stat.S_IMODE(os.lstat(default.unix).st_mode) == 0o777 & ~umask
    given = await serve_config(app(recorder).unix(tmp_path / "given.sock", mode=0o600), started)
    assert given.unix is not None
    assert stat.S_IMODE(os.lstat(given.unix).st_mode) == 0o600
    async with unix_connect(given.unix, "ws://localhost/ws") as client:
        await echo(client, "the owner may connect")


async def test_unix_replaces_hostname_and_port(recorder: Recorder, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    with pytest.raises(ValueError, match=r"cannot be combined with port\(\)"):
        await app(recorder).port(0).unix(path).serve()
    with pytest.raises(ValueError, match=r"cannot be combined with hostname\(\)"):
        await app(recorder).unix(path).hostname("127.0.0.1").serve()
    assert not path.exists()
    with pytest.raises(ValueError):
        app(recorder).unix("")
    with pytest.raises(ValueError):
        app(recorder).unix("\0abstract")
    with pytest.raises(ValueError):
        app(recorder).unix(path, mode=0o10000)


async def test_a_path_too_long_for_a_unix_socket_is_refused(recorder: Recorder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long for a unix socket"):
        await app(recorder).unix(tmp_path / ("x" * 200)).serve()


# -- a socket handed in -----------------------------------------------------------------------


async def test_sock_serves_on_a_bound_tcp_socket_and_listens_on_it(
    started: list[brioche.Server[Any]], recorder: Recorder
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = await serve_config(server.sock(app(recorder), sock), started)
    # Our duplicate keeps it listening: the caller may (and should) close theirs.
    sock.close()
    assert (srv.port, srv.hostname, srv.unix) == (port, "127.0.0.1", None)
    assert srv.url == f"http://127.0.0.1:{port}/"
    async with connect(f"ws://127.0.0.1:{port}/ws") as client:
        await echo(client, "on a socket handed in")
    assert recorder.of("ws") == [("127.0.0.1",)]
    await srv.stop()
    assert await refused("127.0.0.1", port)


async def test_sock_takes_a_listening_unix_socket_by_descriptor_and_leaves_its_file(
    started: list[brioche.Server[Any]], recorder: Recorder, tmp_path: Path
) -> None:
    path = tmp_path / "given.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(16)
    srv = await serve_config(app(recorder).sock(sock.fileno()), started)
    assert (srv.unix, srv.port) == (str(path), 0)
    async with unix_connect(str(path), "ws://localhost/ws") as client:
        await echo(client, "by descriptor")
    await srv.stop()
    # The file and the caller's descriptor are the caller's: both are still there.
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert sock.getsockname() == str(path)
    sock.close()


@needs_ipv6
async def test_sock_takes_an_ipv6_socket(started: list[brioche.Server[Any]], recorder: Recorder) -> None:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        srv = await serve_config(app(recorder).sock(sock), started)
    assert srv.url == f"http://[::1]:{srv.port}/"
    async with connect(f"ws://[::1]:{srv.port}/ws") as client:
        await echo(client, "v6")


async def test_sock_excludes_hostname_port_and_unix(recorder: Recorder, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        for config, named in (
            (app(recorder).hostname("127.0.0.1").sock(sock), r"hostname\(\)"),
            (app(recorder).sock(sock).port(0), r"port\(\)"),
            (app(recorder).sock(sock).unix(tmp_path / "x.sock"), r"unix\(\)"),
        ):
            with pytest.raises(ValueError, match="cannot be combined with " + named):
                await config.serve()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0


async def test_sock_refuses_what_cannot_serve(recorder: Recorder) -> None:
    with pytest.raises(TypeError):
        app(recorder).sock("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        app(recorder).sock(True)
    with pytest.raises(ValueError):
        app(recorder).sock(-1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="stream socket"):
            await app(recorder).sock(udp).serve()
    with socket.socket() as unbound:
        with pytest.raises(ValueError, match="must be bound"):
            await app(recorder).sock(unbound).serve()
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed socket"):
        await app(recorder).sock(closed).serve()
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a socket"):
            await app(recorder).sock(read_end).serve()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_workers_cannot_share_a_unix_socket_or_a_socket_handed_in(tmp_path: Path) -> None:
    config = server.handler(upgrade_ws_path)
    with pytest.raises(ValueError, match=r"workers\(n\) share a TCP port"):
        config.unix(tmp_path / "app.sock").run(workers=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match=r"workers\(n\) share a TCP port"):
            config.sock(sock).run(workers=2)
    assert not (tmp_path / "app.sock").exists()


# A server whose process can open only a few more descriptors once it listens, logging to
# stderr; it prints its port, then serves until killed.
OUT_OF_DESCRIPTORS_SERVER = r"""
import asyncio, logging, os, resource, sys
from brioche import server, websocket

async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    config = server.handler(lambda request, srv: server.text("ok")).websocket(websocket.init())
    async with config.hostname("127.0.0.1").port(0).handshake_timeout(60).serve() as srv:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        print(srv.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def _stderr_until(proc: asyncio.subprocess.Process, pattern: str, seconds: float) -> list[str]:
    """The lines the process writes to stderr up to the first matching ``pattern``, that one last."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        line = (await asyncio.wait_for(proc.stderr.readline(), max(remaining, 0))).decode()
        assert line, f"the server exited before logging {pattern!r}: {lines}"
        lines.append(line)
        if re.search(pattern, line):
            return lines


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts its descriptors in /proc")
async def test_a_listener_out_of_file_descriptors_says_so_once_and_again_when_it_accepts() -> None:
    # New clients wait in the listen backlog while accept fails: without a log line an operator
    # sees a server that hangs, with nothing to alert on.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OUT_OF_DESCRIPTORS_SERVER,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 15))
        for _ in range(20):  # more than the 8 descriptors left; the rest wait in the backlog
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        address = re.escape(f"127.0.0.1:{port}")
        line = (await _stderr_until(proc, f"cannot accept connections on {address}", 10))[-1]
        assert line.startswith("brioche.http WARNING "), line
        assert "Too many open files" in line and "raise LimitNOFILE" in line, line
        for client in clients:
            client.close()
        clients.clear()
        *before, line = await _stderr_until(proc, f"accepting connections on {address} again", 10)
        assert re.fullmatch(
            r"brioche\.http INFO accepting connections on \S+ again, after \d+ failed accepts\n", line
        ), line
        # Once an outage, not once a retry (every 10 ms): nothing else was logged in between.
        assert before == [], before
        async with httpx.AsyncClient() as http_client:
            reply = await http_client.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert (reply.status_code, reply.text) == (200, "ok")
    finally:
        for client in clients:
            client.close()
        proc.kill()
        await proc.wait()
