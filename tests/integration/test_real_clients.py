"""curl --cert and openssl s_client against the proxy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from tests.helpers import ALLOWED_URI, Pki, Upstream, curl, run_proxy


def test_curl_with_client_certificate(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        url = f"https://localhost:{p.port}/via-curl?x=1"
        ok = curl(tp, "good", url, "-H", "X-Client-Subject: CN=admin", "-d", "hello")
        denied = curl(tp, "other", url, "-o", "/dev/null", "-w", "%{http_code}")
        nocert = subprocess.run(
            ["curl", "-sS", "--cacert", tp.ca, url], capture_output=True, text=True, timeout=30
        )
    assert ok.returncode == 0, ok.stderr
    echo = json.loads(ok.stdout)
    assert echo["target"] == "/via-curl?x=1" and echo["body_len"] == 5
    assert ["x-client-subject", "CN=client-good,O=Example Corp"] in echo["headers"]
    assert denied.stdout == "403"
    assert nocert.returncode != 0  # curl reports the failed handshake / reset


def test_openssl_s_client(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        req = b"GET /s_client HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{p.port}",
                "-servername",
                "localhost",
                "-CAfile",
                tp.ca,
                "-cert",
                tp.crt("good"),
                # -cert loads only the leaf; -cert_chain sends the intermediate
                "-cert_chain",
                tp.crt("good"),
                "-key",
                tp.key("good"),
                "-quiet",
                "-verify_return_error",
            ],
            input=req,
            capture_output=True,
            timeout=30,
        )
        bad = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{p.port}",
                "-servername",
                "localhost",
                "-CAfile",
                tp.ca,
                "-cert",
                tp.crt("rogue"),
                "-cert_chain",
                tp.crt("rogue"),
                "-key",
                tp.key("rogue"),
                "-quiet",
            ],
            input=req,
            capture_output=True,
            timeout=30,
        )
        tls11 = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{p.port}", "-tls1_1", "-CAfile", tp.ca],
            input=b"",
            capture_output=True,
            timeout=30,
        )
    assert out.stdout.startswith(b"HTTP/1.1 200"), out.stderr
    assert b'"target": "/s_client"' in out.stdout
    assert b"HTTP/1.1" not in bad.stdout
    assert tls11.returncode != 0  # TLS 1.1 is never accepted


def test_min_tls_version_13_refuses_tls12(tp: Pki, upstream: Upstream) -> None:
    from tests.helpers import client_ctx, get, handshake_rejected

    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--min-tls-version", "1.3") as p:
        assert get(p.port, client_ctx(tp, "good", tls13=True))[0] == 200
        handshake_rejected(p.port, client_ctx(tp, "good", tls13=False))
    assert len(upstream.seen) == 1


def test_text_log_format(tp: Pki, upstream: Upstream) -> None:
    from tests.helpers import client_ctx, get

    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--log-format", "json") as p:
        assert get(p.port, client_ctx(tp, "good"))[0] == 200
    access = [r for r in p.records() if r.get("msg") == "access"]
    assert access and access[0]["status"] == 200 and access[0]["decision"] == "allow"
    assert access[0]["peer"] == "CN=client-good,O=Example Corp" and access[0]["path"] == "/"
    rec = access[0]
    # The fixed keys of every access record (issue 5): who, what, how it went, how much.
    assert rec["peer_sha256"] == hashlib.sha256(tp.der("good")).hexdigest()
    assert rec["spiffe_id"] == "spiffe://test.local/ns/default/sa/client"
    assert rec["client"] == "127.0.0.1" and rec["method"] == "GET"
    assert rec["upstream_status"] == 200 and rec["rule"] == f"uri={ALLOWED_URI}"
    assert rec["bytes_in"] == 0 and int(str(rec["bytes_out"])) > 100  # the upstream's JSON echo
    assert float(str(rec["duration_ms"])) > 0 and str(rec["time"]).endswith("Z")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtls_proxy",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--upstream",
            f"http://127.0.0.1:{upstream.port}",
            *tp.material(),
            "--allow-all",
            "--log-format",
            "text",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = next(x for x in proc.stderr if "ready" in x)
    finally:
        proc.terminate()
        proc.wait(10)
    assert " INFO mtls_proxy.server: ready" in line and not line.startswith("{")
