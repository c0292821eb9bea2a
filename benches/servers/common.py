"""Shared by the Python bench servers: argv parsing and the open-files limit."""

from __future__ import annotations

import resource
import sys

TOPIC = "bench"


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
