"""--workers 2: both processes serve the one port; metrics and status cover all of them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from tests.helpers import Pki, Upstream, client_ctx, connect, read_response, run_proxy


def sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def test_two_workers_share_the_port_and_report_together(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--workers", "2", loop=loop) as p:
        ready = next(r for r in p.records() if r.get("msg") == "ready")
        pids = ready["workers"]
        assert isinstance(pids, list) and len(pids) == 2
        before = {pid: sockets(pid) for pid in pids}
        ctx = client_ctx(tp, "good")
        held = []
        for i in range(24):
            s = connect(p.port, ctx)
            s.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            assert read_response(s, bytearray())[0] == 200
            held.append(s)
        after = {pid: sockets(pid) for pid in pids}
        # The kernel spread the connections: each worker holds some of them.
        assert all(after[pid] > before[pid] for pid in pids), (before, after)
        status = json.loads(p.admin_get("/status")[1])
        metrics = p.admin_get("/metrics")[1]
        for s in held:
            s.close()
        assert status["connections_open"] == 24
        assert 'mtls_proxy_requests_total{code="2xx",decision="allow"} 24.0' in metrics
        assert 'mtls_proxy_handshakes_total{reason="",result="ok"} 24.0' in metrics
        assert metrics.count("# TYPE mtls_proxy_build_info gauge") == 1
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()


def test_a_dead_worker_is_restarted(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--workers", "2") as p:
        ready = next(r for r in p.records() if r.get("msg") == "ready")
        victim = ready["workers"][0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any("restarting" in line for line in p.logs) and p.admin_get("/readyz")[0] == 200:
                break
            time.sleep(0.2)
        assert any("restarting" in line for line in p.logs)
        assert p.admin_get("/readyz")[0] == 200
        for _ in range(6):
            with connect(p.port, client_ctx(tp, "good")) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                assert read_response(s, bytearray())[0] == 200


def test_master_status_reports_the_workers_reload(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    from mtls_proxy.cli import pki
    from tests.integration.test_reload import material_args, material_dir, wait_reload

    d = material_dir(tp, tmp_path)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--workers",
        "2",
        *material_args(d),
        extra_cert_args=False,
    ) as p:
        assert json.loads(p.admin_get("/status")[1])["last_reload"] is None
        new = pki.issue(pki.load_issuer(tp.dir), "server", "w-next", dns=["localhost"])
        pki.write_pair(d, "server", new)
        p.proc.send_signal(signal.SIGHUP)  # forwarded; each worker also watches the files
        status = wait_reload(p, 2, "success")  # both workers
        assert status["last_reload"]["ok"] is True
        assert status["server_cert"]["subject"] == "CN=w-next"
