# Every routine command in one place. `make demo` and `make test` are the two set-up commands
# of the README: each installs what it needs on a fresh Debian machine with Rust and Python.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test venv install system-deps rust-test py-test typecheck conformance fuzz lint fmt bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# Build the extension (release profile) into the venv, with the test tools.
install: $(PY)
	$(PIP) install --quiet -e ".[test]"

# Third-party clients the tests talk to: node's `ws` and headless Chromium, from Debian.
system-deps:
	@if ! command -v chromium >/dev/null || [ ! -d /usr/share/nodejs/ws ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium node-ws >/dev/null; \
	fi

demo: $(PY)
	$(PIP) install --quiet .
	$(PY) -m brioche

rust-test:
	cargo test --quiet

# The stub of the Rust module must match what it exports (stubtest), and everything is strict.
typecheck: install
	$(VENV)/bin/mypy --strict python/brioche examples tests
	$(PY) -m mypy.stubtest brioche._brioche

py-test: install system-deps
	$(VENV)/bin/pytest -q

# RFC 6455 conformance: the Autobahn fuzzing client, cases 1-10 (installs wstest on first use).
conformance: install
	bash scripts/conformance.sh

# The hypothesis raw-socket fuzzer with 20x the CI's examples (~200,000; about 15 minutes).
fuzz: install
	BRIOCHE_FUZZ_SCALE=20 $(VENV)/bin/pytest -q tests/test_hostile.py -k "random_bytes or random_valid" -p no:timeout

test: rust-test typecheck py-test conformance

lint: install
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings

fmt:
	cargo fmt

bench: install
	$(PY) benches/run.py

clean:
	rm -rf target $(VENV) python/brioche/*.so
