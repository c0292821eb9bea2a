"""Shared by the Python bench servers: argv parsing and the open-files limit."""

from __future__ import annotations

import os
import resource
import sys

TOPIC = "bench"
# S8: `/t/a,b,c` subscribes to the topics a, b and c; on it "+x" subscribes to x, "-x"
# unsubscribes, each answered with the same text once done. On `/pub` a message "#x ..." is
# published whole to the topic x (any other message to TOPIC).
TOPICS_PATH = "/t/"


def topics_of(path: str) -> list[str]:
    """The topics of an S8 path (`/t/a,b,c`)."""
    return path[len(TOPICS_PATH):].split(",")


def publish_topic(text: str) -> str:
    """The topic a message on `/pub` goes to: x for "#x ...", else TOPIC."""
    return text[1:text.index(" ")] if text[:1] == "#" else TOPIC


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
