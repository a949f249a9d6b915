#!/usr/bin/env bash
# Memory with 10,000 idle mTLS keep-alive connections (issue: RSS under 400 MB, others served).
#   bench/idle.sh [CONNS]     needs bench/harness/setup.sh (its PKI and nginx upstream)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/bench/harness}
[[ -w "$HARNESS" ]] || HARNESS=${BENCH_STATE:-${TMPDIR:-/tmp}/mtls-proxy-bench}
CONNS=${1:-10000}
PY=${PYTHON:-$ROOT/.venv/bin/python}
work=$(mktemp -d)
export BENCH_RUNDIR=$work BENCH_UPSTREAM_HOST=127.0.0.1 BENCH_UPSTREAM_PORT=18181
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
bash "$HARNESS/tools/upstream.sh" >/dev/null 2>&1 & pids+=($!)
PKI=$HARNESS/pki
"$PY" -m mtls_proxy serve --listen 127.0.0.1:18191 --upstream http://127.0.0.1:18181 \
  --cert "$PKI/server-chain.pem" --key "$PKI/server.key" --cacert "$PKI/client-ca.pem" \
  --allow-cn client-a --admin 127.0.0.1:0 --max-connections $((CONNS + 100)) \
  --no-access-log ${PROXY_ARGS:-} 2>"$work/proxy.log" & pids+=($!)
proxy=$!
sleep 1.5
timeout 600 "$PY" "$ROOT/bench/idle.py" --port 18191 --pid "$proxy" --conns "$CONNS" \
  --cert "$PKI/client-a-chain.pem" --key "$PKI/client-a.key" --ca "$PKI/root.crt"
