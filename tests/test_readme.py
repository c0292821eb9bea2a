"""The README's quick start is examples/quickstart.py: it runs as written, and it serves."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

from websockets.asyncio.client import connect

from brioche import server

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"


def test_readme_quick_start_is_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README has no python block"
    assert blocks[0] == QUICKSTART.read_text(encoding="utf-8")


async def test_quick_start_runs_and_prints_its_port() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(QUICKSTART),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    port = int(out.decode().strip())
    assert 0 < port < 65536


def load_quickstart() -> ModuleType:
    """The example as a module: its handlers, without running its ``main``."""
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def http_get(port: int, path: str = "/") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_quick_start_handlers_greet_echo_and_answer_http() -> None:
    quickstart = load_quickstart()
    # main()'s server, which the example stops as soon as it has printed the port.
    config = server.handler(quickstart.handler).websocket(quickstart.ws_config())
    srv = await config.hostname("127.0.0.1").port(0).serve()
    try:
        async with connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=5) as client:
            assert client.response is not None
            session = client.response.headers["x-session"]
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", session)
            assert await asyncio.wait_for(client.recv(), 5) == f"hello {session}"
            await client.send("hi")
            assert await asyncio.wait_for(client.recv(), 5) == "echo: hi"
            await client.send(b"\x00\xffbytes")
            assert await asyncio.wait_for(client.recv(), 5) == b"\x00\xffbytes"
        assert await asyncio.to_thread(http_get, srv.port) == (200, b"hello from brioche")
        # A plain GET of the WebSocket path is the client's mistake, not the server's.
        assert await asyncio.to_thread(http_get, srv.port, "/ws") == (400, b"Bad Request")
    finally:
        await asyncio.wait_for(srv.stop(close_active_connections=True), 10)
