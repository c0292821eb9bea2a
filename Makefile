# Every routine command in one place. `make demo` and `make test` are the two set-up commands
# of the README: each installs what it needs on a fresh Debian machine with Rust (rustup, 1.88+)
# and Python (`make test` as root, with pyenv's CPythons: see the README's set-up).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Every CPython that requires-python (>=3.10) admits: the abi3 wheel is tested on each.
MATRIX_PYTHONS ?= 3.10 3.11 3.12 3.13
MATRIX := $(addprefix test-py,$(MATRIX_PYTHONS))

# maturin, ziglang, auditwheel and twine, at the versions pinned in scripts/wheel-tools.txt.
TOOLS := .venv-tools

.PHONY: demo test docs install develop system-deps rust-test valgrind py-test py-test-load engine-checks wheel test-matrix $(MATRIX) typecheck conformance conformance-deflate test-portable check-targets fuzz lint fmt bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The venv every step of `make test` uses: the wheel of `make wheel` (the file users get) with the
# test and docs tools. Installing that wheel, not an editable build, saves `make test` a second
# release build of the crate (about 4 minutes on two cores): the wheel's zig-linked build and a
# host build share no artefacts. `make develop` is the editable build for working on brioche.
install: wheel $(PY)
	$(PIP) install --quiet "brioche[test,docs] @ file://$$(ls $(CURDIR)/dist/brioche-*-abi3-*.whl)"
	$(PIP) install --quiet --force-reinstall --no-deps dist/brioche-*-abi3-*.whl

# Editable: python/brioche's edits show at once; the Rust part is rebuilt by running it again.
develop: $(PY)
	$(PIP) install --quiet -e ".[test,docs]"

# Third-party clients the tests talk to: node's `ws` and headless Chromium, from Debian; nginx
# and Caddy, which tests/test_docs.py runs the deployment page's proxy configurations in;
# redis-server, which tests/test_redis_pubsub.py shares topics between processes through.
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v valgrind >/dev/null || [ ! -d /usr/share/nodejs/ws ] \
			|| ! command -v nginx >/dev/null || ! command -v caddy >/dev/null || ! command -v redis-server >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium node-ws valgrind nginx-light caddy redis-server >/dev/null; \
	fi

demo: $(PY)
	$(PIP) install --quiet .
	$(PY) -m brioche

rust-test:
	cargo test --quiet

# The engine's tests under valgrind's memcheck: no invalid access, no definitely lost block.
valgrind: system-deps
	@bin=$$(cargo test --no-run 2>&1 | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))/\1/p'); \
	valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
		$$bin --test-threads=1 --quiet

# The stub of the Rust module must match what it exports (stubtest), and everything is strict.
typecheck: install
	$(VENV)/bin/mypy --strict python/brioche examples tests
	$(PY) -m mypy.stubtest brioche._brioche

py-test: install system-deps
	$(VENV)/bin/pytest -q

# Empty in engine-checks' own make, whose wheel is installed already (`install` rebuilds it).
INSTALL_DEP ?= install

# The load tests (marker `load`: thousands of connections, soaks, the hypothesis fuzzers) and the
# tests of the engine alone (marker `once`: Redis's failures and topologies, a 30-second clock;
# a third of a suite's time), once, with .venv's interpreter: `make test` runs everything else on
# each CPython through test-matrix.
py-test-load: $(INSTALL_DEP) system-deps
	$(VENV)/bin/pytest -q -m "load or once"

$(TOOLS)/bin/maturin: scripts/wheel-tools.txt
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip
	$(TOOLS)/bin/pip install --quiet -r scripts/wheel-tools.txt
	touch $@

# dist/: one wheel for CPython 3.10+ on x86_64 glibc Linux, and the sdist.
# - abi3 (pyo3 "abi3-py310", the Cargo feature "abi3" that pyproject.toml turns on): the
#   extension uses only CPython's stable ABI of 3.10, so the one file loads on 3.10 to 3.13 and
#   later (tag cp310-abi3); benches/RESULTS.md ("abi3") measures what that costs.
# - manylinux2014 (glibc 2.17) by linking with zig against glibc 2.17's symbols, not with the
#   host's glibc: the dependencies are pure Rust over libc (no C library, no OpenSSL), and Rust's
#   std itself supports glibc 2.17, so nothing needs manylinux_2_28's newer glibc. The wheel
#   installs on any glibc Linux of the last decade (CentOS 7, Debian 8, Ubuntu 14.04 on).
# auditwheel checks the tag: it fails the target if the wheel needs a newer glibc than 2.17.
wheel: $(TOOLS)/bin/maturin
	rm -rf dist
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(TOOLS)/bin/maturin build --quiet --release --zig --compatibility manylinux2014 --out dist
	$(TOOLS)/bin/maturin sdist --out dist
	$(TOOLS)/bin/auditwheel show dist/*.whl | tee dist/auditwheel.txt
	grep -q '"manylinux_2_17_x86_64"' dist/auditwheel.txt
	rm dist/auditwheel.txt
	$(TOOLS)/bin/twine check --strict dist/*

# The suite but the load and engine-only tests on each of MATRIX_PYTHONS, two at a time (MATRIX_JOBS), each
# against the abi3 wheel of `make wheel` installed in a new .venv-3.X (scripts/test-wheel.sh),
# not against the source tree; a missing interpreter fails the target. `make test-py3.12` runs
# one. Two at a time because a suite spends most of its time waiting (close, idle and handshake
# timeouts, clients), not computing: CI's 25 minutes could not hold four in a row with the rest.
# The one test with a CPU-sensitive bound (timer lateness under a flood) counts the loop
# thread's own CPU time, which another suite on the other core does not inflate. -O keeps each
# suite's output together.
MATRIX_JOBS ?= 2
test-matrix: wheel system-deps
	$(MAKE) --no-print-directory -j$(MATRIX_JOBS) -O WHEEL_DEP= $(MATRIX)

# Empty in test-matrix's own make, whose wheel is built already.
WHEEL_DEP ?= wheel
$(MATRIX): test-py%: $(WHEEL_DEP) system-deps
	bash scripts/test-wheel.sh $*

# RFC 6455 conformance: the Autobahn fuzzing client, cases 1-10 (installs wstest on first use),
# over ws:// (the server offering permessage-deflate) and over wss:// (server.tls, a throwaway
# certificate). The deflate cases 12 and 13 take 10-17 minutes, nearly all in wstest, which CI's
# 25-minute budget cannot hold: `make conformance-deflate` runs them (all 216 OK when landed).
CORE_CASES := 1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*
conformance: install
	bash scripts/conformance.sh "$(CORE_CASES)"
	AUTOBAHN_TLS=1 bash scripts/conformance.sh "$(CORE_CASES)"

conformance-deflate: install
	bash scripts/conformance.sh "12.*,13.*"

# The hypothesis raw-socket fuzzer with 20x the CI's examples (260,000; about 15 minutes), random
# on each run (profile "fuzz"); everywhere else the examples are the same each run (tests/conftest.py).
fuzz: install
	BRIOCHE_FUZZ_SCALE=20 BRIOCHE_HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q tests/test_hostile.py -k "random_bytes or random_valid" -p no:timeout

# The documentation site (mkdocs.yml, docs/) into site/; any warning fails it.
# `.venv/bin/mkdocs serve` serves it with live reload on http://127.0.0.1:8000/.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The portable path that builds off Linux take (a pipe wake-up, no SCHED_BATCH; platform.rs),
# run here with BRIOCHE_PORTABLE=1: the engine's tests and the suites that exercise the bridge.
test-portable: install
	BRIOCHE_PORTABLE=1 cargo test --quiet
	BRIOCHE_PORTABLE=1 $(VENV)/bin/pytest -q -m "not load" tests/test_echo.py tests/test_lifecycle.py \
		tests/test_stop.py tests/test_tasks.py tests/test_backpressure.py tests/test_flow_control.py

# Type-check the crate for macOS and FreeBSD (their std from rustup). ring's build script compiles
# C for the target: zig (the ziglang wheel of .venv-tools) is that C compiler, through
# scripts/zig-cc.sh. Not in `make test`: it downloads two targets' std with rustup, which a CI
# machine may not reach (crates.io is not the Rust distribution server).
PORTABLE_TARGETS := x86_64-apple-darwin x86_64-unknown-freebsd
check-targets: $(TOOLS)/bin/maturin
	rustup target add $(PORTABLE_TARGETS)
	CC_x86_64_apple_darwin=$(CURDIR)/scripts/zig-cc.sh AR_x86_64_apple_darwin=$(CURDIR)/scripts/zig-ar.sh \
	CC_x86_64_unknown_freebsd=$(CURDIR)/scripts/zig-cc.sh AR_x86_64_unknown_freebsd=$(CURDIR)/scripts/zig-ar.sh \
		cargo check --quiet $(addprefix --target ,$(PORTABLE_TARGETS))

# valgrind beside the load and once set: valgrind keeps one core busy (about two and a half
# minutes), while that set mostly waits (a 30-second handshake timeout, Redis's failovers), so
# the two together take about as long as the set alone, and CI keeps its 25 minutes' margin.
# The engine's tests are built for valgrind's slowdown. The once set checks deadlines the
# engine keeps (Redis's answer within 2 s, its PINGs) against a Redis slowed on purpose by
# seconds, far more than a busy core costs; watch CI for a test that fails only there.
engine-checks: install system-deps
	$(MAKE) --no-print-directory -j2 -O INSTALL_DEP= valgrind py-test-load

test: lint rust-test typecheck docs engine-checks test-matrix test-portable conformance

lint: install
	cargo fmt --check
	cargo clippy --all-targets --features abi3 -- -D warnings

fmt:
	cargo fmt

bench: install
	$(PY) benches/run.py

clean:
	rm -rf target site dist $(VENV) $(TOOLS) .venv-3.* python/brioche/*.so
