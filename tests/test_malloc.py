"""glibc's malloc thresholds (src/py/malloc.rs): set when the first server starts, unless the
environment sets malloc's parameters itself. Each case runs in a fresh process, since the
thresholds are process-wide and glibc's own adjustment depends on what was freed before."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

PROBE = Path(__file__).parent / "scripts" / "malloc_probe.py"
MIB = 1 << 20


def probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, str(PROBE), mode], env={**clean, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_without_a_server_glibc_maps_blocks_of_2_mib_and_trims_a_freed_burst() -> None:
    # What the next test changes: glibc's threshold starts at 128 KiB, and once the 8 MiB block
    # is freed it trims what is free at the top of the heap beyond 16 MiB.
    got = probe("none")
    assert got["2MiB_mapped"] is True and got["8MiB_mapped"] is True
    assert isinstance(got["kept_after_burst"], int) and got["kept_after_burst"] <= 16 * MIB


def test_a_server_keeps_blocks_under_4_mib_and_32_mib_of_freed_memory_in_the_heap() -> None:
    got = probe("serve")
    assert got["8MiB_mapped"] is True
    assert got["2MiB_mapped"] is False
    # 24 MiB freed at the top of the heap stays there for the next burst, under 32 MiB.
    assert isinstance(got["kept_after_burst"], int) and got["kept_after_burst"] >= 24 * MIB


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_MAX_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_malloc_settings_in_the_environment_are_left_alone(env: dict[str, str]) -> None:
    got = probe("serve", **env)
    assert got["2MiB_mapped"] is True
    assert isinstance(got["kept_after_burst"], int) and got["kept_after_burst"] < MIB
