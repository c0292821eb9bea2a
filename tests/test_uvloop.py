"""brioche runs on uvloop as well as on the default asyncio loop."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "uvloop_echo.py"


async def test_echo_in_order_on_uvloop() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["uvloop", "ok"]
