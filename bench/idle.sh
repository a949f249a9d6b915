#!/usr/bin/env bash
# Memory with idle mTLS keep-alive connections, each target in turn on the same upstream, PKI
# and client (bench/idle.py: CONNS connections, one request each, then held; RSS summed over
# the target's process tree; requests on other connections must still be served).
#   bench/idle.sh [CONNS] [TARGET ...]     targets: mtls-proxy (default), nginx, haproxy, floor
#   bench/idle.sh 10000 nginx haproxy floor mtls-proxy
# Needs bench/harness/setup.sh (its PKI, nginx and haproxy). Prints one line per target and a
# Markdown table with the ratios to nginx and to the floor.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/bench/harness}
[[ -w "$HARNESS" ]] || HARNESS=${BENCH_STATE:-${TMPDIR:-/tmp}/mtls-proxy-bench}
CONNS=${1:-10000}
shift || true
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(mtls-proxy)
PY=${PYTHON:-$ROOT/.venv/bin/python}
work=$(mktemp -d)
PKI=$HARNESS/pki
export BENCH_RUNDIR=$work BENCH_UPSTREAM_HOST=127.0.0.1 BENCH_UPSTREAM_PORT=18181
export BENCH_HOST=127.0.0.1 BENCH_PORT=18191 BENCH_UPSTREAM=127.0.0.1:18181
export BENCH_UPSTREAM_URL=http://127.0.0.1:18181 BENCH_ALLOWED_CN=client-a
export BENCH_SERVER_CERT=$PKI/server-chain.pem BENCH_SERVER_KEY=$PKI/server.key
export BENCH_CLIENT_CA=$PKI/client-ca.pem BENCH_SERVER_PEM=$PKI/server-full.pem
export BENCH_MAX_CONNS=$((CONNS + 200))
ulimit -Hn $((CONNS * 4 + 1000)) 2>/dev/null || true  # root may raise it: HAProxy wants 2 per connection and more
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# Where the hard limit is below what HAProxy computes for maxconn (2 per connection), it is told
# the real limit; one idle client connection takes one descriptor there (the server side pools).
export BENCH_FD_LIMIT=$(ulimit -n)
# HAProxy refuses to start when 2 x maxconn exceeds it: cap maxconn there (a run with more
# connections than that cannot include HAProxy on this machine; 20,000 descriptors -> 9,900).
if ((BENCH_MAX_CONNS * 2 + 200 > BENCH_FD_LIMIT)); then
  BENCH_MAX_CONNS=$(((BENCH_FD_LIMIT - 200) / 2))
  ((CONNS <= BENCH_MAX_CONNS)) || echo "idle.sh: $CONNS connections exceed what HAProxy can take here ($BENCH_MAX_CONNS)" >&2
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
bash "$HARNESS/tools/upstream.sh" >/dev/null 2>&1 & pids+=($!)

start() {
  case $1 in
    mtls-proxy)
      exec "$PY" -m mtls_proxy serve --listen "$BENCH_HOST:$BENCH_PORT" --upstream "$BENCH_UPSTREAM_URL" \
        --cert "$BENCH_SERVER_CERT" --key "$BENCH_SERVER_KEY" --cacert "$BENCH_CLIENT_CA" \
        --allow-cn client-a --admin 127.0.0.1:0 --max-connections "$BENCH_MAX_CONNS" --idle-timeout 120 \
        --no-access-log ${PROXY_ARGS:-} ;;
    floor)
      exec "$PY" "$HARNESS/tools/floor.py" "$BENCH_HOST:$BENCH_PORT" "$BENCH_UPSTREAM" \
        "$BENCH_SERVER_CERT" "$BENCH_SERVER_KEY" "$BENCH_CLIENT_CA" client-a ;;
    *) exec bash "$HARNESS/targets/$1.sh" ;;
  esac
}

results=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$work/$t"
  BENCH_RUNDIR=$work/$t start "$t" 2>"$work/$t.log" &
  pid=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$BENCH_PORT") 2>/dev/null && break
    sleep 0.1
  done
  sleep 0.5
  line=$(timeout 900 "$PY" "$ROOT/bench/idle.py" --port "$BENCH_PORT" --pid "$pid" --conns "$CONNS" \
    --cert "$PKI/client-a-chain.pem" --key "$PKI/client-a.key" --ca "$PKI/root.crt" --limit-mb 1e9) || true
  echo "$t: $line"
  results+=("$t|$line")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 1
done

# One table: RSS held, per connection, and the ratios (x nginx, x floor) when those ran.
"$PY" - "${results[@]}" <<'PYEOF'
import re, sys
rows = {}
for item in sys.argv[1:]:
    name, _, line = item.partition("|")
    m = re.search(r"(\d+) still open; proxy RSS (\d+) MB -> (\d+) MB \(([\d.]+) KB per "
                  r"connection\).*: ([\d.]+)s", line)
    if m:
        rows[name] = (int(m[1]), int(m[2]), int(m[3]), float(m[4]), float(m[5]))
print("\n| target | still open | RSS at start | RSS held | KB per connection | x nginx (RSS held) | x floor | other requests served in |")
print("|---|--:|--:|--:|--:|--:|--:|--:|")
for name, (still, start, held, per, served) in rows.items():
    xn = f"{held / rows['nginx'][2]:.2f}" if "nginx" in rows else "-"
    xf = f"{held / rows['floor'][2]:.2f}" if "floor" in rows else "-"
    print(f"| {name} | {still} | {start} MB | {held} MB | {per:.1f} | {xn} | {xf} | {served:.2f} s |")
PYEOF
