#!/usr/bin/env bash
# The test suite on another CPython than the default one (requires-python is >=3.10):
#
#   scripts/test-python.sh 3.12 [PYTEST ARGS...]
#
# Finds CPython 3.12.x (pyenv's, or $PYENV_ROOT/versions/3.12.*), makes .venv-3.12 with it,
# builds brioche into it with the [test] extras (editable; its own cargo target dir,
# target/py3.12, so the versions do not rebuild over each other's or the default build's
# artifacts), and runs pytest without the load tests (marker `load`), which the default
# interpreter runs. Prints how long the build and the tests took.
#
# A missing interpreter is an error, not a skip: the matrix is what says the versions work.
set -euo pipefail

VERSION="${1:?usage: scripts/test-python.sh 3.X [pytest args...]}"
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
    echo "test-python: no CPython $VERSION found (tried 'pyenv prefix $VERSION' and $root/versions/$VERSION.*)." >&2
    echo "test-python: install it (pyenv install $VERSION) or leave $VERSION out: make test-matrix MATRIX_PYTHONS=\"...\"" >&2
    exit 1
  fi
  echo "$prefix/bin/python$VERSION"
}

PYTHON="$(find_python)"
VENV=".venv-$VERSION"
echo "== Python $VERSION: $("$PYTHON" --version 2>&1) ($PYTHON) into $VENV"

# A venv left from another interpreter (3.12.0 replaced by 3.12.1, a moved pyenv) is remade.
version_of() { "$1" -c 'import sys; print(sys.version)' 2>/dev/null || true; }
if [ -e "$VENV" ] && [ "$(version_of "$VENV/bin/python")" != "$(version_of "$PYTHON")" ]; then
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi

start=$SECONDS
CARGO_TARGET_DIR="$REPO/target/py$VERSION" "$VENV/bin/pip" install --quiet -e ".[test]"
build=$((SECONDS - start))

start=$SECONDS
status=0
"$VENV/bin/pytest" -q -m "not load" "$@" || status=$?
tests=$((SECONDS - start))

echo "== Python $VERSION: build ${build}s, tests ${tests}s, pytest exit $status"
exit "$status"
