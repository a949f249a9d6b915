"""Prometheus collectors bound to an injected registry; their names are API (SPEC section 6)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mtls_proxy import __version__

_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """Every metric the proxy exports, with pre-bound children for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.handshakes = Counter(
            "mtls_proxy_handshakes",
            "TLS handshakes on the listener",
            ["result", "reason"],
            registry=r,
        )
        self.requests = Counter(
            "mtls_proxy_requests", "Requests answered", ["decision", "code"], registry=r
        )
        self.duration = Histogram(
            "mtls_proxy_request_duration_seconds",
            "Time from request head to the end of the response",
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "mtls_proxy_upstream_errors", "Upstream failures", ["kind"], registry=r
        )
        self.connections_open = Gauge(
            "mtls_proxy_connections_open",
            "Open downstream connections (after the handshake)",
            registry=r,
        )
        self.connections = Counter(
            "mtls_proxy_connections", "Accepted downstream connections", registry=r
        )
        self.reloads = Counter(
            "mtls_proxy_reloads", "Reloads of certificates and policy", ["result"], registry=r
        )
        self.last_reload = Gauge(
            "mtls_proxy_last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload",
            registry=r,
        )
        self.not_after = Gauge(
            "mtls_proxy_cert_not_after_timestamp_seconds",
            "Expiry of loaded material (Unix time)",
            ["cert"],
            registry=r,
        )
        build = Gauge("mtls_proxy_build_info", "Build information", ["version"], registry=r)
        build.labels(version=__version__).set(1)
        self._req: dict[tuple[str, int], Counter] = {}
        self.observe = self.duration.observe

    def request(self, decision: str, status: int) -> None:
        """Count one answered request."""
        key = (decision, status // 100)
        child = self._req.get(key)
        if child is None:
            child = self._req[key] = self.requests.labels(decision=decision, code=f"{key[1]}xx")
        child.inc()

    def handshake(self, result: str, reason: str = "") -> None:
        """Count one handshake outcome."""
        self.handshakes.labels(result=result, reason=reason).inc()
