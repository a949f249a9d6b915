"""OpenTelemetry spans: one SERVER span per request, exported over OTLP/HTTP (``--otlp-endpoint``).

Rules:
1. opentelemetry is imported here only, and only when a `Tracing` is made: with tracing off,
   nothing of it is loaded, and a request pays for the traceparent check alone
   (core/tracecontext.py). It is the optional extra ``mtls-proxy[otel]``; asked for without
   it, the proxy refuses to start (exit 2).
2. The span starts when the request head is valid (`start`, the ChildFactory prepare calls), so
   the traceparent the upstream gets carries the span's id as its parent-id; a request refused
   before that gets its span when it is recorded, started at the request's start.
3. Attributes use OpenTelemetry's semantic-convention names where they exist (HTTP server,
   client, TLS), ``mtls_proxy.*`` for the rest (the SPIFFE ID, the decision, the rule). The
   connection's are computed once per connection (`connection_attributes`).
4. The SDK's BatchSpanProcessor exports from its own thread: the event loop never waits on the
   collector, and a collector that is down costs spans (the queue is bounded), never requests.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Final

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.tracecontext import TraceParent, child

if TYPE_CHECKING:
    from mtls_proxy.core.identity import PeerIdentity

Attributes = dict[str, str | int | bool]
# RFC 9110's methods: any other is "_OTHER", with the original beside it (HTTP semconv).
_KNOWN_METHODS: Final = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
_PROTOCOL_VERSION: Final = {"http1": "1.1", "h2": "2"}


def require_otel() -> None:
    """ConfigError (exit 2) when the otel extra is not installed (rule 1): said by `check`
    and before any worker starts."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            [
                "--otlp-endpoint needs the otel extra: pip install 'mtls-proxy[otel]' "
                f"({exc.name or exc} is missing)"
            ]
        ) from None


def created(parent: TraceParent | None) -> tuple[TraceParent | None, object]:
    """``--trace-context create`` without spans: a client's valid context goes on as it came;
    without one, a new trace starts here. Its sampled flag is 0: the proxy recorded nothing
    (W3C: set only when the caller may have recorded trace data)."""
    if parent is not None:
        return None, None
    ids = os.urandom(24).hex().encode()  # all zero once in 2**128: not worth a check
    return child(ids[:32], ids[32:], False), None


def connection_attributes(
    identity: PeerIdentity | None,
    client: str,
    client_port: int | None,
    tls_version: str | None,
    cipher: str | None,
    sni: str | None,
) -> Attributes:
    """The span attributes every request of one connection shares (rule 3)."""
    attrs: Attributes = {"client.address": client, "url.scheme": "https"}
    if client_port is not None:
        attrs["client.port"] = client_port
    if tls_version is not None:
        attrs["tls.protocol.name"] = "tls"
        attrs["tls.protocol.version"] = tls_version.removeprefix("TLSv")
    if cipher is not None:
        attrs["tls.cipher"] = cipher
    if sni is not None:
        attrs["tls.client.server_name"] = sni
    if identity is not None:
        attrs["tls.client.subject"] = identity.subject
        attrs["tls.client.hash.sha256"] = identity.sha256.upper()  # the convention's case
        if identity.not_after is not None:
            attrs["tls.client.not_after"] = identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        if identity.spiffe_id is not None:
            attrs["mtls_proxy.client.spiffe_id"] = identity.spiffe_id
    return attrs


class Tracing:
    """The tracer provider of one process and the spans of its requests."""

    def __init__(self, endpoint: str, timeout: float = 5.0, exporter: object = None) -> None:
        """Spans to *endpoint* over OTLP/HTTP, or to *exporter* (a SpanExporter) if given."""
        require_otel()
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from mtls_proxy import __version__

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name, and the
        # sampler is the SDK's (OTEL_TRACES_SAMPLER; by default the parent's decision, else on).
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "mtls-proxy"}))
        self.provider = TracerProvider(resource=resource)
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[arg-type]
        self._tracer = self.provider.get_tracer("mtls_proxy", __version__)
        self._trace = trace
        self._kind = trace.SpanKind.SERVER

    def start(self, parent: TraceParent | None) -> tuple[TraceParent, object]:
        """Start the request's span, a child of the client's context if it sent a valid one
        (rule 2); its context is what the upstream gets."""
        t = self._trace
        ctx = None
        if parent is not None:
            remote = t.SpanContext(
                int(parent.trace_id, 16),
                int(parent.parent_id, 16),
                is_remote=True,
                trace_flags=t.TraceFlags(int(parent.flags, 16) & 1),
            )
            ctx = t.set_span_in_context(t.NonRecordingSpan(remote))
        span = self._tracer.start_span("HTTP", context=ctx, kind=self._kind)
        sc = span.get_span_context()
        ours = child(b"%032x" % sc.trace_id, b"%016x" % sc.span_id, sc.trace_flags.sampled)
        return ours, span

    def end(
        self,
        span: Any,
        conn: Attributes | None,
        request: Attributes,
        status: int,
        duration: float,
    ) -> str:
        """End a request's span (started now, at the request's start, if it has none: rule 2)
        with its attributes; the trace-id, for the access record."""
        if span is None:
            started = time.time_ns() - int(duration * 1e9)
            span = self._tracer.start_span("HTTP", kind=self._kind, start_time=started)
        if span.is_recording():  # a span the sampler dropped records nothing
            method = str(request.get("http.request.method", "-"))
            if method not in _KNOWN_METHODS:
                request["http.request.method_original"] = method
                request["http.request.method"] = method = "_OTHER"
            span.update_name("HTTP" if method == "_OTHER" else method)
            if conn:
                span.set_attributes(conn)
            span.set_attributes(request)
            if status >= 500:  # server spans: 4xx is the client's error, not the span's
                span.set_attribute("error.type", str(status))
                span.set_status(self._trace.StatusCode.ERROR)
        span.end()
        return f"{span.get_span_context().trace_id:032x}"

    def shutdown(self) -> None:
        """Export what is queued (one export, within the exporter's timeout) and stop the
        exporter's thread."""
        self.provider.shutdown()


def request_attributes(
    method: str,
    path: str,
    status: int,
    protocol: str,
    decision: str,
    rule: str | None,
    reason: str | None,
    request_id: str,
    aborted: bool,
) -> Attributes:
    """The span attributes of one request (rule 3); *path* without its query."""
    attrs: Attributes = {
        "http.request.method": method,
        "url.path": path,
        "network.protocol.name": "http",
        "network.protocol.version": _PROTOCOL_VERSION.get(protocol, protocol),
        "mtls_proxy.decision": decision,
        "mtls_proxy.request_id": request_id,
    }
    if status:
        attrs["http.response.status_code"] = status
    if rule is not None:
        attrs["mtls_proxy.rule"] = rule
    if reason is not None:
        attrs["mtls_proxy.reason"] = reason
    if aborted:
        attrs["mtls_proxy.aborted"] = True
    return attrs
