#!/usr/bin/env bash
# Profile mtls-proxy under keep-alive load: the harness's nginx upstream and wrk (with the
# client-certificate shim), py-spy sampling the proxy. Prints the top functions by CPU (self and
# inclusive). Everything on 127.0.0.1; bounded by DURATION seconds.
#   bench/profile.sh [DURATION] [ka|close|h2|grpc|l4|l4-bulk|egress-http|egress-tcp]
#   (needs bench/harness/setup.sh; py-spy beside
#   PYTHON, or PYSPY=/path/to/py-spy)
# ka: keep-alive requests; close: one full handshake + one request per connection;
# h2: HTTP/2 GETs with h2load (the same client-cert shim), 16 connections x 10 streams, to the
#     HTTP/1.1 upstream; grpc: small unary gRPC calls with h2load to the harness's grpcio upstream
#     (h2c). Both run the proxy with --http2 on --upstream-protocol auto, and end with the split
#     of bench/profile_split.py (TLS, h2, hyperframe, hpack, our modules, event loop).
# l4, l4-bulk, egress-http, egress-tcp: mtls-proxy alone in one round of harness/l4egress.py (its
#     backend, origins and loads: bench/README.md), py-spy during full-handshake connections to
#     serve --mode tcp, a 1 GiB both-ways transfer through it, keep-alive requests through
#     client --http, or new connections through client (L4).
# PYSPY_NATIVE=1 adds --native (C frames: OpenSSL, libc, uvloop) for a finer split.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/bench/harness}
[[ -w "$HARNESS" ]] || HARNESS=${BENCH_STATE:-${TMPDIR:-/tmp}/mtls-proxy-bench}
DUR=${1:-10}
MODE=${2:-ka}
WRK_EXTRA=(); RESUME=1
if [[ "$MODE" == close ]]; then WRK_EXTRA=(-H "Connection: close"); RESUME=0; fi
H2ARGS=(); UPURL=http://127.0.0.1:18180
if [[ "$MODE" == h2 || "$MODE" == grpc ]]; then H2ARGS=(--http2 on --upstream-protocol auto); fi
if [[ "$MODE" == grpc ]]; then UPURL=http://127.0.0.1:18181; fi
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYSPY=${PYSPY:-$(dirname "$PY")/py-spy}
case "$MODE" in
  l4 | l4-bulk | egress-http | egress-tcp)
    case "$MODE" in
      l4) only=l4/mtls-proxy phase=conns ;;
      l4-bulk) only=l4/mtls-proxy phase=bulk2 ;;
      egress-http) only=egress-http/mtls-proxy phase=ka ;;
      egress-tcp) only=egress-tcp/mtls-proxy phase=conns ;;
    esac
    exec bash "$HARNESS/run.sh" l4egress --phases "${MODE%%-*}" --only "$only" --profile "$phase" \
      --runs 1 --duration "$DUR" --noise-retries 0 --bulk-mib 1024 --proxy "$PY -m mtls_proxy" \
      --py-spy "$PYSPY"
    ;;
esac
work=$(mktemp -d)
export BENCH_RUNDIR=$work BENCH_UPSTREAM_HOST=127.0.0.1 BENCH_UPSTREAM_PORT=18180
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
if [[ "$MODE" == grpc ]]; then
  "$HARNESS/.venv/bin/python" "$HARNESS/tools/grpc_upstream.py" --port 18181 >/dev/null 2>&1 & pids+=($!)
else
  bash "$HARNESS/tools/upstream.sh" >/dev/null 2>&1 & pids+=($!)
fi
PKI=$HARNESS/pki
# shellcheck disable=SC2086  # PROXY_ARGS: extra options, split on spaces
"$PY" -m mtls_proxy serve --listen 127.0.0.1:18190 --upstream "$UPURL" "${H2ARGS[@]}" \
  --cert "$PKI/server-chain.pem" --key "$PKI/server.key" --cacert "$PKI/client-ca.pem" \
  --allow-cn client-a --admin 127.0.0.1:0 ${PROXY_ARGS:-} 2>"$work/proxy.log" & pids+=($!)
proxy=$!
sleep 1.5
NATIVE=(); [[ "${PYSPY_NATIVE:-0}" == 1 ]] && NATIVE=(--native)
"$PYSPY" record --pid "$proxy" --rate 1000 --format raw --output "$work/stacks.txt" \
  --duration "$((DUR + 1))" --nonblocking "${NATIVE[@]}" >/dev/null 2>&1 & spy=$!
SHIM=(env LD_PRELOAD="$HARNESS/tools/wrk_clientcert.so" WRK_CLIENT_CERT="$PKI/client-a-chain.pem"
  WRK_CLIENT_KEY="$PKI/client-a.key" WRK_TLS_RESUME="$RESUME")
if [[ "$MODE" == h2 || "$MODE" == grpc ]]; then
  H2LOAD=(h2load -t1 -c16 -m10 -D "$DUR")
  if [[ "$MODE" == grpc ]]; then
    printf '\0\0\0\0\040bench-grpc-call-0123456789abcdef' > "$work/req.bin"   # 5-byte prefix + 32 bytes
    H2LOAD+=(-d "$work/req.bin" -H "content-type: application/grpc" -H "te: trailers")
  fi
  path=/; [[ "$MODE" == grpc ]] && path=/bench.Bench/Echo
  "${SHIM[@]}" "${H2LOAD[@]}" "https://127.0.0.1:18190$path" | grep -E "finished in|status codes"
else
  "${SHIM[@]}" wrk -t1 -c32 -d"${DUR}s" --latency "${WRK_EXTRA[@]}" https://127.0.0.1:18190/ \
    | grep -E "Requests/sec|99%|50%"
fi
wait "$spy" || true
if [[ "$MODE" == h2 || "$MODE" == grpc || -n "${PYSPY_SPLIT:-}" ]]; then
  "$PY" "$ROOT/bench/profile_split.py" "$work/stacks.txt"
  [[ -n "${PYSPY_KEEP:-}" ]] && cp "$work/stacks.txt" "$PYSPY_KEEP"
  exit 0
fi
"$PY" "$ROOT/bench/top_frames.py" "$work/stacks.txt"
