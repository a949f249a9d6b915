"""Operations: policy files with routes and audit (and their reload), the kubelet's ``..data``
swap picked up by file watching alone, 20 reloads under streaming load, promtool, /status."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Upstream,
    ask,
    client_ctx,
    connect,
    get,
    proxy_cmd,
    read_response,
    request,
    run_proxy,
)
from tests.integration.test_reload import (
    kubelet_write,
    material_args,
    material_dir,
    secret_mount,
    served_subject,
    wait_reload,
)

POLICY = f"""
allow:
  - uri: {ALLOWED_URI}
routes:
  - path_prefix: /admin
    allow:
      - cn: client-other
  - path_prefix: /admin/reports
    methods: [GET]
    allow:
      - uri: {ALLOWED_URI}
"""


def test_policy_file_routes_methods_and_normalized_paths(
    tp: Pki, upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False, loop=loop) as p:
        good, other = client_ctx(tp, "good"), client_ctx(tp, "other")
        assert get(p.port, good, "/x")[0] == 200  # top-level allow
        assert get(p.port, other, "/x")[0] == 403
        assert get(p.port, good, "/admin")[0] == 403
        assert get(p.port, good, "/admin/users")[0] == 403
        assert get(p.port, other, "/admin/users")[0] == 200
        assert get(p.port, good, "/administrator")[0] == 200  # whole segments only
        assert get(p.port, good, "/admin/reports/q1")[0] == 200  # longer prefix, GET
        post = b"POST /admin/reports/q1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
        assert request(p.port, good, post)[0] == 403  # methods filter: /admin applies
        # What the upstream would read as /admin is decided as /admin, and forwarded so.
        for sneaky in ("/x/../admin", "//admin", "/%61dmin/users", "/admin;x=1", "/./admin"):
            assert get(p.port, good, sneaky)[0] == 403, sneaky
        assert get(p.port, other, "/x/../admin/users?q=1")[0] == 200
        assert upstream.seen[-1].target == "/admin/users?q=1"
        for ambiguous in ("/admin%2Fusers", "/admin%5cusers", "/..%2f"):
            assert get(p.port, other, ambiguous)[0] == 400, ambiguous
        denied = [r for r in p.records() if r.get("decision") == "deny"]  # access records
        assert any("route * /admin" in str(r.get("reason")) for r in denied)


def test_policy_reload_applies_to_the_next_request_and_bad_policy_is_refused(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        good = client_ctx(tp, "good")
        keep = connect(p.port, good)
        assert ask(keep, "/one") == 200
        # The allowed identity is removed (POL-010 / RLD-12): the same connection gets 403.
        policy.write_text("allow:\n  - cn: client-other\n")
        wait_reload(p, 1, "success")
        assert ask(keep, "/two") == 403
        # Pipelined: both answered, both by the new policy.
        keep.sendall(b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\nGET /4 HTTP/1.1\r\nHost: a\r\n\r\n")
        buf = bytearray()
        assert [read_response(keep, buf)[0] for _ in range(2)] == [403, 403]
        # A broken policy (RLD-13) keeps the last good one and says why, naming the key.
        policy.write_text("allow:\n  - cn: client-good\n    color: blue\n")
        status = wait_reload(p, 1, "failure")
        last = status["last_reload"]
        assert last["ok"] is False  # type: ignore[index]
        assert f"{policy}: allow[0]: unknown rule field(s) ['color']" in last["error"]  # type: ignore[index]
        assert ask(keep, "/five") == 403
        assert get(p.port, client_ctx(tp, "other"), "/x")[0] == 200
        keep.close()
        assert p.admin_get("/readyz")[0] == 200


def test_audit_mode_lets_denials_through_and_counts_them(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "audit: true\n")
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        assert get(p.port, client_ctx(tp, "good"), "/admin")[0] == 200
        assert get(p.port, client_ctx(tp, "good"), "/x")[0] == 200
        assert p.metric('mtls_proxy_requests_total{code="2xx",decision="audit"}') == 1
        assert p.metric('mtls_proxy_requests_total{code="2xx",decision="allow"}') == 1
        time.sleep(0.2)  # access records leave in batches
        audited = [r for r in p.records() if r.get("decision") == "audit"]
        assert len(audited) == 1 and "route * /admin" in str(audited[0]["reason"])


def test_policy_file_problems_at_startup_exit_2(tp: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("routes:\n  - path_prefix: admin\n    allow: []\n")
    base = ["--cert", tp.crt("server"), "--key", tp.key("server"), "--cacert", tp.ca]
    r = subprocess.run(
        [*proxy_cmd("check"), *base, "--upstream", "http://127.0.0.1:1", "--policy", str(policy)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert f"{policy}: routes[0].path_prefix: must be a path starting with /" in r.stderr
    policy.write_text(POLICY)
    r = subprocess.run(
        [*proxy_cmd("check"), *base, "--upstream", "http://127.0.0.1:1", "--policy", str(policy)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "route * /admin: 1 rule(s)" in r.stdout and f"policy file:       {policy}" in r.stdout


def test_kubelet_data_swap_is_picked_up_by_watching_alone(
    tp: Pki, upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    mount, files = secret_mount(tp, tmp_path)
    inter = pki.load_issuer(tp.dir)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--cert-dir",
        str(mount),
        extra_cert_args=False,
        loop=loop,
    ) as p:
        ctx = client_ctx(tp, "good")
        keep = connect(p.port, ctx)
        assert ask(keep, "/before") == 200
        for n, cn in ((2, "rotated-once"), (3, "rotated-twice")):  # the watch is re-armed
            new = pki.issue(inter, "server", cn, dns=["localhost"], ips=["127.0.0.1"])
            kubelet_write(mount, {**files, "tls.crt": new.cert_pem(), "tls.key": new.key_pem()}, n)
            wait_reload(p, n - 1, "success")
            assert served_subject(p.port, ctx) == cn
            assert ask(keep, f"/during-{n}") == 200  # the open connection is untouched
        assert not list(mount.glob("..2026_*_01.1"))  # the first directory is gone
        assert p.metric('mtls_proxy_reloads_total{result="failure"}') == 0
        keep.close()


def test_twenty_reloads_under_ten_streaming_clients(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    d = material_dir(tp, tmp_path)
    inter = pki.load_issuer(tp.dir)
    stop = threading.Event()
    failures: list[str] = []
    done = [0] * 10
    body = os.urandom(256 * 1024)
    digest = hashlib.sha256(body).hexdigest()

    def pump(i: int, port: int) -> None:
        try:
            with connect(port, client_ctx(tp, "good"), timeout=20) as s:
                buf = bytearray()
                head = f"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n\r\n"
                while not stop.is_set():
                    s.sendall(head.encode() + body)
                    status, _, payload = read_response(s, buf)
                    echo = json.loads(payload)
                    if status != 200 or echo["body_sha256"] != digest:
                        failures.append(f"client {i}: {status} {echo.get('body_len')}")
                    done[i] += 1
        except (OSError, ssl.SSLError, ValueError) as exc:
            failures.append(f"client {i}: {exc!r}")

    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", *material_args(d), extra_cert_args=False
    ) as p:
        threads = [threading.Thread(target=pump, args=(i, p.port)) for i in range(10)]
        for t in threads:
            t.start()
        try:
            for n in range(1, 21):
                cn = f"reload-{n}"
                new = pki.issue(inter, "server", cn, dns=["localhost"], ips=["127.0.0.1"])
                # Written to a temporary name and renamed, as a careful rotation tool does.
                for name, data in (("server.crt", new.cert_pem()), ("server.key", new.key_pem())):
                    (d / f"{name}.tmp").write_bytes(data)
                    (d / f"{name}.tmp").rename(d / name)
                p.proc.send_signal(signal.SIGHUP)
                time.sleep(0.5)
                # A new connection after each reload is served.
                assert get(p.port, client_ctx(tp, "good"), "/new")[0] == 200
            assert served_subject(p.port, client_ctx(tp, "good")) == "reload-20"
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
        assert min(done) > 0, done
        assert p.metric('mtls_proxy_reloads_total{result="success"}') >= 20
        deadline = time.monotonic() + 5
        while p.metric("mtls_proxy_connections_open") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.metric("mtls_proxy_connections_open") == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool: .ci/run installs it")
def test_metrics_pass_promtool_and_status_has_every_field(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    crl = tmp_path / "pki"
    shutil.copytree(tp.dir, crl)
    crl_file = pki.revoke(crl, "other")
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--crl", str(crl_file)) as p:
        assert get(p.port, client_ctx(tp, "good"))[0] == 200
        text = p.admin_get("/metrics")[1]
        r = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        for needle in (
            'mtls_proxy_handshakes_total{reason="timeout",result="failed"} 0.0',
            'mtls_proxy_cert_not_after_timestamp_seconds{cert="crl"}',
            'mtls_proxy_cert_not_after_timestamp_seconds{cert="ca"}',
            'mtls_proxy_request_duration_seconds_bucket{le="0.005"}',
            'mtls_proxy_upstream_errors_total{kind="connect"} 0.0',
            "mtls_proxy_build_info{version=",
        ):
            assert needle in text, needle
        status = json.loads(p.admin_get("/status")[1])
        assert set(status) >= {
            "version",
            "listen",
            "upstream",
            "server_cert",
            "trusted_cas",
            "last_reload",
            "connections_open",
            "draining",
        }
        assert status["last_reload"] is None and status["draining"] is False
        assert status["server_cert"]["not_after"].endswith("Z")
        assert status["trusted_cas"] == 1


def test_explain_follows_routes_normalized_paths_and_crls(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert subprocess.run([*proxy_cmd("pki", "init", str(d))], capture_output=True).returncode == 0
    issue = [*proxy_cmd("pki", "issue", "client", "app", "--dir", str(d), "--uri", ALLOWED_URI)]
    assert subprocess.run(issue, capture_output=True).returncode == 0
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    base = [
        *proxy_cmd("explain", "--cert", str(d / "app.crt")),
        *("--cacert", str(d / "ca.crt"), "--policy", str(policy), "--upstream", "http://x:1"),
    ]
    r = subprocess.run([*base, "--path", "/x/../admin/users"], capture_output=True, text=True)
    assert r.returncode == 3 and "route * /admin" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*base, "--path", "/admin%2f"], capture_output=True, text=True)
    assert r.returncode == 3 and "DENIED 400" in r.stdout
    r = subprocess.run([*base, "--path", "/x"], capture_output=True, text=True)
    assert r.returncode == 0 and "ALLOWED" in r.stdout
    assert subprocess.run([*proxy_cmd("pki", "revoke", "app", "--dir", str(d))]).returncode == 0
    r = subprocess.run(
        [*base, "--path", "/x", "--crl", str(d / "crl.pem")], capture_output=True, text=True
    )
    assert r.returncode == 3 and "REVOKED" in r.stdout


@pytest.mark.parametrize(
    ("file", "content", "needle"),
    [
        ("server.crt", b"", "server.crt"),
        ("server.crt", b"-----BEGIN CERTIFICATE-----\nMIIB", "server.crt"),
        ("server.key", "other", "does not match the certificate"),
        ("ca.crt", b"garbage\n", "ca.crt"),
        ("ca.crt", b"", "ca.crt"),
        ("server.crt", "expired", "the certificate expired at"),
    ],
)
def test_broken_material_at_reload_keeps_the_old_serving(
    tp: Pki, upstream: Upstream, tmp_path: Path, file: str, content: bytes | str, needle: str
) -> None:
    d = material_dir(tp, tmp_path)
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", *material_args(d), extra_cert_args=False
    ) as p:
        ctx = client_ctx(tp, "good")
        if content == "expired":  # a complete, matching pair whose certificate has expired
            now = dt.datetime.now(dt.UTC)
            old = pki.issue(
                pki.load_issuer(tp.dir),
                "server",
                "localhost",
                dns=["localhost"],
                not_before=now - dt.timedelta(days=10),
                not_after=now - dt.timedelta(days=1),
            )
            pki.write_pair(d, "server", old)
        else:
            data = Path(tp.key(content)).read_bytes() if isinstance(content, str) else content
            (d / file).write_bytes(data)
        status = wait_reload(p, 1, "failure")
        assert needle in status["last_reload"]["error"]  # type: ignore[index]
        assert get(p.port, ctx)[0] == 200  # the old certificate and trust still serve
        assert served_subject(p.port, ctx) == "localhost"
        assert p.admin_get("/readyz")[0] == 200
        assert p.metric('mtls_proxy_reloads_total{result="success"}') == 0


def test_cert_now_key_later_never_serves_a_mismatched_pair(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    d = material_dir(tp, tmp_path)
    new = pki.issue(pki.load_issuer(tp.dir), "server", "next", dns=["localhost"], ips=["127.0.0.1"])
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", *material_args(d), extra_cert_args=False
    ) as p:
        ctx = client_ctx(tp, "good")
        (d / "server.crt").write_bytes(new.cert_pem())  # RLD-05: the key follows later
        wait_reload(p, 1, "failure")  # the pair does not match: refused, the old one serves
        assert served_subject(p.port, ctx) == "localhost"
        assert get(p.port, ctx)[0] == 200
        half = new.key_pem()
        (d / "server.key").write_bytes(half[: len(half) // 2])  # RLD-04: half-written
        time.sleep(1.5)
        assert served_subject(p.port, ctx) == "localhost"
        (d / "server.key").write_bytes(half)  # completed: picked up without a signal
        wait_reload(p, 1, "success")
        assert served_subject(p.port, ctx) == "next"
