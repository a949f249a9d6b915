# mtls-proxy container image: the wheel on a pinned slim Python, non-root, read-only friendly.
# Build: docker build -t mtls-proxy:0.1.0 .   Run: see README "Deploy" (configure with MTLS_PROXY_*).
# The base: the newest patch release of the python:3.13 slim-bookworm line, the same in both
# stages (tests/integration/test_deploy.py checks it).
FROM python:3.13.16-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mtls_proxy ./mtls_proxy
# jh2: the faster HTTP/2 library (--h2-library auto takes it; docs/http2.md).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/mtls_proxy-*.whl jh2

FROM python:3.13.16-slim-bookworm
LABEL org.opencontainers.image.title="mtls-proxy" \
      org.opencontainers.image.description="An mTLS-terminating, policy-checking, identity-header-injecting reverse proxy / sidecar" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.13.16-slim-bookworm"
# No .pyc writes (read-only root filesystem), logs straight to stderr. The admin port listens on
# all interfaces: a container's loopback is reachable from inside the container only, and the
# kubelet's probes and Prometheus come from outside it (README "Deploy": publish 8443 only).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MTLS_PROXY_LISTEN=0.0.0.0:8443 \
    MTLS_PROXY_ADMIN=0.0.0.0:9901
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels mtls-proxy jh2 \
 && rm -rf /wheels
# A fixed, unprivileged UID/GID (the "nonroot" convention); no shell login, no home writes.
USER 65532:65532
EXPOSE 8443 9901
# /healthz on the admin port, with the Python already in the image (no curl needed). It follows
# MTLS_PROXY_ADMIN (0.0.0.0 and [::] mean the loopback here; `off`: nothing to probe, so healthy)
# and ignores HTTP_PROXY.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as u; a = os.environ.get('MTLS_PROXY_ADMIN', '127.0.0.1:9901'); h, _, p = a.rpartition(':'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '[::]': '[::1]'}.get(h, h); sys.exit(0 if a == 'off' or u.build_opener(u.ProxyHandler({})).open(f'http://{h}:{p}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["mtls-proxy"]
CMD ["serve"]
