"""What is written once an exchange is over: its request metric, its access record and, with
``--otlp-endpoint``, its span (telemetry/tracing.py).

Rules:
1. One of each per exchange that was answered or started (exchange.py rule 1).
2. The span is ended before the access record is written, so that the record's ``trace_id`` is
   the span's also for a request refused before its span could start.
3. The query string is neither logged nor traced: it may carry secrets.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from mtls_proxy.telemetry.tracing import request_attributes

if TYPE_CHECKING:
    from mtls_proxy.core.tracecontext import TraceParent
    from mtls_proxy.dataplane.admission import Peer
    from mtls_proxy.dataplane.plane import DataPlane


class _Down(Protocol):
    admitted: Peer
    log_fields: str

    @property
    def protocol(self) -> str: ...


class Recorded(Protocol):
    """What a record reads of an exchange (exchange.Exchange)."""

    plane: DataPlane
    method: bytes
    path: bytes
    status: int
    upstream_status: int
    decision: str
    rule: str | None
    reason: str | None
    bytes_in: int
    bytes_out: int
    request_id: bytes
    upstream_ms: float | None
    start: float
    trace: TraceParent | None
    span: object

    @property
    def down(self) -> _Down: ...

    def grpc_status(self) -> int | None: ...


def write_record(ex: Recorded, aborted: bool) -> None:
    """Count, trace and log *ex* (rules 1-3)."""
    plane = ex.plane
    duration = time.monotonic() - ex.start
    protocol = ex.down.protocol
    plane.metrics.request(ex.decision, ex.status, duration, protocol)
    trace_id = None if ex.trace is None else ex.trace.trace_id.decode()
    tracing = plane.tracing
    access_log = plane.access_log
    if tracing is None and access_log is None:
        return
    path = ex.path
    q = path.find(b"?")  # rule 3
    method, path_text = ex.method.decode("latin-1"), (path if q < 0 else path[:q]).decode("latin-1")
    request_id = ex.request_id.decode()
    if tracing is not None:
        attrs = request_attributes(
            method, path_text, ex.status, protocol, ex.decision, ex.rule, ex.reason, request_id,
            aborted,
        )  # fmt: skip
        span, ex.span = ex.span, None
        trace_id = tracing.end(span, ex.down.admitted.span_attrs, attrs, ex.status, duration)
    if access_log is not None:
        access_log.request(
            ex.down.log_fields,
            method,
            path_text,
            ex.status,
            ex.upstream_status,
            ex.decision,
            ex.rule,
            int(duration * 1e6) / 1000,  # ms, 3 decimals: a third of round()'s cost
            ex.bytes_in,
            ex.bytes_out,
            aborted,
            ex.reason,
            request_id,
            ex.upstream_ms,
            protocol if plane.cfg.http2 == "on" else None,
            ex.grpc_status(),
            trace_id,
        )
