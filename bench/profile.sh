#!/usr/bin/env bash
# Profile mtls-proxy under keep-alive load: the harness's nginx upstream and wrk (with the
# client-certificate shim), py-spy sampling the proxy. Prints the top functions by CPU (self and
# inclusive). Everything on 127.0.0.1; bounded by DURATION seconds.
#   bench/profile.sh [DURATION] [ka|close]   (needs bench/harness/setup.sh; py-spy beside PYTHON)
# ka: keep-alive requests; close: one full handshake + one request per connection.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/bench/harness}
[[ -w "$HARNESS" ]] || HARNESS=${BENCH_STATE:-${TMPDIR:-/tmp}/mtls-proxy-bench}
DUR=${1:-10}
MODE=${2:-ka}
WRK_EXTRA=(); RESUME=1
if [[ "$MODE" == close ]]; then WRK_EXTRA=(-H "Connection: close"); RESUME=0; fi
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYSPY=${PYSPY:-$(dirname "$PY")/py-spy}
work=$(mktemp -d)
export BENCH_RUNDIR=$work BENCH_UPSTREAM_HOST=127.0.0.1 BENCH_UPSTREAM_PORT=18180
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
bash "$HARNESS/tools/upstream.sh" >/dev/null 2>&1 & pids+=($!)
PKI=$HARNESS/pki
"$PY" -m mtls_proxy serve --listen 127.0.0.1:18190 --upstream http://127.0.0.1:18180 \
  --cert "$PKI/server-chain.pem" --key "$PKI/server.key" --cacert "$PKI/client-ca.pem" \
  --allow-cn client-a --admin 127.0.0.1:0 ${PROXY_ARGS:-} 2>"$work/proxy.log" & pids+=($!)
proxy=$!
sleep 1.5
"$PYSPY" record --pid "$proxy" --rate 1000 --format raw --output "$work/stacks.txt" \
  --duration "$((DUR + 1))" --nonblocking >/dev/null 2>&1 & spy=$!
LD_PRELOAD=$HARNESS/tools/wrk_clientcert.so WRK_CLIENT_CERT=$PKI/client-a-chain.pem \
  WRK_CLIENT_KEY=$PKI/client-a.key WRK_TLS_RESUME=$RESUME wrk -t1 -c32 -d"${DUR}s" --latency \
  "${WRK_EXTRA[@]}" https://127.0.0.1:18190/ \
  | grep -E "Requests/sec|99%|50%"
wait "$spy" || true
"$PY" - "$work/stacks.txt" <<'PYEOF'
import collections, sys
self_t, incl, total = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n); total += n
    frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
              if " (" in f else f for f in stack.split(";")]
    self_t[frames[-1]] += n
    for f in set(frames):
        incl[f] += n
print(f"samples: {total}\ntop self:")
for f, n in self_t.most_common(25):
    print(f"  {100*n/total:5.1f}%  {f}")
print("top inclusive:")
for f, n in incl.most_common(30):
    print(f"  {100*n/total:5.1f}%  {f}")
PYEOF
