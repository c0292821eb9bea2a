"""The portable path (a pipe instead of an eventfd, no SCHED_BATCH), which builds off Linux use,
runs here with BRIOCHE_PORTABLE=1. The choice is made once per process: each case is a child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "wakeup_kind.py"


@pytest.mark.parametrize(("portable", "kind", "policy"), [("1", "fifo", "0"), ("", "eventfd", "3")])
def test_the_portable_path_uses_a_pipe_and_the_default_scheduling(portable: str, kind: str, policy: str) -> None:
    env = dict(os.environ, BRIOCHE_PORTABLE=portable)
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [kind, policy]
