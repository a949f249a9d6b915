"""Traces end to end: the real proxy, real mTLS clients, the recording upstream, and for spans a
small OTLP/HTTP receiver in the test (POST /v1/traces, decoded with opentelemetry-proto's
ExportTraceServiceRequest).

What is checked: the traceparent the upstream saw (forwarded, created, dropped, or naming the
proxy's span as its parent), the span's attributes (the client's identity, the decision, the
rule), that its trace-id is the upstream's and the access record's."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ALLOWED_URI, Pki, Proxy, Upstream, client_ctx, get, run_proxy

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TID}-{PID}-01"


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: every span it was sent, decoded."""

    port: int = 0
    spans: list[dict[str, object]] = field(default_factory=list)
    posts: list[str] = field(default_factory=list)  # path and content type of each POST

    def wait(self, n: int, timeout: float = 10) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < n:
            assert time.monotonic() < deadline, (len(self.spans), self.posts)
            time.sleep(0.05)
        return self.spans


def _decode(body: bytes) -> list[dict[str, object]]:
    """The spans of one ExportTraceServiceRequest, each as a dict of what the tests read."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for sp in ss.spans:
                attrs: dict[str, object] = {}
                for a in sp.attributes:
                    v = a.value
                    attrs[a.key] = getattr(v, v.WhichOneof("value"))
                out.append(
                    {
                        "name": sp.name,
                        "kind": sp.kind,
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_span_id": sp.parent_span_id.hex(),
                        "status": sp.status.code,
                        "attrs": attrs,
                        "resource": resource,
                        "scope": ss.scope.name,
                        "duration_ns": sp.end_time_unix_nano - sp.start_time_unix_nano,
                    }
                )
    return out


@contextlib.contextmanager
def run_receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            rec.posts.append(f"{self.path} {self.headers.get('Content-Type')}")
            if self.path == "/v1/traces":
                rec.spans.extend(_decode(body))
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def _access(p: Proxy, n: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while len(recs := [r for r in p.records() if r.get("msg") == "access"]) < n:
        assert time.monotonic() < deadline, p.logs
        time.sleep(0.02)
    return recs


def _sha256(tp: Pki, name: str) -> str:
    return hashlib.sha256(tp.der(name)).hexdigest()


# -- the trace context, without spans ------------------------------------------------------------
def test_forward_passes_a_valid_traceparent_and_drops_an_invalid_one(
    tp: Pki, upstream: Upstream
) -> None:
    ctx = client_ctx(tp, "good")
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        st = f"traceparent: {TRACEPARENT}\r\ntracestate: congo=t61rcWkgMzE\r\ntracestate: b=1\r\n"
        assert get(p.port, ctx, "/a", st)[0] == 200
        assert (
            get(p.port, ctx, "/b", f"traceparent: {TRACEPARENT.upper()}\r\ntracestate: x=1\r\n")[0]
            == 200
        )
        assert (
            get(p.port, ctx, "/c", f"traceparent: {TRACEPARENT}\r\ntraceparent: {TRACEPARENT}\r\n")[
                0
            ]
            == 200
        )
        assert get(p.port, ctx, "/d")[0] == 200
        recs = _access(p, 4)
    a, b, c, d = upstream.seen
    assert a.get("traceparent") == [TRACEPARENT]
    assert a.get("tracestate") == ["congo=t61rcWkgMzE,b=1"]
    for seen in (b, c, d):
        assert seen.get("traceparent") == [] and seen.get("tracestate") == [], seen.headers
    assert [r["trace_id"] for r in recs] == [TID, None, None, None]


def test_create_makes_one_when_none_came_and_off_drops_them(tp: Pki, upstream: Upstream) -> None:
    ctx = client_ctx(tp, "good")
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--trace-context", "create") as p:
        assert get(p.port, ctx, "/new")[0] == 200
        assert get(p.port, ctx, "/kept", f"traceparent: {TRACEPARENT}\r\n")[0] == 200
        created, kept = _access(p, 2)
    made = upstream.seen[0].one("traceparent")
    version, trace_id, parent_id, flags = made.split("-")
    assert (version, flags, len(trace_id), len(parent_id)) == ("00", "00", 32, 16)
    assert int(trace_id, 16) and int(parent_id, 16)
    assert created["trace_id"] == trace_id
    assert upstream.seen[1].one("traceparent") == TRACEPARENT and kept["trace_id"] == TID
    env = {"MTLS_PROXY_TRACE_CONTEXT": "off"}
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", env=env) as p:
        assert (
            get(p.port, ctx, "/off", f"traceparent: {TRACEPARENT}\r\ntracestate: a=1\r\n")[0] == 200
        )
        (off,) = _access(p, 1)
    assert upstream.seen[2].get("traceparent") == upstream.seen[2].get("tracestate") == []
    assert off["trace_id"] is None


# -- spans ---------------------------------------------------------------------------------------
def _has_otel() -> bool:
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


needs_otel = pytest.mark.skipif(not _has_otel(), reason="needs the otel extra (.[dev] has it)")
SPAN_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # export within 50 ms, not 5 s


@needs_otel
def test_one_server_span_per_request_with_the_client_identity(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_receiver() as rcv:
        endpoint = f"http://127.0.0.1:{rcv.port}"
        with run_proxy(
            tp, f"http://127.0.0.1:{upstream.port}", "--otlp-endpoint", endpoint, loop=loop,
            env=SPAN_ENV,
        ) as p:  # fmt: skip
            st = f"traceparent: {TRACEPARENT}\r\ntracestate: congo=t61rcWkgMzE\r\n"
            assert get(p.port, client_ctx(tp, "good"), "/orders?secret=1", st)[0] == 200
            assert get(p.port, client_ctx(tp, "good"), "/fresh")[0] == 200
            assert get(p.port, client_ctx(tp, "other"), "/nope", st)[0] == 403
            recs = _access(p, 3)
            spans = rcv.wait(3)
    assert set(rcv.posts) == {"/v1/traces application/x-protobuf"}
    by_path = {s["attrs"]["url.path"]: s for s in spans}  # type: ignore[index]
    child, root, denied = by_path["/orders"], by_path["/fresh"], by_path["/nope"]

    # The client's trace continues through the proxy: the span is the client's context's
    # child, and the upstream's traceparent names the span as its parent.
    assert child["trace_id"] == TID and child["parent_span_id"] == PID
    first, second = upstream.seen
    assert first.one("traceparent") == f"00-{TID}-{child['span_id']}-01"
    assert first.one("tracestate") == "congo=t61rcWkgMzE"
    # No traceparent from the client: the span starts the trace, and the upstream joins it.
    assert root["parent_span_id"] == "" and root["trace_id"] != TID
    assert second.one("traceparent") == f"00-{root['trace_id']}-{root['span_id']}-01"
    assert [r["trace_id"] for r in recs] == [TID, root["trace_id"], TID]

    a = child["attrs"]
    assert isinstance(a, dict)
    assert (child["name"], child["kind"], child["scope"]) == ("GET", 2, "mtls_proxy")  # SERVER
    assert a["http.request.method"] == "GET" and a["http.response.status_code"] == 200
    assert a["url.path"] == "/orders" and a["url.scheme"] == "https"  # no query
    assert a["client.address"] == "127.0.0.1" and isinstance(a["client.port"], int)
    assert a["network.protocol.version"] == "1.1" and a["tls.protocol.name"] == "tls"
    assert a["tls.client.hash.sha256"] == _sha256(tp, "good").upper()
    assert a["tls.client.subject"] == recs[0]["peer"]
    assert a["tls.client.server_name"] == "localhost"
    assert a["mtls_proxy.client.spiffe_id"] == ALLOWED_URI
    assert a["mtls_proxy.decision"] == "allow" and a["mtls_proxy.rule"] == recs[0]["rule"]
    assert a["mtls_proxy.request_id"] == recs[0]["request_id"]
    assert child["resource"]["service.name"] == "mtls-proxy"  # type: ignore[index]

    d = denied["attrs"]
    assert isinstance(d, dict)
    assert d["mtls_proxy.decision"] == "deny" and d["http.response.status_code"] == 403
    assert d["mtls_proxy.reason"] == recs[2]["reason"] and "mtls_proxy.rule" not in d
    assert d["tls.client.hash.sha256"] == _sha256(tp, "other").upper()
    assert d["mtls_proxy.client.spiffe_id"] == "spiffe://test.local/ns/default/sa/other"
    assert denied["status"] == 0  # a 4xx is the client's error, not the server span's
    assert denied["trace_id"] == TID and denied["parent_span_id"] == PID


@needs_otel
def test_spans_over_http2_and_for_a_refused_head(tp: Pki, upstream: Upstream) -> None:
    with run_receiver() as rcv:
        url = f"http://127.0.0.1:{rcv.port}/v1/traces"
        with run_proxy(
            tp, f"http://127.0.0.1:{upstream.port}", "--otlp-endpoint", url, "--http2", "on",
            env=SPAN_ENV,
        ) as p:  # fmt: skip
            out = subprocess.run(
                [
                    "curl", "-sS", "--http2", "--cacert", tp.ca, "--cert", tp.crt("good"),
                    "--key", tp.key("good"), "-H", f"traceparent: {TRACEPARENT}",
                    "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                    f"https://localhost:{p.port}/h2",
                ],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert out.stdout == "200 2", out.stderr
            bad = get(
                p.port, client_ctx(tp, "good"), "/x", "Content-Length: 1\r\nContent-Length: 2\r\n"
            )
            assert bad[0] == 400
            recs = _access(p, 2)
            spans = rcv.wait(2)
    h2 = next(s for s in spans if s["attrs"].get("url.path") == "/h2")  # type: ignore[attr-defined]
    assert h2["attrs"]["network.protocol.version"] == "2"  # type: ignore[index]
    assert upstream.seen[0].one("traceparent") == f"00-{TID}-{h2['span_id']}-01"
    refused = next(s for s in spans if s is not h2)
    assert refused["attrs"]["http.response.status_code"] == 400  # type: ignore[index]
    assert refused["trace_id"] == recs[1]["trace_id"] and refused["parent_span_id"] == ""
    assert int(str(refused["duration_ns"])) >= 0


def test_without_the_extra_the_proxy_refuses_to_start(tp: Pki, tmp_path: Path) -> None:
    """--otlp-endpoint without opentelemetry installed: exit 2 naming the extra (a sitecustomize
    makes the import fail, as in an install without [otel])."""
    site = tmp_path
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.modules['opentelemetry.sdk'] = None\n"
        "sys.modules['opentelemetry.exporter'] = None\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "mtls_proxy", "check", *tp.material(), "--upstream",
         "http://127.0.0.1:9", "--allow-all", "--otlp-endpoint", "http://127.0.0.1:4318"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(site)},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "pip install 'mtls-proxy[otel]'" in r.stderr
