#!/usr/bin/env bash
# zig's clang as the C compiler (and, called as `zig-cc.sh ar`, the archiver) for `make
# check-targets`: ring's build script compiles C for the target, and this machine has no
# cross toolchain, while zig (from the ziglang wheel of .venv-tools) carries the headers of
# macOS's and FreeBSD's libc. cc-rs passes its own --target=<LLVM triple>; zig takes -target
# <arch-os> and does not parse Apple's "x86_64-apple-macosx", so the triple is translated.
set -euo pipefail
ZIG=(python -m ziglang)
if [ -x "$(dirname "$0")/../.venv-tools/bin/python" ]; then
  ZIG=("$(dirname "$0")/../.venv-tools/bin/python" -m ziglang)
fi
if [ "${1:-}" = ar ]; then
  shift
  exec "${ZIG[@]}" ar "$@"
fi
target=""
args=()
for a in "$@"; do
  case "$a" in
    --target=*apple*) target=x86_64-macos ;;
    --target=*freebsd*) target=x86_64-freebsd ;;
    --target=*) echo "zig-cc.sh: no zig target for $a" >&2; exit 2 ;;
    *) args+=("$a") ;;
  esac
done
exec "${ZIG[@]}" cc ${target:+-target "$target"} "${args[@]}"
