"""SIGHUP reload: new material takes effect for new handshakes, broken material is refused and
the old keeps serving, and sessions issued before a reload are not resumed after it."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import time
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from tests.h2client import h2_client, h2_exchange
from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    ask,
    client_ctx,
    connect,
    get,
    handshake_rejected,
    read_response,
    resume_and_request,
    run_proxy,
)


def served_subject(port: int, ctx: ssl.SSLContext) -> str:
    with connect(port, ctx) as s:
        cert = s.getpeercert()
        return dict(x[0] for x in cert["subject"])["commonName"]


def wait_reload(p: Proxy, count: int, result: str = "") -> dict[str, object]:
    """Wait until *count* reloads (of *result*, if given) have happened; return /status.

    The file watcher reloads on its own when a test rewrites files, so a SIGHUP may find the
    work done already: tests count by result and wait for at least, not exactly, N."""
    prefix = "mtls_proxy_reloads_total{" + (f'result="{result}"' if result else "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = p.admin_get("/metrics")[1]
        status = json.loads(p.admin_get("/status")[1])
        done = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(prefix)
        )
        if done >= count:
            return status
        time.sleep(0.1)
    raise AssertionError("no reload happened")


def material_args(d: Path) -> list[str]:
    """The proxy options for the material copied by material_dir()."""
    return [
        "--cert",
        str(d / "server.crt"),
        "--key",
        str(d / "server.key"),
        "--cacert",
        str(d / "ca.crt"),
    ]


def material_dir(tp: Pki, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(tp.dir / name, d / name)
    return d


def test_sighup_swaps_the_certificate_and_refuses_broken_material(
    tp: Pki, upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    d = material_dir(tp, tmp_path)
    inter = pki.load_issuer(tp.dir)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        *material_args(d),
        extra_cert_args=False,
        loop=loop,
    ) as p:
        ctx = client_ctx(tp, "good")
        assert served_subject(p.port, ctx) == "localhost"
        keep = connect(p.port, ctx)  # an established connection survives reloads
        keep.sendall(b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(keep, bytearray())[0] == 200
        new = pki.issue(inter, "server", "localhost-renewed", dns=["localhost"], ips=["127.0.0.1"])
        pki.write_pair(d, "server", new)
        p.proc.send_signal(signal.SIGHUP)
        status = wait_reload(p, 1, "success")
        assert served_subject(p.port, ctx) == "localhost-renewed"
        status = json.loads(p.admin_get("/status")[1])
        assert status["last_reload"]["ok"] is True  # type: ignore[index]
        assert served_subject(p.port, ctx) == "localhost-renewed"
        keep.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(keep, bytearray())[0] == 200
        keep.close()
        # Broken: a truncated certificate. The old (renewed) one keeps serving.
        (d / "server.crt").write_text((d / "server.crt").read_text()[:100])
        p.proc.send_signal(signal.SIGHUP)
        status = wait_reload(p, 1, "failure")
        last = status["last_reload"]
        assert last["ok"] is False and str(d / "server.crt") in last["error"]  # type: ignore[index]
        assert last["at"].endswith("Z")  # type: ignore[index]
        assert served_subject(p.port, ctx) == "localhost-renewed"
        assert get(p.port, ctx)[0] == 200
        metrics = p.admin_get("/metrics")[1]
        assert 'mtls_proxy_reloads_total{result="failure"} 0.0' not in metrics
        assert 'mtls_proxy_reloads_total{result="success"} 0.0' not in metrics
        assert any("reload failed" in line for line in p.logs)
        assert p.admin_get("/readyz")[0] == 200


def test_ca_rotation_applies_to_new_handshakes_and_old_sessions(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """TLS-038 / RLD-07: after the old CA leaves the bundle, neither a new handshake nor a
    resumed session of its clients succeeds."""
    d = material_dir(tp, tmp_path)
    new_root = pki.make_ca("rotated root")
    new_client = pki.issue(
        new_root, "client", "client-new", uris=["spiffe://test.local/ns/default/sa/client"]
    )
    pki.write_pair(tmp_path, "newclient", new_client)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        *material_args(d),
        extra_cert_args=False,
    ) as p:
        ctx = client_ctx(tp, "good", tls13=True)
        with connect(p.port, ctx) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s, bytearray())[0] == 200
            session = s.session
        # The old CA is removed from the bundle; only the new root is trusted.
        (d / "ca.crt").write_bytes(new_root.cert_pem(with_chain=False))
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1)
        # neither resumed nor newly trusted
        assert not resume_and_request(p.port, ctx, session).startswith(b"HTTP/1.1 200")
        new_ctx = ssl.create_default_context(cafile=tp.ca)
        new_ctx.load_cert_chain(tmp_path / "newclient.crt", tmp_path / "newclient.key")
        assert get(p.port, new_ctx)[0] == 200


def kubelet_write(mount: Path, files: dict[str, bytes], n: int) -> None:
    """Update a secret mount the way the kubelet does (atomic_writer.go): a new timestamped
    directory, a ``..data_tmp`` link to it renamed over ``..data``, the visible names as links
    through ``..data``, then the previous timestamped directory deleted."""
    old = [p for p in mount.glob("..2026_*") if p.is_dir()]
    ts = mount / f"..2026_11_29_10_00_{n:02d}.{n}"
    ts.mkdir()
    for name, data in files.items():
        (ts / name).write_bytes(data)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(ts.name)
    tmp.rename(mount / "..data")
    for name in files:
        link = mount / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for d in old:
        shutil.rmtree(d)


def secret_mount(tp: Pki, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A secret volume with the test PKI's server pair and CA, written as the kubelet does."""
    mount = tmp_path / "secret"
    mount.mkdir()
    files = {name: (tp.dir / src).read_bytes() for name, src in SECRET_FILES.items()}
    kubelet_write(mount, files, 1)
    return mount, files


SECRET_FILES = {"tls.crt": "server.crt", "tls.key": "server.key", "ca.crt": "ca.crt"}


def test_kubernetes_secret_update_is_picked_up_by_polling(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    mount, files = secret_mount(tp, tmp_path)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--cert-dir",
        str(mount),
        "--reload-interval",
        "0.5",
        extra_cert_args=False,
    ) as p:
        ctx = client_ctx(tp, "good")
        assert served_subject(p.port, ctx) == "localhost"
        renewed = pki.issue(
            pki.load_issuer(tp.dir),
            "server",
            "localhost-rotated",
            dns=["localhost"],
            ips=["127.0.0.1"],
        )
        kubelet_write(
            mount, {**files, "tls.crt": renewed.cert_pem(), "tls.key": renewed.key_pem()}, 2
        )
        wait_reload(p, 1)
        assert served_subject(p.port, ctx) == "localhost-rotated"
        assert get(p.port, ctx)[0] == 200


def test_without_watchfiles_sighup_still_reloads(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """A broken install (watchfiles missing): a warning, and reloads by SIGHUP still work."""
    fake = tmp_path / "nowatch"
    fake.mkdir()
    (fake / "watchfiles.py").write_text('raise ImportError("no watchfiles here")\n')
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", env={"PYTHONPATH": str(fake)}) as p:
        deadline = time.monotonic() + 5
        while not any("file watching unavailable" in line for line in p.logs):
            assert time.monotonic() < deadline, p.logs
            time.sleep(0.05)
        assert not any("Traceback" in line for line in p.logs)
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1, "success")


@pytest.mark.parametrize("anchors", ["roots", "any"])
def test_a_reload_that_keeps_only_the_intermediate_cuts_as_the_handshake_would(
    tp: Pki, upstream: Upstream, tmp_path: Path, anchors: str
) -> None:
    """The bundle loses the clients' root but keeps their intermediate: with
    --trust-anchors roots OpenSSL now refuses them, so their open connections are cut too
    (they were kept: the re-check took any CA of the chain as its anchor); with `any` the
    intermediate is an anchor and both stay."""
    d = material_dir(tp, tmp_path)
    other_root = pki.make_ca("unrelated root")
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        *material_args(d),
        "--trust-anchors",
        anchors,
        extra_cert_args=False,
    ) as p:
        ctx = client_ctx(tp, "good", tls13=True)
        s = connect(p.port, ctx)
        s.sendall(b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s, bytearray())[0] == 200
        bundle = other_root.cert_pem(with_chain=False) + (tp.dir / "intermediate.crt").read_bytes()
        (d / "ca.crt").write_bytes(bundle)
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1, "success")
        cut = p.metric('mtls_proxy_connections_cut_total{reason="unknown_ca"}')
        with s:
            status = ask(s, "/after")
        if anchors == "roots":
            assert (cut, status) == (1, None)
            assert handshake_rejected(p.port, client_ctx(tp, "good")) == "UNKNOWN_CA"
        else:
            assert (cut, status) == (0, 200)
            assert get(p.port, client_ctx(tp, "good"))[0] == 200


def test_a_reload_cuts_http2_connections_the_new_trust_refuses(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """Reload semantics are the same for HTTP/2 (docs/http2.md): the bundle loses the clients'
    CA, so an open h2 connection with streams to come is cut."""
    d = material_dir(tp, tmp_path)
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", *material_args(d), "--http2", "on",
        extra_cert_args=False,
    ) as p:  # fmt: skip
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        get = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a")]
        before = h2_exchange(s, conn, {1: ([*get, (b":path", b"/before")], None)})
        assert before[1]["headers"][b":status"] == b"200"  # type: ignore[index]
        (d / "ca.crt").write_bytes(pki.make_ca("unrelated root").cert_pem(with_chain=False))
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1, "success")
        assert p.metric('mtls_proxy_connections_cut_total{reason="unknown_ca"}') == 1
        with s:
            after = h2_exchange(s, conn, {3: ([*get, (b":path", b"/after")], None)})
    assert "headers" not in after[3]  # the connection ended: no answer on the new stream
