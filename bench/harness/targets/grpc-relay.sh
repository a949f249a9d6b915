#!/usr/bin/env bash
# Naive Python gRPC baseline (grpc phase only): naive_grpc_relay.py, 1 process, grpcio's sync
# server (thread pool) with mTLS credentials, one grpcio channel (h2c) to the upstream.
# NAIVE_GRPC_EXTRA_ARGS=--aio runs the grpc.aio variant.
set -euo pipefail
: "${BENCH_HOST:?}" "${BENCH_PORT:?}" "${BENCH_SERVER_CERT:?}" "${BENCH_SERVER_KEY:?}" "${BENCH_CLIENT_CA:?}" \
  "${BENCH_UPSTREAM:?}" "${BENCH_DIR:?}" "${BENCH_ALLOWED_CN:=client-a}"
exec "${BENCH_PYTHON:-python3}" "$BENCH_DIR/naive_grpc_relay.py" --host "$BENCH_HOST" --port "$BENCH_PORT" \
  --cert "$BENCH_SERVER_CERT" --key "$BENCH_SERVER_KEY" --client-ca "$BENCH_CLIENT_CA" \
  --upstream "$BENCH_UPSTREAM" --allowed-cn "$BENCH_ALLOWED_CN" ${NAIVE_GRPC_EXTRA_ARGS:-}
