#!/usr/bin/env bash
# Run the harness (after setup.sh): bench.py with this directory's venv, PKI made if missing.
#   bench/harness/run.sh [--runs N] [--duration S] [--hs-duration S] [--conns N]
#                        [--loadgen shim|originator] [--pin T/H|none] [TARGET ...]
#   TARGET: NAME of targets/NAME.sh, or NAME='command line' for an extra target (README.md).
#   Default targets: upstream-plain nginx-direct nginx haproxy caddy aiohttp aiohttp-uvloop
#   bench/harness/run.sh l4egress --proxy CMD [--phases l4,egress] [--runs N] ...
#     runs l4egress.py instead (the l4 and egress phases; README.md)
set -euo pipefail
# A read-only copy of this directory runs from a writable copy instead.
SRC=$(cd "$(dirname "$0")" && pwd)
if [[ ! -w "$SRC" ]]; then
  STATE=${BENCH_STATE:-${TMPDIR:-/tmp}/mtls-proxy-bench}
  mkdir -p "$STATE"
  cp -r --no-preserve=mode "$SRC"/. "$STATE"/
  chmod +x "$STATE"/*.sh "$STATE"/targets/*.sh "$STATE"/tools/*.sh 2>/dev/null || true
  exec "$STATE/$(basename "$0")" "$@"
fi
cd "$SRC"
if [[ ! -x .venv/bin/python || ! -f tools/wrk_clientcert.so ]] || ! command -v wrk >/dev/null; then
  echo "run.sh: environment incomplete, run $SRC/setup.sh first" >&2; exit 1
fi
./pki.sh >/dev/null
if [[ "${1:-}" == l4egress ]]; then
  shift
  [[ -x tools/tcp_backend ]] || { echo "run.sh: tools/tcp_backend missing, run setup.sh" >&2; exit 1; }
  exec .venv/bin/python l4egress.py "$@"
fi
exec .venv/bin/python bench.py "$@"
