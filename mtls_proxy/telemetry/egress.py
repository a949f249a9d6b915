"""`client`'s metrics (``mtls_proxy_client_*``, docs/metrics.md): what an operator asks of an
egress tunnel: is it reaching the target, why not, and how much passes."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mtls_proxy.telemetry.metrics import BUCKETS

# Why the remote server was not accepted (metrics label `reason`).
VERIFY_REASONS: Final = (
    "unknown_ca",
    "expired",
    "hostname",
    "pin",
    "verify_rule",
    "bad_certificate",
    "other",
)
# Where reaching the target failed (label `stage`).
CONNECT_STAGES: Final = ("connect", "proxy", "tls", "timeout")


class ClientMetrics:
    """Every metric `client` exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "mtls_proxy_client_connections", "Accepted local connections", registry=r
        )
        self.connections_open = Gauge(
            "mtls_proxy_client_connections_open", "Open local connections", registry=r
        )
        self.handshakes = Counter(
            "mtls_proxy_client_handshakes",
            "TLS handshakes with the target, by result (ok, resumed or failed)",
            ["result"],
            registry=r,
        )
        self.verify_failures = Counter(
            "mtls_proxy_client_verify_failures",
            "Target certificates refused, by reason",
            ["reason"],
            registry=r,
        )
        self.connect_errors = Counter(
            "mtls_proxy_client_connect_errors",
            "Failures to reach the target, by stage (connect, proxy, tls, timeout)",
            ["stage"],
            registry=r,
        )
        self.bytes = Counter(
            "mtls_proxy_client_bytes",
            "Bytes relayed, by direction (sent to the target, received from it)",
            ["direction"],
            registry=r,
        )
        self.requests = Counter(
            "mtls_proxy_client_requests",
            "Requests forwarded in --http mode, by status",
            ["status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mtls_proxy_client_request_duration_seconds",
            "--http mode: request start to response end",
            buckets=BUCKETS,
            registry=r,
        )
        self.not_after = Gauge(
            "mtls_proxy_client_cert_not_after_timestamp_seconds",
            "Unix time when our client certificate expires",
            registry=r,
        )
        self.reloads = Counter(
            "mtls_proxy_client_reloads", "Reloads of the client material", ["result"], registry=r
        )
        for reason in VERIFY_REASONS:
            self.verify_failures.labels(reason=reason)
        for stage in CONNECT_STAGES:
            self.connect_errors.labels(stage=stage)
        for result in ("ok", "resumed", "failed"):
            self.handshakes.labels(result=result)
        for direction in ("sent", "received"):
            self.bytes.labels(direction=direction)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
