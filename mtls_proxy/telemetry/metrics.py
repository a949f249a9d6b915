"""Prometheus collectors bound to an injected registry; their names are API (docs/metrics.md).

The two per-request metrics (requests_total and request_duration_seconds) are plain integers
updated on the hot path and turned into metric families at scrape time: prometheus_client's
Counter/Histogram take a lock per update, which costs more than the policy decision.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mtls_proxy import __version__

HANDSHAKE_REASONS: Final = (
    "no_certificate",
    "unknown_ca",
    "expired",
    "revoked",
    "bad_certificate",
    "protocol",
    "timeout",
    "other",
)
# GOAWAY reasons: http2/guard.py's budgets (resets, header block bytes, frame floods), a protocol
# error of the client (h2 found it), the idle timeout, --h2-connection-max-streams, shutdown.
H2_GOAWAY_REASONS: Final = (
    "reset_budget",
    "header_block",
    "flood",
    "protocol_error",
    "idle",
    "max_streams",
    "shutdown",
)
BUCKETS: Final = (
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


class _RequestStats(Collector):
    """requests_total{decision,code} and the request duration histogram, lock-free; with
    HTTP/2 enabled both gain a protocol label (SPEC section 6)."""

    def __init__(self) -> None:
        self.protocol_label = False
        self.counts: dict[tuple[str, int, str], int] = {}
        self.buckets: dict[str, list[int]] = {"http1": [0] * (len(BUCKETS) + 1)}  # last: +Inf
        self.sums: dict[str, float] = {"http1": 0.0}

    def collect(self) -> Iterator[Metric]:
        """Metric families for a scrape."""
        label = self.protocol_label
        extra = ["protocol"] if label else []
        requests = CounterMetricFamily(
            "mtls_proxy_requests", "Requests answered", labels=["decision", "code", *extra]
        )
        totals: dict[tuple[str, ...], int] = {}
        for (decision, klass, protocol), n in self.counts.items():
            key: tuple[str, ...] = (decision, f"{klass}xx")
            key = (*key, protocol) if label else key
            totals[key] = totals.get(key, 0) + n
        for key, n in sorted(totals.items()):
            requests.add_metric(list(key), n)
        yield requests
        hist = HistogramMetricFamily(
            "mtls_proxy_request_duration_seconds",
            "Time from the request head to the end of the response",
            labels=extra,
        )
        groups = {p: [p] for p in self.buckets} if label else {"": list(self.buckets)}
        for name, protocols in sorted(groups.items()):
            cumulative, running = [], 0
            for i, le in enumerate((*map(str, BUCKETS), "+Inf")):
                running += sum(self.buckets[p][i] for p in protocols)
                cumulative.append((le, running))
            total = sum(self.sums[p] for p in protocols)
            hist.add_metric([name] if label else [], cumulative, sum_value=total)
        yield hist


class Metrics:
    """Every metric the proxy exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._stats = _RequestStats()
        r.register(self._stats)
        self.handshakes = Counter(
            "mtls_proxy_handshakes",
            "TLS handshakes on the listener",
            ["result", "reason"],
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
        self.resumed = Counter(
            "mtls_proxy_tls_sessions_resumed",
            "Successful handshakes that resumed a TLS session (a ticket or session id)",
            registry=r,
        )
        self.session_cache = Gauge(
            "mtls_proxy_tls_session_cache_sessions",
            "TLS sessions held for resumption (--tls-sessions cache)",
            registry=r,
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
        self.connections_cut = Counter(
            "mtls_proxy_connections_cut",
            "Open connections closed because reloaded trust (CA bundle, CRL) refuses the client",
            ["reason"],
            registry=r,
        )
        self.headers_dropped = Counter(
            "mtls_proxy_request_headers_dropped",
            "Client header fields not forwarded because their name holds '_' "
            "(reason: lookalike of a protected name, or underscore under --underscore-headers)",
            ["reason"],
            registry=r,
        )
        self._h2_collectors(r)
        self._handshake_ok = self.handshakes.labels(result="ok", reason="")
        self._start_series()
        build = Gauge("mtls_proxy_build_info", "Build information", ["version"], registry=r)
        build.labels(version=__version__).set(1)

    def _h2_collectors(self, r: CollectorRegistry) -> None:
        """HTTP/2's counters: resets and GOAWAYs by reason (h2conn.py rule 5)."""
        self.h2_resets = Counter(
            "mtls_proxy_h2_stream_resets",
            "HTTP/2 client streams reset, by the client or by the proxy (the reset budget counts "
            "both: Rapid Reset, MadeYouReset)",
            ["by"],
            registry=r,
        )
        self.h2_goaways = Counter(
            "mtls_proxy_h2_goaways",
            "HTTP/2 client connections ended with GOAWAY, by reason",
            ["reason"],
            registry=r,
        )

    def _start_series(self) -> None:
        # Every label value of a bounded set exists from the start (at 0): an alert on a rate
        # needs the series to exist before the first failure.
        for reason in HANDSHAKE_REASONS:
            self.handshakes.labels(result="failed", reason=reason)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        for kind in ("connect", "timeout", "reset", "protocol"):
            self.upstream_errors.labels(kind=kind)
        for reason in ("lookalike", "underscore"):
            self.headers_dropped.labels(reason=reason)
        for by in ("client", "proxy"):
            self.h2_resets.labels(by=by)
        for reason in H2_GOAWAY_REASONS:
            self.h2_goaways.labels(reason=reason)

    def request(
        self, decision: str, status: int, duration: float | None = None, protocol: str = "http1"
    ) -> None:
        """Count one answered request (and its duration, when it had one)."""
        stats = self._stats
        key = (decision, status // 100, protocol)
        stats.counts[key] = stats.counts.get(key, 0) + 1
        if duration is not None:
            buckets = stats.buckets.get(protocol)
            if buckets is None:
                buckets = stats.buckets[protocol] = [0] * (len(BUCKETS) + 1)
                stats.sums[protocol] = 0.0
            buckets[bisect_left(BUCKETS, duration)] += 1
            stats.sums[protocol] += duration

    def label_protocol(self) -> None:
        """--http2 on: request metrics carry protocol="http1|h2"."""
        self._stats.protocol_label = True
        self._stats.buckets.setdefault("h2", [0] * (len(BUCKETS) + 1))
        self._stats.sums.setdefault("h2", 0.0)

    def handshake(self, result: str, reason: str = "") -> None:
        """Count one handshake outcome."""
        if result == "ok":
            self._handshake_ok.inc()
        else:
            self.handshakes.labels(result=result, reason=reason).inc()
