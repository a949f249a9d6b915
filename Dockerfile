# mtls-proxy container image: the wheel on a pinned slim Python, non-root, read-only friendly.
# Build: docker build -t mtls-proxy .   Run: see README "Deploy" (configure with MTLS_PROXY_* env).
FROM python:3.13.1-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mtls_proxy ./mtls_proxy
# jh2: the faster HTTP/2 library (--h2-library auto takes it; docs/http2.md).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/mtls_proxy-*.whl jh2

FROM python:3.13.1-slim-bookworm
# No .pyc writes (read-only root filesystem), logs straight to stderr.
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
# /healthz on the admin port, with the Python already in the image (no curl needed).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["mtls-proxy"]
CMD ["serve"]
