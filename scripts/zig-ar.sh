#!/usr/bin/env bash
exec "$(dirname "$0")/zig-cc.sh" ar "$@"
