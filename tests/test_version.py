"""`brioche.__version__` is Cargo.toml's version, the one in the installed package's metadata."""

import importlib.metadata
import os
import re
import sysconfig
from pathlib import Path

import pytest

import brioche
from brioche import _brioche

CARGO_TOML = Path(__file__).resolve().parent.parent / "Cargo.toml"


def cargo_version() -> str:
    text = CARGO_TOML.read_text(encoding="utf-8")
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', package, re.MULTILINE)
    assert match is not None, f"no version in {CARGO_TOML}'s [package]"
    return match.group(1)


def test_version_is_cargo_version() -> None:
    assert brioche.__version__ == cargo_version()
    assert brioche.__version__ == _brioche.__version__


def test_version_is_metadata_version() -> None:
    assert brioche.__version__ == importlib.metadata.version("brioche")


def test_imported_from_the_installed_wheel() -> None:
    """Under scripts/test-wheel.sh, brioche is the wheel in the venv, not the source tree."""
    if os.environ.get("BRIOCHE_TEST_INSTALLED") != "1":
        pytest.skip("BRIOCHE_TEST_INSTALLED=1 is set by scripts/test-wheel.sh only")
    site_packages = Path(sysconfig.get_paths()["platlib"]).resolve()
    module = Path(brioche.__file__).resolve()
    assert module.is_relative_to(site_packages), f"{module} is not in {site_packages}"
    extension = Path(_brioche.__file__).name
    assert extension.endswith(".abi3.so"), extension
