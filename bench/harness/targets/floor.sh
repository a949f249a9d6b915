#!/usr/bin/env bash
# The floor (issue 18): the cheapest Python/uvloop mTLS relay, no proxy logic (bench/harness/tools/floor.py:
# uvloop's SSL transport, the same client CA, a CN check once per connection, bytes to the
# upstream unparsed, one upstream connection per client). Every table carries it, so that each
# figure also reads as "x of the floor".
set -euo pipefail
: "${BENCH_HOST:?}" "${BENCH_PORT:?}" "${BENCH_SERVER_CERT:?}" "${BENCH_SERVER_KEY:?}" "${BENCH_CLIENT_CA:?}" \
  "${BENCH_UPSTREAM:?}" "${BENCH_ALLOWED_CN:=client-a}"
exec "${BENCH_PYTHON:?}" "$(dirname "$0")/../tools/floor.py" "$BENCH_HOST:$BENCH_PORT" "$BENCH_UPSTREAM" \
  "$BENCH_SERVER_CERT" "$BENCH_SERVER_KEY" "$BENCH_CLIENT_CA" "$BENCH_ALLOWED_CN"
