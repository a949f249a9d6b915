"""SIGTERM drain, admin endpoints, optional client auth, config file + env precedence."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Upstream,
    client_ctx,
    connect,
    get,
    read_response,
    run_proxy,
)


def test_sigterm_drains_in_flight_request_and_refuses_new_ones(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--shutdown-grace", "10", loop=loop
    ) as p:
        assert p.admin_get("/readyz")[0] == 200
        result: dict[str, object] = {}

        def slow() -> None:
            with connect(p.port, client_ctx(tp, "good")) as s:
                s.sendall(b"GET /slow?s=2 HTTP/1.1\r\nHost: a\r\n\r\n")
                result["status"] = read_response(s, bytearray())[0]

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)  # the slow request is in flight
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert p.admin_get("/readyz")[0] == 503
        assert json.loads(p.admin_get("/status")[1])["draining"] is True
        refused = False
        try:
            socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
        except ConnectionRefusedError:
            refused = True
        assert refused
        rc = p.proc.wait(12)
        took = time.monotonic() - t0
        t.join(5)
    assert result["status"] == 200
    assert rc == 0
    assert took < 10


def test_sigterm_exits_within_grace_even_with_a_stuck_request(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--shutdown-grace", "1") as p:
        s = connect(p.port, client_ctx(tp, "good"))
        s.sendall(b"GET /slow?s=8 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        rc = p.proc.wait(8)
        assert rc == 0 and time.monotonic() - t0 < 3
        s.close()


def test_admin_endpoints(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        assert get(p.port, client_ctx(tp, "good"))[0] == 200
        assert p.admin_get("/healthz")[0] == 200
        assert p.admin_get("/readyz")[0] == 200
        status = json.loads(p.admin_get("/status")[1])
        code, metrics = p.admin_get("/metrics")
    assert status["version"] and status["upstream"] == f"http://127.0.0.1:{upstream.port}"
    assert status["server_cert"]["subject"] == "CN=localhost"
    assert len(status["server_cert"]["sha256"]) == 64
    assert status["server_cert"]["not_after"].endswith("Z")
    assert status["trusted_cas"] == 1 and status["last_reload"] is None
    assert status["draining"] is False and status["connections_open"] == 0
    assert code == 200
    assert 'mtls_proxy_requests_total{code="2xx",decision="allow"} 1.0' in metrics
    assert 'mtls_proxy_handshakes_total{reason="",result="ok"} 1.0' in metrics
    assert "mtls_proxy_request_duration_seconds_bucket" in metrics
    assert 'mtls_proxy_cert_not_after_timestamp_seconds{cert="server"}' in metrics
    assert "mtls_proxy_build_info{version=" in metrics


def test_healthz_does_not_depend_on_the_upstream(tp: Pki) -> None:
    with run_proxy(tp, "http://127.0.0.1:1") as p:
        assert p.admin_get("/healthz")[0] == 200
        assert p.admin_get("/readyz")[0] == 200


def test_optional_mode_without_cert_is_401(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--client-auth", "want", loop=loop
    ) as p:
        status, _, body = get(p.port, client_ctx(tp, None))
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
        assert get(p.port, client_ctx(tp, "good"))[0] == 200
        # A presented but untrusted certificate still fails the handshake in optional mode.
        from tests.helpers import handshake_rejected

        handshake_rejected(p.port, client_ctx(tp, "rogue"))
    assert len(upstream.seen) == 1


def test_optional_mode_with_anonymous_access(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--client-auth",
        "optional",
        "--allow-anonymous",
        "--allow-uri",
        ALLOWED_URI,
    ) as p:
        assert get(p.port, client_ctx(tp, None), headers="X-Client-Subject: CN=spoof\r\n")[0] == 200
        assert get(p.port, client_ctx(tp, "good"))[0] == 200
        assert get(p.port, client_ctx(tp, "other"))[0] == 403
    anon, good = upstream.seen
    assert anon.one("x-client-verified") == "NONE"
    assert anon.get("x-client-subject") == [] and anon.get("x-forwarded-client-cert") == []
    assert good.one("x-client-verified") == "SUCCESS"


def test_config_file_env_and_flags_precedence(tp: Pki, upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("""
upstream: http://127.0.0.1:1
identity_headers: [simple]
policy:
  allow:
    - uri: spiffe://test.local/ns/default/sa/other
""")
    # file says upstream :1 (down) and allows only 'other'; env fixes the upstream; the flag
    # replaces the file's rules.
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--config", str(cfg), default_policy=False
    ) as p:
        # --upstream flag (from run_proxy) wins over the file.
        assert get(p.port, client_ctx(tp, "other"))[0] == 200
        assert get(p.port, client_ctx(tp, "good"))[0] == 403
    assert upstream.seen[0].get("x-forwarded-client-cert") == []  # file: simple only
    env = {"MTLS_PROXY_ALLOW_URI": ALLOWED_URI, "MTLS_PROXY_IDENTITY_HEADERS": "xfcc"}
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--config", str(cfg), default_policy=False, env=env
    ) as p:
        assert get(p.port, client_ctx(tp, "good"))[0] == 200  # env rules beat the file's
        assert get(p.port, client_ctx(tp, "other"))[0] == 403
    assert upstream.seen[-1].get("x-client-subject") == []  # env: xfcc only
    assert len(upstream.seen[-1].get("x-forwarded-client-cert")) == 1


def test_unix_socket_upstream(tp: Pki, tmp_path: Path) -> None:
    import http.server
    import socketserver

    path = str(tmp_path / "up.sock")

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = self.headers.get("X-Client-Subject", "").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    srv = S(path, H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with run_proxy(tp, f"unix:{path}") as p:
            status, _, body = get(p.port, client_ctx(tp, "good"))
    finally:
        srv.shutdown()
        srv.server_close()
    assert status == 200 and body == b"CN=client-good,O=Example Corp"


def test_https_upstream_is_verified(tp: Pki, tmp_path: Path) -> None:
    import http.server
    import ssl as _ssl

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b"over tls"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tp.crt("server"), tp.key("server"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        with run_proxy(tp, f"https://localhost:{port}", "--upstream-cacert", tp.ca) as p:
            status, _, body = get(p.port, client_ctx(tp, "good"))
            assert (status, body) == (200, b"over tls")
        # Without our CA the upstream's certificate is not trusted: 502, never unverified.
        with run_proxy(tp, f"https://localhost:{port}") as p:
            assert get(p.port, client_ctx(tp, "good"))[0] == 502
    finally:
        srv.shutdown()
        srv.server_close()
