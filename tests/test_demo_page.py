"""The demo page (``python -m brioche``) works in a real browser: headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from typing import Any

import brioche
from brioche import server
from brioche.__main__ import config as demo_config
from brioche.__main__ import handler as demo_handler
from conftest import ServeFn


async def demo_selftest_in_chromium(
    serve: ServeFn, scheme: str = "http", chromium_flags: Sequence[str] = (), **settings: Any
) -> Any:
    """Serve the demo (``settings`` as for ``serve``), open ``/?selftest=1`` in headless Chromium
    and return the report its page posts back: what it echoed, what the chat room said and the
    extensions each connection negotiated."""
    chromium = shutil.which("chromium")
    assert chromium is not None, "chromium is not installed (make system-deps installs it)"
    report: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def handler(request: server.Request, srv: brioche.Server[Any]) -> server.Response | None:
        if request.path == "/selftest-report":
            report.set_result(request.json())
            return server.ok()
        return demo_handler(request, srv)

    srv = await serve(demo_config().websocket_config, handler, **settings)
    # Chromium's helper processes may still be writing the profile as the test ends.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = await asyncio.create_subprocess_exec(
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", *chromium_flags,
            f"{scheme}://127.0.0.1:{srv.port}/?selftest=1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return await asyncio.wait_for(report, 60)
        finally:
            os.killpg(browser.pid, signal.SIGKILL)
            await browser.wait()


def assert_demo_worked(result: Any) -> None:
    assert result["echo"] == "héllo from the browser"
    assert result["chat"]["text"] == "hi room"
    assert result["chat"]["from"].startswith("guest-")
    # Chromium offers permessage-deflate; the demo accepts it and compresses what it sends.
    assert result["extensions"] == {"echo": "permessage-deflate", "chat": "permessage-deflate"}


async def test_demo_page_echoes_and_chats_in_headless_chromium(serve: ServeFn) -> None:
    assert_demo_worked(await demo_selftest_in_chromium(serve))
