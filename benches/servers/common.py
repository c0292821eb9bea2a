"""Shared by the Python bench servers: argv parsing and the open-files limit."""

from __future__ import annotations

import os
import resource
import sys

TOPIC = "bench"


def backpressure_limit() -> int:
    """Bytes queued for one connection before sends to it are dropped (brioche, socketify; Bun's
    bun_server.ts reads the same variable): 16 MiB, the servers' default, unless benches/run.py
    sets a smaller one (S10, to reach it within a short run)."""
    return int(os.environ.get("BENCH_BACKPRESSURE_LIMIT", 16 * 1024 * 1024))


def setup() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the port from argv[1]."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} PORT")
    return int(sys.argv[1])


def listening(name: str, port: int) -> None:
    print(f"{name} listening on 127.0.0.1:{port}", flush=True)
