"""A probe of brioche's loop rounds in a bench server: on the path (``PYTHONPATH``) of
``brioche_server.py`` with ``BRIOCHE_LOOP_PROBE_FILE`` set, it writes one line per wake-up of the
loop (`Server._on_wake`: one drain, its handlers, one `end_batch()`).

Each line has the time its handlers started (``time.monotonic()``, the clock every process on
the machine shares, so the load generator's window can select the rounds), the time in the drain
and the handlers and the time in `end_batch()`'s writes (seconds, from what `_on_wake` hands
`_size_next_batch`), and the messages drained for each of brioche_server.py's roles
(``ws.data``: echo, sub, pub, churn for S8's ``/t/c...`` churners, topics for its other ``/t/``
subscribers), then the other events. `ab.py --loop-probe` sets it up and summarises the lines.

Wraps two methods of `brioche._server.Server` in the server process; nothing else changes. The
cost, a pass over each drain's events and a line per round, is in the round's own figures.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

ROLES = ("echo", "sub", "pub", "churn", "topics")


def _role(data: object) -> str:
    if isinstance(data, str) and data.startswith("/t/"):
        return "churn" if data.startswith("/t/c") else "topics"
    return data if isinstance(data, str) and data in ROLES else "other"


def _install(path: str) -> None:
    import brioche._server as srv

    out = open(path, "w", buffering=1 << 16)
    runs = (srv._TEXT_RUN, srv._BYTES_RUN)
    request = srv._REQUEST
    current: dict[str, Any] = {}
    lines = 0

    dispatch = srv.Server._dispatch_batch
    size_next = srv.Server._size_next_batch

    def dispatch_batch(self: Any, events: list[tuple[Any, ...]]) -> None:
        counts = dict.fromkeys((*ROLES, "other"), 0)
        events_other = 0
        for event in events:
            if event[0] < request:
                counts[_role(event[1].data)] += len(event[2]) if event[0] in runs else 1
            else:
                events_other += 1
        current["counts"] = counts
        current["events_other"] = events_other
        current["start"] = time.monotonic()
        dispatch(self, events)

    def size_next_batch(self: Any, count: int, seconds: float, writes: float) -> None:
        nonlocal lines
        counts = current.pop("counts", None)
        if counts is not None:
            out.write(f"{current['start']:.6f} {seconds:.6f} {writes:.6f} "
                      + " ".join(str(counts[r]) for r in (*ROLES, "other"))
                      + f" {current['events_other']}\n")
            lines += 1
            if lines % 256 == 0:
                out.flush()
        size_next(self, count, seconds, writes)

    srv.Server._dispatch_batch = dispatch_batch  # type: ignore[method-assign]
    srv.Server._size_next_batch = size_next_batch  # type: ignore[method-assign]

    def flush_and_exit(signum: int, frame: object) -> None:
        # run.py stops a server with SIGTERM, whose default action would lose the buffer: flush,
        # then take that default action.
        out.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, flush_and_exit)


if os.environ.get("BRIOCHE_LOOP_PROBE_FILE"):
    _install(os.environ["BRIOCHE_LOOP_PROBE_FILE"])
