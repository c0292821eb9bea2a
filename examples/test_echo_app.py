"""Testing handlers with pytest and pytest-asyncio: serve the app on a free port of 127.0.0.1 and
talk to it with a real client, here `websockets`. Run with `pytest examples/test_echo_app.py`."""

import pytest
from websockets.asyncio.client import connect

from echo import app  # examples/echo.py, the server under test


@pytest.mark.asyncio
async def test_echo_sends_text_and_bytes_back() -> None:
    # `serve()` listens before it returns; leaving the block stops the server and closes its
    # connections, so each test gets a server of its own.
    async with app.hostname("127.0.0.1").port(0).serve() as srv:
        async with connect(f"ws://127.0.0.1:{srv.port}/ws") as client:
            await client.send("hello")
            assert await client.recv() == "hello"
            await client.send(b"\x00\xff")
            assert await client.recv() == b"\x00\xff"
