"""telemetry/tracing.py with the SDK's in-memory exporter: the spans' names, parents,
attributes and status; the contexts --trace-context create makes; the lazy import."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import PeerIdentity
from mtls_proxy.core.tracecontext import parse
from mtls_proxy.telemetry import tracing
from mtls_proxy.telemetry.tracing import (
    connection_attributes,
    created,
    request_attributes,
    require_otel,
)

W3C = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
PEER = PeerIdentity(
    subject="CN=a,O=Example",
    uri=("urn:x", "spiffe://td/ns/a/sa/b"),
    sha256="ab" * 32,
    not_after=dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
)


def test_created_keeps_a_client_context_and_starts_an_unsampled_trace_without_one() -> None:
    assert created(parse(W3C)) == (None, None)
    new, handle = created(None)
    assert handle is None and new is not None and parse(new.value) == new
    assert new.flags == b"00" and new.value.startswith(b"00-")
    other, _ = created(None)
    assert other is not None and other.trace_id != new.trace_id


def test_connection_attributes_by_the_semantic_conventions() -> None:
    a = connection_attributes(PEER, "10.0.0.7", 5555, "TLSv1.3", "TLS_AES_128_GCM_SHA256", "svc")
    assert a == {
        "client.address": "10.0.0.7",
        "client.port": 5555,
        "url.scheme": "https",
        "tls.protocol.name": "tls",
        "tls.protocol.version": "1.3",
        "tls.cipher": "TLS_AES_128_GCM_SHA256",
        "tls.client.server_name": "svc",
        "tls.client.subject": "CN=a,O=Example",
        "tls.client.hash.sha256": "AB" * 32,
        "tls.client.not_after": "2030-01-02T03:04:05Z",
        "mtls_proxy.client.spiffe_id": "spiffe://td/ns/a/sa/b",
    }
    bare = connection_attributes(PeerIdentity(subject="CN=b"), "unix", None, None, None, None)
    assert bare == {
        "client.address": "unix",
        "url.scheme": "https",
        "tls.client.subject": "CN=b",
        "tls.client.hash.sha256": "",
    }
    assert connection_attributes(None, "1.2.3.4", 1, None, None, None) == {
        "client.address": "1.2.3.4",
        "client.port": 1,
        "url.scheme": "https",
    }


def test_request_attributes() -> None:
    a = request_attributes("GET", "/x", 200, "h2", "allow", "r1", None, "rid", False)
    assert a == {
        "http.request.method": "GET",
        "url.path": "/x",
        "network.protocol.name": "http",
        "network.protocol.version": "2",
        "mtls_proxy.decision": "allow",
        "mtls_proxy.request_id": "rid",
        "http.response.status_code": 200,
        "mtls_proxy.rule": "r1",
    }
    b = request_attributes("-", "", 0, "http1", "deny", None, "why", "rid", True)
    assert "http.response.status_code" not in b and b["mtls_proxy.reason"] == "why"
    assert b["mtls_proxy.aborted"] is True and b["network.protocol.version"] == "1.1"


# -- spans, with the SDK ---------------------------------------------------------------------------
otel = pytest.importorskip("opentelemetry.sdk.trace")


@pytest.fixture
def traced() -> Iterator[tuple[tracing.Tracing, object]]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    t = tracing.Tracing("http://unused.invalid/v1/traces", exporter=memory)
    yield t, memory
    t.shutdown()


def _finished(t: tracing.Tracing, memory: object) -> list[object]:
    t.provider.force_flush()
    return list(memory.get_finished_spans())  # type: ignore[attr-defined]


def test_a_span_continues_the_client_trace_and_names_itself_in_the_traceparent(
    traced: tuple[tracing.Tracing, object],
) -> None:
    t, memory = traced
    parent = parse(W3C)
    ours, span = t.start(parent)
    assert parent is not None and ours.trace_id == parent.trace_id and ours.sampled
    attrs = request_attributes("POST", "/o", 201, "http1", "allow", "r", None, "id", False)
    trace_id = t.end(span, {"client.address": "1.2.3.4"}, attrs, 201, 0.01)
    (s,) = _finished(t, memory)
    ctx = s.get_span_context()  # type: ignore[attr-defined]
    assert trace_id == f"{ctx.trace_id:032x}" == parent.trace_id.decode()
    assert f"{ctx.span_id:016x}".encode() == ours.parent_id
    assert f"{s.parent.span_id:016x}".encode() == parent.parent_id  # type: ignore[attr-defined]
    assert s.name == "POST" and s.kind == otel.trace_api.SpanKind.SERVER  # type: ignore[attr-defined]
    assert s.attributes["client.address"] == "1.2.3.4"  # type: ignore[attr-defined]
    assert s.attributes["http.response.status_code"] == 201  # type: ignore[attr-defined]
    assert s.resource.attributes["service.name"] == "mtls-proxy"  # type: ignore[attr-defined]


def test_an_unknown_method_a_5xx_and_a_span_made_at_the_end(
    traced: tuple[tracing.Tracing, object],
) -> None:
    t, memory = traced
    attrs = request_attributes("PURGE", "/", 502, "http1", "allow", None, None, "id", False)
    trace_id = t.end(None, None, attrs, 502, 0.5)  # refused before a span could start
    (s,) = _finished(t, memory)
    assert s.name == "HTTP" and s.parent is None  # type: ignore[attr-defined]
    a = s.attributes  # type: ignore[attr-defined]
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "PURGE"
    assert a["error.type"] == "502"
    assert s.status.status_code == otel.StatusCode.ERROR  # type: ignore[attr-defined]
    assert s.end_time - s.start_time >= 0.5e9 - 1e7  # type: ignore[attr-defined]
    assert trace_id == f"{s.get_span_context().trace_id:032x}"  # type: ignore[attr-defined]


def test_a_client_that_did_not_sample_gets_no_recorded_span_but_a_context(
    traced: tuple[tracing.Tracing, object],
) -> None:
    t, memory = traced
    parent = parse(W3C[:-2] + b"00")
    ours, span = t.start(parent)
    assert parent is not None and ours.trace_id == parent.trace_id and not ours.sampled
    assert ours.parent_id != parent.parent_id
    attrs = request_attributes("GET", "/", 200, "http1", "allow", None, None, "id", False)
    assert t.end(span, None, attrs, 200, 0.0) == parent.trace_id.decode()
    assert _finished(t, memory) == []


def test_without_the_extra_require_otel_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError) as exc:
        require_otel()
    assert "pip install 'mtls-proxy[otel]'" in str(exc.value.problems)
    with pytest.raises(ConfigError):
        tracing.Tracing("http://127.0.0.1:4318/v1/traces")


def test_tracing_off_imports_no_opentelemetry() -> None:
    """Rule 1: the data plane and the CLI load without it (a fresh interpreter)."""
    code = (
        "import sys, mtls_proxy.cli.main, mtls_proxy.dataplane.connection, "
        "mtls_proxy.dataplane.h2conn, mtls_proxy.server.listener; "
        "print([m for m in sys.modules if m.startswith('opentelemetry')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
