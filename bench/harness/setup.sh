#!/usr/bin/env bash
# Prepare this machine for the harness (Debian 12, as root). Idempotent: safe to run again.
#   bench/harness/setup.sh [TARGET ...]
# Installs what is missing:
#   - Debian: nginx (the upstream, and the nginx targets), wrk (load), nghttp2-client (h2load,
#     the h2/grpc phases), openssl (PKI, s_time,
#     speed), gcc + libc6-dev + libssl-dev (builds the wrk client-certificate shim), curl,
#     util-linux (taskset), python3-venv; haproxy and caddy only for those targets (all of
#     them when no TARGET is named; haproxy also serves --loadgen originator)
#   - PyPI, into .venv here: aiohttp and uvloop (requirements.txt) for the naive baseline, grpcio
#     for the gRPC upstream, the naive gRPC relay and the gRPC check
#   - builds tools/wrk_clientcert.so and tools/tcp_backend, and makes the PKI in pki/ (pki.sh)
# apt is kept from starting the packaged nginx/haproxy services.
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

PKGS=(nginx wrk nghttp2-client openssl gcc libc6-dev libssl-dev curl util-linux python3-venv ca-certificates)
# haproxy / caddy: for every target when none is named, else only for the named ones.
wants() { (($# == 0)) && return 0; local t; for t in "$@"; do [[ "${t%%=*}" == "$WANT" ]] && return 0; done; return 1; }
WANT=haproxy; if wants "$@"; then PKGS+=(haproxy); fi
WANT=caddy; if wants "$@"; then PKGS+=(caddy); fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then   # keep apt from starting the packaged services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
else
  echo "setup: Debian packages present"
fi

# The venv for bench.py and the naive baseline (the machine's python3; pip talks to PyPI only).
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import aiohttp, uvloop, grpc' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
fi
echo "setup: python $(.venv/bin/python -c 'import sys,aiohttp,uvloop,ssl;print(sys.version.split()[0],"aiohttp",aiohttp.__version__,"uvloop",uvloop.__version__,ssl.OPENSSL_VERSION)')"

# The wrk client-certificate shim.
if [[ ! -f tools/wrk_clientcert.so || tools/wrk_clientcert.c -nt tools/wrk_clientcert.so ]]; then
  gcc -O2 -Wall -shared -fPIC -o tools/wrk_clientcert.so tools/wrk_clientcert.c -ldl -lssl -lcrypto
fi
echo "setup: built tools/wrk_clientcert.so"
# The plain TCP echo/sink backend of the l4 and egress phases.
if [[ ! -x tools/tcp_backend || tools/tcp_backend.c -nt tools/tcp_backend ]]; then
  gcc -O2 -Wall -o tools/tcp_backend tools/tcp_backend.c
fi

./pki.sh
versions="$(nginx -v 2>&1 | tr -d '\n'); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1,2); $(openssl version)"
if command -v haproxy >/dev/null; then versions+="; $(haproxy -v | sed -n 1p)"; fi
if command -v caddy >/dev/null; then versions+="; caddy $(caddy version)"; fi
echo "setup: $versions"
echo "setup: done. Next: bench/harness/run.sh (see README.md), or bench/run.sh"
