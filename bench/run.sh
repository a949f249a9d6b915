#!/usr/bin/env bash
# Measure mtls-proxy beside nginx (and any other peer) on this machine with the harness in
# bench/harness (wrk + client-cert shim, openssl s_time), then write bench/RESULTS.md.
# BENCH_HARNESS=DIR runs another copy of the harness instead.
#
#   bench/run.sh                         # nginx + mtls-proxy, 3 rounds (~10 min)
#   bench/run.sh --runs 1 --duration 5   # quick look
#   BENCH_TARGETS="nginx haproxy caddy" bench/run.sh
#   BENCH_TARGETS="nginx haproxy grpc-relay" bench/run.sh --phases h2,grpc --runs 1   # HTTP/2, gRPC
#   BENCH_PROXY_PYTHON=/path/to/python bench/run.sh ...  # that interpreter (with mtls-proxy's
#       dependencies) runs this checkout via PYTHONPATH; no .venv is made or changed
#   bench/run.sh --phases l4,egress      # serve --mode tcp vs HAProxy, client vs nginx/HAProxy
#       (harness/l4egress.py, ~5 min); writes RESULTS-l4-egress.md instead of RESULTS.md
#
# With the h2 or grpc phase, mtls-proxy also gets `--http2 on --upstream-protocol auto` (in the
# grpc phase the harness points BENCH_UPSTREAM_URL at its grpcio h2c upstream).
#
# mtls-proxy runs in its default configuration: policy (--allow-cn), XFCC + simple identity
# headers, JSON access log and the admin/metrics listener all ON.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/bench/harness}
STATE=${BENCH_STATE:-${TMPDIR:-/tmp}/mtls-proxy-bench}
export BENCH_STATE=$STATE

if [[ -n "${BENCH_PROXY_PYTHON:-}" ]]; then
  PROXY="env PYTHONPATH=$ROOT $BENCH_PROXY_PYTHON -m mtls_proxy"
else
  [[ -x "$ROOT/.venv/bin/pip" ]] || python3 -m venv "$ROOT/.venv"
  # Every time: a venv made before a dependency was added must get it (a few seconds).
  "$ROOT/.venv/bin/pip" install -q -e "$ROOT" 2>&1 | grep -v '^WARNING: Location' || true
  PROXY="$ROOT/.venv/bin/mtls-proxy"
fi
H2ARGS=""
PH=$(sed -n 's/.* --phases \([^ ]*\).*/\1/p' <<< " $* ")
PH=${PH:-${BENCH_PHASES:-ka,new,reuse,close,close_resume}}
# l4 and egress are harness/l4egress.py's; the other phases are bench.py's.
L4PH=$(tr ',' '\n' <<< "$PH" | grep -xE 'l4|egress' | paste -sd, -) || true
PH=$(tr ',' '\n' <<< "$PH" | grep -vxE 'l4|egress' | paste -sd, -) || true
REST=()   # the arguments without --phases
while (($#)); do
  if [[ $1 == --phases ]]; then shift 2; continue; fi
  REST+=("$1"); shift
done
set -- "${REST[@]}"
SETUP_TARGETS=${BENCH_TARGETS:-nginx}
[[ -z "$L4PH" ]] || SETUP_TARGETS+=" haproxy"   # l4egress.py's peer and origin
# shellcheck disable=SC2086  # a list of names
bash "$HARNESS/setup.sh" $SETUP_TARGETS 2>&1 | grep -v "^WARNING: Location" | tail -2
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
machine() {
  echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) x ${cpu}, $(free -g | awk '/Mem:/{print $2}') GiB,"
  echo "$(uname -sr), $(python3 --version), $(openssl version | cut -d' ' -f1,2),"
}
# Paths in RESULTS files are relative to the repository (no machine paths in committed files).
relpath() {
  case "$1" in
    "$ROOT"/*) echo "${1#"$ROOT"/}" ;;
    *) echo "results/$(basename "$1") in the harness's working copy" ;;
  esac
}

if [[ -n "$L4PH" ]]; then
  log=$(mktemp)
  set +e
  bash "$HARNESS/run.sh" l4egress --phases "$L4PH" --proxy "$PROXY" "$@" 2>&1 \
    | grep --line-buffered -v '^WARNING: Location' | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  latest=$(sed -n 's/^\[bench\] results -> //p' "$log" | tail -1)
  rm -f "$log"
  if [[ -z "$latest" || ! -f "$latest/table.md" ]]; then
    echo "bench/run.sh: l4egress.py produced no results (exit $rc)" >&2
    exit 1
  fi
  {
    echo "# mtls-proxy bench results: TCP mode and egress"
    echo
    machine
    echo "mtls-proxy $($PROXY --version | cut -d' ' -f2) on uvloop, 1 worker; $(haproxy -v | sed -n 1p | cut -d" " -f1-3),"
    echo "$(nginx -v 2>&1 | cut -d' ' -f3), $(wrk -v 2>&1 | sed -n 1p | cut -d" " -f1,2). The machine was shared with other work."
    echo
    echo "Command: \`bench/run.sh --phases $L4PH${*:+ $*}\`, harness \`bench/harness/l4egress.py\`."
    echo "Raw data: \`$(relpath "$latest")\` (not committed)."
    echo
    cat "$latest/table.md"
    echo
    awk '/^## /{on = ($0 == "## L4 and egress")} on' "$ROOT/bench/NOTES.md"
  } > "$ROOT/bench/RESULTS-l4-egress.md"
  echo "bench/run.sh: wrote bench/RESULTS-l4-egress.md (l4egress.py exit $rc)"
  [[ -n "$PH" ]] || exit "$rc"
fi

if [[ ",$PH," =~ ,(h2|grpc), ]]; then H2ARGS=" --http2 on --upstream-protocol auto"; fi
# A run of only the h2/grpc phases writes RESULTS-h2.md (same format), so that it does not
# replace the HTTP/1.1 tables of RESULTS.md; its notes are NOTES.md's "HTTP/2 and gRPC" section.
OUTFILE=RESULTS.md
if ! [[ ",$PH," =~ ,(ka|new|reuse|close|close_resume), ]]; then OUTFILE=RESULTS-h2.md; fi
TARGET="mtls-proxy=exec $PROXY serve --listen \"\$BENCH_HOST:\$BENCH_PORT\" \
 --upstream \"\$BENCH_UPSTREAM_URL\" --cert \"\$BENCH_SERVER_CERT\" --key \"\$BENCH_SERVER_KEY\" \
 --cacert \"\$BENCH_CLIENT_CA\" --allow-cn \"\$BENCH_ALLOWED_CN\" --admin 127.0.0.1:0$H2ARGS"

# Resumed handshakes under load (close_resume) are measured too, beside s_time's serial reuse.
PHASES=(--phases "$PH")

log=$(mktemp)
set +e
# shellcheck disable=SC2086  # BENCH_TARGETS is a list of names
bash "$HARNESS/run.sh" "${PHASES[@]}" "$@" ${BENCH_TARGETS:-nginx} "$TARGET" 2>&1 | grep -v '^WARNING: Location' | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# The harness prints where it wrote (its own folder, or a writable copy when that is read-only).
latest=$(sed -n 's/^\[bench\] results -> //p' "$log" | tail -1)
rm -f "$log"
if [[ -z "$latest" || ! -f "$latest/table.md" ]]; then
  echo "bench/run.sh: the harness produced no results (exit $rc)" >&2
  exit 1
fi

raw=$(relpath "$latest")
case "$HARNESS" in
  "$ROOT"/*) harness=${HARNESS#"$ROOT"/} ;;
  *) harness="BENCH_HARNESS ($(basename "$HARNESS"))" ;;
esac
{
  echo "# mtls-proxy bench results"
  echo
  machine
  echo "mtls-proxy $($PROXY --version | cut -d' ' -f2) on uvloop, 1 worker, pinned as the harness pins peers."
  echo
  echo "Command: \`bench/run.sh --phases $PH${*:+ $*}\` (targets: ${BENCH_TARGETS:-nginx} + mtls-proxy), harness"
  echo "\`$harness\` (see its README.md for the phases). Raw data: \`$raw\` (not committed)."
  echo
  cat "$latest/table.md"
  if [[ -f "$ROOT/bench/NOTES.md" ]]; then
    echo
    if [[ $OUTFILE == RESULTS.md ]]; then
      cat "$ROOT/bench/NOTES.md"
    else
      awk '/^## /{on = ($0 == "## HTTP/2 and gRPC")} on' "$ROOT/bench/NOTES.md"
    fi
  fi
} > "$ROOT/bench/$OUTFILE"
echo "bench/run.sh: wrote bench/$OUTFILE (harness exit $rc)"
exit "$rc"
