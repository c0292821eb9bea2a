#!/usr/bin/env bash
# The test suite against the built wheel, installed into a fresh venv of another CPython:
#
#   scripts/test-wheel.sh 3.12 [PYTEST OPTIONS...]
#
# Finds CPython 3.12.x (pyenv's, or $PYENV_ROOT/versions/3.12.*), makes .venv-3.12 with it anew,
# installs into it the one abi3 wheel in dist/ (`make wheel`) with the [test] extras, and runs
# pytest without the load tests and the engine-only ones (markers `load` and `once`), which the
# default interpreter runs (`make py-test-load`), from a
# temporary directory: tests/ is on sys.path (its conftest and helpers), the source tree's
# python/ is not, so `import brioche` is the installed package (tests/test_version.py checks
# that brioche.__file__ is in the venv's site-packages). Prints how long each step took.
#
# A missing interpreter is an error, not a skip: the matrix is what says the versions work.
set -euo pipefail

VERSION="${1:?usage: scripts/test-wheel.sh 3.X [pytest options...]}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

find_python() {
  local prefix="" root="${PYENV_ROOT:-$HOME/.pyenv}" candidate
  if command -v pyenv >/dev/null 2>&1; then
    prefix="$(pyenv prefix "$VERSION" 2>/dev/null | head -n1 || true)"
  fi
  if [ -z "$prefix" ] || [ ! -x "$prefix/bin/python$VERSION" ]; then
    prefix=""
    # The newest patch release installed, e.g. 3.12.1 before 3.12.0 (not 3.12.1t or 3.120).
    for candidate in $(ls -d "$root/versions/$VERSION".* 2>/dev/null | sort -rV); do
      if [[ "$(basename "$candidate")" =~ ^$VERSION\.[0-9]+$ ]] && [ -x "$candidate/bin/python$VERSION" ]; then
        prefix="$candidate"
        break
      fi
    done
  fi
  if [ -z "$prefix" ]; then
    echo "test-wheel: no CPython $VERSION found (tried 'pyenv prefix $VERSION' and $root/versions/$VERSION.*)." >&2
    echo "test-wheel: install it (pyenv install $VERSION) or leave $VERSION out: make test-matrix MATRIX_PYTHONS=\"...\"" >&2
    exit 1
  fi
  echo "$prefix/bin/python$VERSION"
}

shopt -s nullglob
wheels=(dist/brioche-*-abi3-*.whl)
if [ "${#wheels[@]}" -ne 1 ]; then
  echo "test-wheel: want exactly one abi3 wheel in dist/ (make wheel), found ${#wheels[@]}: ${wheels[*]}" >&2
  exit 1
fi
WHEEL="$REPO/${wheels[0]}"

PYTHON="$(find_python)"
VENV="$REPO/.venv-$VERSION"
echo "== Python $VERSION: $("$PYTHON" --version 2>&1) ($PYTHON) into .venv-$VERSION: $(basename "$WHEEL")"

start=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "brioche[test] @ file://$WHEEL"
install=$((SECONDS - start))

RUN_DIR="$(mktemp -d)"
trap 'rm -rf "$RUN_DIR"' EXIT
start=$SECONDS
status=0
(cd "$RUN_DIR" && BRIOCHE_TEST_INSTALLED=1 "$VENV/bin/pytest" -q -p no:cacheprovider \
  -c "$REPO/pyproject.toml" --rootdir "$REPO" -m "not load and not once" "$@" "$REPO/tests") || status=$?
tests=$((SECONDS - start))

echo "== Python $VERSION: venv and wheel ${install}s, tests ${tests}s, pytest exit $status"
exit "$status"
