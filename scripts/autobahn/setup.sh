#!/usr/bin/env bash
# Install the Autobahn|TestSuite (`wstest`, RFC 6455 conformance suite) on
# Debian 12 (bookworm). Idempotent: re-running only fixes what is missing.
#
#   ./setup.sh                    # wstest into $AUTOBAHN_PREFIX/venv (as root)
#   ./setup.sh --with-reference   # + websockets/aiohttp reference echo
#                                 #   servers in $AUTOBAHN_PREFIX/ref-venv
#
# Why this is convoluted: autobahntestsuite (latest 25.10.1 on PyPI) is still
# Python 2.7 only, upstream declined a py3 port (they ship a Docker image), and
# bookworm has no python2. So:
#   1. python2.7 (+ -dev) comes from Debian bullseye's own archive, pinned so
#      that ONLY the python2.7 packages (and libffi7/libssl1.1 they need) can
#      ever be taken from bullseye (all other bullseye packages: priority -1).
#   2. pip 20.3.4 / setuptools 44.1.1 / wheel 0.37.1 / virtualenv 16.7.12
#      (last py2-capable releases) are fetched as wheels by the py3 pip.
#   3. a py2.7 virtualenv gets the pinned requirements-py27.txt; wheels and
#      sdists are first downloaded into $AUTOBAHN_PREFIX/wheelhouse, then
#      installed with --no-index (wsaccel is compiled, needs Cython 3.0.x).
#
# Env: AUTOBAHN_PREFIX (default /opt/autobahn); AUTOBAHN_PY27 = a python2.7
# with headers to use instead of Debian's /usr/bin/python2.7. If bullseye
# cannot be reached, a pyenv-built 2.7 (~/.pyenv/versions/2.7.*) is used.
# (`python2.7` on PATH may be a pyenv shim that fails: only explicit paths
# are used here.)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX="${AUTOBAHN_PREFIX:-/opt/autobahn}"
VENV="$PREFIX/venv"
WHEELHOUSE="$PREFIX/wheelhouse"
REF_VENV="$PREFIX/ref-venv"
WITH_REF=0
for arg in "$@"; do
  case "$arg" in
    --with-reference) WITH_REF=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

BOOT_WHEELS=(pip==20.3.4 setuptools==44.1.1 wheel==0.37.1 virtualenv==16.7.12)
# Also put in the wheelhouse: PEP 517 build requirements of the sdists in
# requirements-py27.txt (wsaccel 0.6.6: Cython~=3.0.0, setuptools, wheel),
# and argparse, which unittest2 needs where the python2.7 lacks Debian's
# argparse.egg-info (pyenv builds); it is not pinned in the requirements
# because Debian's stdlib copy (1.2.1) shadows any installed one.
EXTRA_WHEELS=(Cython==3.0.12 wheel==0.37.1 setuptools==44.1.1 argparse==1.4.0)
# Reference servers used to validate the harness (py3).
REF_PKGS=(websockets==17.4 aiohttp==3.14.5)
BULLSEYE_PKGS="python2.7 python2.7-minimal python2.7-dev libpython2.7 libpython2.7-minimal libpython2.7-stdlib libpython2.7-dev libffi7 libssl1.1"

log() { printf '\n== %s\n' "$*"; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# py2 pip must not see this machine's py3-oriented pip config / env
# (find-links to py3 wheels, constraint files, file:// extra indexes).
pip2() {
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL \
      PIP_CONFIG_FILE=/dev/null PIP_NO_PYTHON_VERSION_WARNING=1 \
      PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" "$@"
}

url_ok() {  # url_ok URL -> 0 if an HTTP GET succeeds
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 20 "$1"
  else
    python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)' "$1" >/dev/null 2>&1
  fi
}

py27_ok() {  # py27_ok PYTHON -> 0 if it is a 2.7 with headers, ssl and zlib
  [ -x "$1" ] || return 1
  "$1" -c '
import sys, os, ssl, zlib
from distutils.sysconfig import get_python_inc
assert sys.version_info[:2] == (2, 7)
assert os.path.exists(os.path.join(get_python_inc(), "Python.h"))
' >/dev/null 2>&1
}

# ---------------------------------------------------------------- 1. python2.7
install_debian_py27() {
  log "installing python2.7 from Debian bullseye (pinned)"
  local SRC=/etc/apt/sources.list.d/bullseye-py27.sources
  local PIN=/etc/apt/preferences.d/bullseye-py27
  if [ ! -e "$SRC" ]; then
    local MIRROR="" m
    for m in http://deb.debian.org/debian http://archive.debian.org/debian; do
      if url_ok "$m/dists/bullseye/Release"; then MIRROR="$m"; break; fi
    done
    if [ -z "$MIRROR" ]; then
      echo "WARNING: bullseye is reachable neither on deb.debian.org nor archive.debian.org" >&2
      return 1
    fi
    $SUDO tee "$SRC" >/dev/null <<EOF
# Added by brioche scripts/autobahn/setup.sh: only for python2.7 (see $PIN).
Types: deb
URIs: $MIRROR
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  $SUDO tee "$PIN" >/dev/null <<EOF
# Added by brioche scripts/autobahn/setup.sh: Python 2.7 (for Autobahn|TestSuite) from
# Debian bullseye; nothing else may ever come from bullseye.
Package: $BULLSEYE_PKGS
Pin: release n=bullseye
Pin-Priority: 100

Package: *
Pin: release n=bullseye
Pin-Priority: -1
EOF
  $SUDO apt-get update -q || return 1
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python2.7 python2.7-dev gcc libc6-dev || return 1
}

if [ -n "${AUTOBAHN_PY27:-}" ]; then
  PY27="$AUTOBAHN_PY27"
  py27_ok "$PY27" || { echo "ERROR: AUTOBAHN_PY27=$PY27 is not a python2.7 with headers" >&2; exit 1; }
else
  PY27=/usr/bin/python2.7
  if ! py27_ok "$PY27" || ! command -v gcc >/dev/null 2>&1; then
    if ! install_debian_py27 || ! py27_ok "$PY27"; then
      PY27=""
      for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7.*/bin/python2.7; do
        if py27_ok "$p"; then PY27="$p"; break; fi
      done
      if [ -z "$PY27" ]; then
        echo "ERROR: no Python 2.7 could be installed (Debian bullseye unreachable, no pyenv 2.7)" >&2
        exit 1
      fi
      echo "WARNING: using $PY27 instead of Debian's python2.7" >&2
    fi
  fi
fi
"$PY27" -c 'import sys, ssl; print("python %s (%s), %s" % (sys.version.split()[0], sys.executable, ssl.OPENSSL_VERSION))'

# ------------------------------------------------- 2. bootstrap wheels (py3 pip)
mkdir -p "$WHEELHOUSE"
have_boot=1
for spec in "${BOOT_WHEELS[@]}"; do
  n="${spec%%==*}"; v="${spec##*==}"
  ls "$WHEELHOUSE/${n}-${v}-"*.whl >/dev/null 2>&1 || have_boot=0
done
if [ "$have_boot" = 0 ]; then
  log "downloading py2 bootstrap wheels with the py3 pip"
  python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 2.7 --implementation cp --abi cp27mu --platform manylinux1_x86_64 \
    -d "$WHEELHOUSE" "${BOOT_WHEELS[@]}"
fi

# ---------------------------------------------------------- 3. py2.7 virtualenv
venv_base="$("$VENV/bin/python" -c 'import sys; print(getattr(sys, "real_prefix", ""))' 2>/dev/null || true)"
py27_base="$("$PY27" -c 'import sys; print(sys.prefix)')"
if [ "$venv_base" != "$py27_base" ] || [ ! -x "$VENV/bin/pip" ] \
   || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
  log "creating Python 2.7 virtualenv in $VENV"
  rm -rf "$VENV"
  tmp="$(mktemp -d)"
  "$PY27" -m zipfile -e "$WHEELHOUSE"/virtualenv-16.7.12-py2.py3-none-any.whl "$tmp"
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    "$PY27" "$tmp/virtualenv.py" --no-download --extra-search-dir "$WHEELHOUSE" \
      -p "$PY27" "$VENV"
  rm -rf "$tmp"
fi

# ------------------------------------------------- 4. autobahntestsuite + deps
installed_ok() {
  "$VENV/bin/python" -c '
import sys, pkg_resources
reqs = [l.split("#")[0].strip() for l in open(sys.argv[1])]
pkg_resources.require([r for r in reqs if r])   # raises if missing / wrong version
import autobahntestsuite.wstest, wsaccel, ujson   # noqa
' "$HERE/requirements-py27.txt" >/dev/null 2>&1
}
if installed_ok; then
  log "autobahntestsuite already installed with the pinned requirements"
else
  log "downloading pinned py2 requirements into $WHEELHOUSE"
  pip2 download -q -d "$WHEELHOUSE" --no-deps -r "$HERE/requirements-py27.txt"
  pip2 download -q -d "$WHEELHOUSE" --no-deps "${EXTRA_WHEELS[@]}"
  log "installing (offline, from $WHEELHOUSE)"
  pip2 install -q --no-index --find-links "$WHEELHOUSE" -r "$HERE/requirements-py27.txt"
  installed_ok || { echo "ERROR: install verification failed" >&2; exit 1; }
fi
"$VENV/bin/wstest" -a 2>/dev/null | tail -n 2
"$VENV/bin/python" -c 'from autobahn.websocket.utf8validator import Utf8Validator; from autobahn.websocket.xormasker import XorMaskerNull; print("utf8 validator: %s; xor masker: %s" % (Utf8Validator.__module__, XorMaskerNull.__module__))'

# ------------------------------------------- 5. optional py3 reference servers
if [ "$WITH_REF" = 1 ]; then
  if ! "$REF_VENV/bin/python" -c 'import websockets, aiohttp' 2>/dev/null; then
    log "creating py3 reference-server venv in $REF_VENV"
    python3 -m venv "$REF_VENV"
    "$REF_VENV/bin/pip" install -q "${REF_PKGS[@]}"
  fi
  "$REF_VENV/bin/python" -c 'import websockets, aiohttp; print("reference: websockets %s, aiohttp %s" % (websockets.__version__, aiohttp.__version__))'
fi

log "done: wstest = $VENV/bin/wstest ; run suites with $HERE/run.sh HOST PORT"
