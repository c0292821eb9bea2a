"""An ``on_close`` that never returns, as one awaiting a call without a timeout: what a stop's
grace period is for (run_slow_close.py, loop_end.py). Prints what it went through to stdout."""

import asyncio

import brioche


async def on_close_never_returning(ws: brioche.WebSocket[None], code: int, reason: str) -> None:
    print(f"on_close {code}", flush=True)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        print("on_close cancelled", flush=True)
        raise
