"""Every code sample in docs/ is a file under examples/, and each one runs here over real sockets.

The pages include the files with pymdownx.snippets (``--8<-- "examples/echo.py"``), so what a
reader sees is what runs. Servers start in-process on 127.0.0.1, port 0, from the sample's
``app`` config; scripts (a client, the production entry point) run as subprocesses. The proxy
configurations run in a real nginx and a real Caddy in front of a sample server.
"""

from __future__ import annotations

import asyncio
import ast
import contextlib
import doctest
import importlib.util
import inspect
import io
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import brioche
from conftest import free_port, serve_config, wait_listening

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')


def load(name: str) -> ModuleType:
    """Import examples/<name>.py as a module of its own (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with postponed annotations look it up
    spec.loader.exec_module(module)
    return module


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def sigterm_closes_with_1001(
    proc: asyncio.subprocess.Process,
    clients: list[ClientConnection],
    stragglers: frozenset[str] = frozenset(),
) -> None:
    """SIGTERM ``proc``: each client is closed with 1001, then the process exits with 0.

    A client may first receive messages from ``stragglers`` (each at most once), and nothing else.
    """
    proc.send_signal(signal.SIGTERM)
    for client in clients:
        late: list[Any] = []
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(len(stragglers) + 1):
                late.append(await asyncio.wait_for(client.recv(), 15))
        assert set(late) <= stragglers and len(set(late)) == len(late), late
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()


async def serve(app: Any, servers: list[brioche.Server[Any]]) -> brioche.Server[Any]:
    """Start a sample's ``app`` on 127.0.0.1 and a free port."""
    return await serve_config(app.hostname("127.0.0.1").port(0), servers)


async def recv(client: ClientConnection) -> Any:
    return await asyncio.wait_for(client.recv(), 5)


async def recv_until(client: ClientConnection, wanted: str, among: list[str]) -> list[str]:
    """The messages up to and including ``wanted``; the others must come from ``among``."""
    got: list[str] = []
    for _ in range(len(among) + 1):
        got.append(await recv(client))
        if got[-1] == wanted:
            return got
        assert got[-1] in among and got.count(got[-1]) == 1, got
    raise AssertionError(f"{wanted!r} never came: {got}")


# -- the pages --------------------------------------------------------------------------------


def fences(page: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    return re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if not p.is_symlink())


def test_every_code_block_of_the_docs_is_an_included_file() -> None:
    """No sample is typed into a page: each code block includes a file (shell lines excepted)."""
    for page in pages():
        for lang, body in fences(page):
            if lang in ("sh", "console"):
                continue
            lines = body.strip().splitlines()
            assert len(lines) == 1 and INCLUDE.match(lines[0]), f"{page.name}: inline {lang} block"
            assert (ROOT / INCLUDE.match(lines[0]).group(1)).is_file()  # type: ignore[union-attr]


def test_every_example_file_is_shown_in_the_docs_and_tested_here() -> None:
    included = {
        m.group(1) for page in pages() for m in re.finditer(r'--8<-- "([^"]+)"', page.read_text())
    }
    this = Path(__file__).read_text(encoding="utf-8")
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(ROOT).as_posix()
            assert rel in included, f"{rel} is in no page"
            assert rel == "examples/quickstart.py" or f'"{path.name}"' in this or \
                f'load("{path.stem}")' in this, f"{rel} is not tested here"


def documented() -> list[tuple[str, str]]:
    """(name, docstring) of the public API: the modules, what they export, and their members."""
    import brioche._server
    from brioche import server, websocket

    found: dict[int, tuple[str, str]] = {}

    def add(name: str, obj: Any) -> None:
        doc = obj.__doc__ if isinstance(obj, (type, ModuleType)) or callable(obj) or \
            isinstance(obj, property) else None
        if doc and id(obj) not in found:
            found[id(obj)] = (name, doc)
        if isinstance(obj, type) and obj.__module__.startswith("brioche"):
            for member, value in vars(obj).items():
                if not member.startswith("_"):
                    add(f"{name}.{member}", value)

    for module in (brioche, server, websocket):
        add(module.__name__, module)
        for export in module.__all__:
            add(f"{module.__name__}.{export}", getattr(module, export))
    add("brioche.Server", brioche._server.Server)
    return list(found.values())


async def run_docstring_examples(name: str, doc: str) -> int:
    """Run the ``>>>`` examples of ``doc`` in order, in one namespace, top-level ``await``
    allowed (as in ``python -m asyncio``), each one's output checked as doctest would."""
    from brioche import server, websocket

    # The examples sit in ```pycon fences; a fence line would read as expected output.
    text = re.sub(r"^[ \t]*```\w*[ \t]*$", "", doc, flags=re.MULTILINE)
    examples = doctest.DocTestParser().get_examples(text, name)
    namespace: dict[str, Any] = {
        "asyncio": asyncio, "brioche": brioche, "server": server, "websocket": websocket,
    }
    checker = doctest.OutputChecker()
    for example in examples:
        code = compile(example.source, name, "single", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = eval(code, namespace)  # noqa: S307 - the docstrings are ours
            if code.co_flags & inspect.CO_COROUTINE:
                await asyncio.wait_for(result, 10)
        got = out.getvalue()
        assert checker.check_output(example.want, got, doctest.ELLIPSIS), (
            f"{name}: {example.source!r} printed {got!r}, expected {example.want!r}"
        )
    return len(examples)


async def test_docstring_examples_of_the_public_api_run() -> None:
    """Every ``>>>`` example in the reference's docstrings runs, and prints what it shows."""
    ran = {name: await run_docstring_examples(name, doc) for name, doc in documented()}
    with_examples = sorted(name for name, count in ran.items() if count)
    for expected in ("brioche", "brioche.server", "brioche.Server", "brioche.server.Config.serve",
                     "brioche.Server.serve_forever", "brioche.websocket.init", "brioche.CloseCode"):
        assert expected in with_examples, with_examples


# -- getting started --------------------------------------------------------------------------


async def test_echo(started: list[brioche.Server[Any]]) -> None:
    srv = await serve(load("echo").app, started)
    async with connect(f"ws://127.0.0.1:{srv.port}/ws") as client:
        await client.send("héllo")
        assert await recv(client) == "héllo"
        await client.send(b"\x00\xff")
        assert await recv(client) == b"\x00\xff"
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{srv.port}/")
    assert (reply.status_code, reply.text) == (200, "connect a WebSocket to /ws\n")


async def test_client_script_against_the_echo_server(started: list[brioche.Server[Any]]) -> None:
    srv = await serve(load("echo").app, started)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "client.py"), f"ws://127.0.0.1:{srv.port}/ws",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "hello\nb'\\x00\\x01'\n"


async def test_the_testing_example_passes_under_pytest(tmp_path: Path) -> None:
    # As a user runs it: pytest's defaults (no asyncio_mode), from a directory of its own.
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
        "-c", str(tmp_path / "pytest.ini"), str(EXAMPLES / "test_echo_app.py"),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert re.search(r"^1 passed\b", out.decode(), flags=re.MULTILINE), out.decode()


async def test_chat_rooms(started: list[brioche.Server[Any]]) -> None:
    srv = await serve(load("chat").app, started)
    url = f"ws://127.0.0.1:{srv.port}/rooms"
    async with connect(f"{url}/lobby?name=ada") as ada:
        assert json.loads(await recv(ada)) == {"joined": "ada"}
        async with connect(f"{url}/other?name=eve") as eve:
            assert json.loads(await recv(eve)) == {"joined": "eve"}
            async with connect(f"{url}/lobby?name=bob") as bob:
                assert json.loads(await recv(bob)) == {"joined": "bob"}
                assert json.loads(await recv(ada)) == {"joined": "bob"}
                await ada.send("hi")
                for client in (ada, bob):
                    assert json.loads(await recv(client)) == {"from": "ada", "text": "hi"}
            assert json.loads(await recv(ada)) == {"left": "bob"}
            await eve.send("anyone?")  # eve's room is her own: she saw nothing of the lobby
            assert json.loads(await recv(eve)) == {"from": "eve", "text": "anyone?"}
    for bad in ("/rooms/lobby", "/rooms/?name=ada", "/elsewhere?name=ada"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{srv.port}{bad}")
        assert refused.value.response.status_code == 400


async def test_firehose_sends_everything_in_order_to_a_slow_reader(
    started: list[brioche.Server[Any]],
) -> None:
    firehose = load("firehose")
    drains = 0
    pump = firehose.pump

    def counting_pump(ws: brioche.WebSocket[Any]) -> None:
        nonlocal drains
        drains += 1
        pump(ws)

    app = firehose.app.websocket(firehose.app.websocket_config.on_drain(counting_pump))
    srv = await serve(app, started)
    # About 20 MB: more than the socket buffers hold. The client shares this loop, so it reads
    # nothing while the server's handler sends: the handler meets backpressure on its own.
    count = 20_000
    async with connect(f"ws://127.0.0.1:{srv.port}/", max_queue=4) as client:
        await client.send(str(count))
        for n in range(count):
            message = await recv(client)
            assert message == f"{n} " + "x" * 1000
        assert await recv(client) == "done"
    assert drains >= 1  # it was backpressured and resumed from on_drain


async def test_auth_routes_and_upgrade(started: list[brioche.Server[Any]]) -> None:
    srv = await serve(load("auth").app, started)
    base = f"127.0.0.1:{srv.port}"
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://{base}/health")
        assert (health.status_code, health.json()) == (200, {"connections": 0})
        echoed = await http.post(f"http://{base}/echo", content="body é")
        assert (echoed.status_code, echoed.text) == (200, "body é")
        assert (await http.get(f"http://{base}/nope")).status_code == 404
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://{base}/ws", additional_headers=headers)
        assert refused.value.response.status_code == 401
        assert refused.value.response.body == b"who are you?\n"
    headers = {"Authorization": "Bearer s3cret", "X-Request-Id": "r-42"}
    async with connect(f"ws://{base}/ws", additional_headers=headers) as client:
        assert client.response is not None and client.response.headers["x-user"] == "ada"
        assert await recv(client) == "hello ada (request r-42)"
        await client.send("one")
        await client.send("two")
        assert [await recv(client), await recv(client)] == ["ONE", "TWO"]


# -- deployment -------------------------------------------------------------------------------


async def test_metrics_serves_the_counters_to_prometheus(started: list[brioche.Server[Any]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    srv = await serve(load("metrics").app, started)
    async with connect(f"ws://127.0.0.1:{srv.port}/ws") as client:
        for i in range(20):
            await client.send(f"m{i:02}")
            assert await recv(client) == f"m{i:02}"
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{srv.port}/metrics")
        refused = await http.get(f"http://127.0.0.1:{srv.port}/ws", headers={"Upgrade": "websocket"})
        assert refused.status_code == 400
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }
    # One process: its own counters (every worker's sum under `workers`, tests/test_workers.py).
    assert samples[("brioche_messages_in_total", ())] == 20
    assert samples[("brioche_messages_out_total", ())] == 20
    assert samples[("brioche_bytes_in_total", ())] == 60
    assert samples[("brioche_connections_opened_total", ())] == 1
    assert samples[("brioche_closes_total", (("code", "1000"),))] == 1
    assert samples[("brioche_open_connections", ())] == 0
    assert samples[("brioche_handshakes_rejected_total", ())] == 0  # the 400 came after the scrape



async def test_production_script_serves_port_from_env_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "production.py"),
        env={"PORT": str(port), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc)
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"http://127.0.0.1:{port}/healthz")
        assert (reply.status_code, reply.text) == (200, "ok\n")
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await client.send("still here")
            assert await recv(client) == "still here"
            await sigterm_closes_with_1001(proc, [client])
    finally:
        await stop_process(proc)


async def test_tls_script_serves_wss_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    import ssl

    import trustme

    def issue(name: str) -> tuple[trustme.CA, Path, Path]:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        cert, key = tmp_path / f"{name}-fullchain.pem", tmp_path / f"{name}-privkey.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return ca, cert, key

    def trusting(ca: trustme.CA) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    first_ca, cert, key = issue("live")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "tls.py"),
        env={"PORT": str(port), "TLS_CERT": str(cert), "TLS_KEY": str(key), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc)
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 10)
        assert line == (f"INFO:brioche:listening on https://127.0.0.1:{port}/ and every other address "
                        "of this host (0.0.0.0)\n").encode(), line
        async with httpx.AsyncClient(verify=trusting(first_ca)) as http:
            reply = await http.get(f"https://127.0.0.1:{port}/healthz")
        assert (reply.status_code, reply.text) == (200, "ok\n")
        async with connect(f"wss://127.0.0.1:{port}/", ssl=trusting(first_ca)) as client:
            # Renewal: new files in place, then SIGHUP; this connection keeps its session.
            renewed_ca, renewed_cert, renewed_key = issue("renewed")
            renewed_cert.replace(cert)
            renewed_key.replace(key)
            proc.send_signal(signal.SIGHUP)
            line = await asyncio.wait_for(proc.stderr.readline(), 10)
            assert b"SIGHUP: TLS certificate reloaded" in line, line
            async with connect(f"wss://127.0.0.1:{port}/", ssl=trusting(renewed_ca)) as renewed:
                await renewed.send("renewed")
                assert await recv(renewed) == "renewed"
            await client.send("still here")
            assert await recv(client) == "still here"
            await sigterm_closes_with_1001(proc, [client])
    finally:
        await stop_process(proc)


async def test_workers_script_shares_the_room_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "workers.py"),
        env={"PORT": str(port), "WORKERS": "2", "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        # Every worker is ready (its relay links up) once the supervisor says so.
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert f"2 workers listening on port {port}" in line.decode(), line
        clients = [await connect(f"ws://127.0.0.1:{port}/") for _ in range(8)]
        # on_open subscribes after the 101 has gone out, and a sibling's publish is delivered by
        # the engine without waiting for this worker's loop. A client knows it is in the room
        # once its own message comes back: on_text runs after its on_open.
        joins = [f"join {i}" for i in range(len(clients))]
        for client, join in zip(clients, joins):
            await client.send(join)
        for client, join in zip(clients, joins):
            assert join in await recv_until(client, join, among=joins)
        await clients[0].send("hello, room")
        for client in clients:
            # Every client is in the room, so the message reaches all eight; joins may come first.
            await recv_until(client, "hello, room", among=joins)
        await sigterm_closes_with_1001(proc, clients, stragglers=frozenset(joins))
    finally:
        await stop_process(proc)


async def check_proxied(port: int) -> None:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{port}/healthz")
    assert (reply.status_code, reply.text) == (200, "ok\n")
    async with connect(f"ws://127.0.0.1:{port}/ws") as client:
        for message in ("through the proxy", "x" * 100_000):
            await client.send(message)
            assert await recv(client) == message


@contextlib.asynccontextmanager
async def nginx_in_front_of(srv: brioche.Server[Any], tmp_path: Path) -> AsyncIterator[int]:
    """examples/deploy/nginx.conf in a real nginx, proxying to ``srv``; yields its port."""
    port = free_port()
    site = (EXAMPLES / "deploy" / "nginx.conf").read_text()
    site = site.replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        "events {}\n"
        f"http {{ access_log off; client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};\n"
        f"       include {tmp_path}/site.conf; }}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc)
        yield port
    finally:
        await stop_process(proc)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make system-deps)")
async def test_nginx_config_proxies_websockets(
    started: list[brioche.Server[Any]], tmp_path: Path
) -> None:
    srv = await serve(load("production").app, started)
    async with nginx_in_front_of(srv, tmp_path) as port:
        await check_proxied(port)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make system-deps)")
async def test_behind_nginx_on_close_gets_the_code_of_a_close_either_side_starts(
    started: list[brioche.Server[Any]], tmp_path: Path
) -> None:
    """nginx ends both legs of an upgraded connection at the server's FIN. The server sent its
    FIN right after its own close frame, so the client's answer never reached it and on_close
    reported 1006 for every close the server started; now the FIN waits for that answer."""
    closes: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(4001, "bye")

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        closes.put_nowait((code, reason))

    def fetch(request: brioche.server.Request, srv: brioche.Server[Any]) -> brioche.server.Response | None:
        return brioche.server.upgrade(srv, request, [], None, brioche.server.bad_request)

    config = brioche.server.handler(fetch).websocket(
        brioche.websocket.init().on_text(on_text).on_close(on_close)
    )
    srv = await serve_config(config.hostname("127.0.0.1").port(0), started)
    async with nginx_in_front_of(srv, tmp_path) as port:
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await client.send("close me")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(client.recv(), 5)
            assert client.close_code == 4001 and client.close_reason == "bye"
        assert await asyncio.wait_for(closes.get(), 10) == (4001, "bye")
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await client.close(4000, "client-bye")
        assert await asyncio.wait_for(closes.get(), 10) == (4000, "client-bye")


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed (make system-deps)")
async def test_caddyfile_proxies_websockets(
    started: list[brioche.Server[Any]], tmp_path: Path
) -> None:
    srv = await serve(load("production").app, started)
    port = free_port()
    site = (EXAMPLES / "deploy" / "Caddyfile").read_text()
    site = site.replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
    site = site.replace("example.com {", f"http://127.0.0.1:{port} {{")
    (tmp_path / "Caddyfile").write_text("{\n\tadmin off\n}\n" + site)
    home = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        "caddy", "run", "--adapter", "caddyfile", "--config", str(tmp_path / "Caddyfile"),
        env={"PATH": "/usr/bin:/bin", **home},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc)
        await check_proxied(port)
    finally:
        await stop_process(proc)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (EXAMPLES / "deploy" / "brioche.service").read_text()
    assert "ExecStart=/srv/app/.venv/bin/python production.py" in unit
    unit = unit.replace("/srv/app/.venv/bin/python", sys.executable)
    unit = unit.replace("/srv/app", str(EXAMPLES))
    (tmp_path / "brioche.service").write_text(unit)
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "brioche.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert verified.returncode == 0, verified.stderr
    assert "brioche.service" not in verified.stderr, verified.stderr


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd-socket-activate")
async def test_socket_activation_serves_the_socket_systemd_passes() -> None:
    port = free_port()
    # systemd's own tool: binds, and on the first connection starts the script with the
    # listening socket as fd 3 and LISTEN_PID, LISTEN_FDS set as systemd sets them.
    proc = await asyncio.create_subprocess_exec(
        "systemd-socket-activate", "-l", f"127.0.0.1:{port}",
        sys.executable, str(EXAMPLES / "socket_activation.py"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc)
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert (reply.status_code, reply.text) == (200, "ok\n")
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await client.send("activated")
            assert await recv(client) == "activated"
            await sigterm_closes_with_1001(proc, [client])
    finally:
        await stop_process(proc)


def test_socket_activation_refuses_to_start_without_a_socket() -> None:
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / "socket_activation.py")],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )
    assert ran.returncode == 1 and "expected one socket from systemd" in ran.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_socket_activated_units_verify(tmp_path: Path) -> None:
    for name in ("brioche-activated.socket", "brioche-activated.service"):
        unit = (EXAMPLES / "deploy" / name).read_text()
        unit = unit.replace("/srv/app/.venv/bin/python", sys.executable)
        unit = unit.replace("/srv/app", str(EXAMPLES))
        (tmp_path / name).write_text(unit)
    assert "ExecStart=" + sys.executable + " socket_activation.py" in (
        tmp_path / "brioche-activated.service").read_text()
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         str(tmp_path / "brioche-activated.socket"), str(tmp_path / "brioche-activated.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert verified.returncode == 0, verified.stderr
    assert "brioche-activated" not in verified.stderr, verified.stderr


def test_sysctl_settings_exist() -> None:
    settings = [
        line.partition("=")
        for line in (EXAMPLES / "deploy" / "sysctl.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(settings) == 3
    for key, equals, value in settings:
        assert equals and value.strip()
        assert Path("/proc/sys", *key.strip().split(".")).exists(), key
