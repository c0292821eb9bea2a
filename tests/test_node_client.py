"""Interoperability: node's ``ws`` client (Debian's node-ws) echoes through the server byte-exact."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import brioche
from brioche import websocket
from conftest import Recorder, ServeFn, ws_url

NODE_PATH = "/usr/share/nodejs"
SCRIPT = Path(__file__).parent / "js" / "echo_client.js"
EXPECTED_MESSAGES = 8  # as listed in echo_client.js


def node_or_fail() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    assert node is not None, "node is not installed (apt-get install -y nodejs node-ws)"
    assert Path(NODE_PATH, "ws").is_dir(), f"the ws module is missing from {NODE_PATH} (apt-get install -y node-ws)"
    return node


# The byte lengths of the messages echo_client.js sends, in order.
EXPECTED_LENGTHS = [5, len("héllo wörld ✓ 🥐".encode()), 0, 70000, 7, 0, 256, 200000]


async def run_node_echo_client(url: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run echo_client.js against ``url`` (``env`` added to the environment); its report,
    checked to say every echo came back byte-exact."""
    node = node_or_fail()
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": NODE_PATH, **(env or {})},
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"node failed: stdout={stdout.decode()!r} stderr={stderr.decode()!r}"
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["ok"] is True, result
    assert [r["length"] for r in result["results"]] == EXPECTED_LENGTHS
    return result


async def test_node_ws_client_echo_is_byte_exact_and_close_reaches_on_close(
    serve: ServeFn, recorder: Recorder
) -> None:

    def on_open(ws: brioche.WebSocket[Any]) -> None:
        recorder.add("open", ws.remote_address)

    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        recorder.add("text", len(text.encode()))
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        recorder.add("bytes", len(data))
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        recorder.add("close", code, reason)

    srv = await serve(websocket.init().on_open(on_open).on_text(on_text).on_bytes(on_bytes).on_close(on_close))
    result = await run_node_echo_client(ws_url(srv))
    assert [r["index"] for r in result["results"]] == list(range(EXPECTED_MESSAGES))
    assert result["close"]["code"] == 4002  # the server echoes the client's close code

    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    assert recorder.of("open") == [("127.0.0.1",)]
    assert recorder.of("text") == [(5,), (len("héllo wörld ✓ 🥐".encode()),), (0,), (70000,)]
    assert recorder.of("bytes") == [(7,), (0,), (256,), (200000,)]
    assert recorder.of("close") == [(4002, "node bye")]
