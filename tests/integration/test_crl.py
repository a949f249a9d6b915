"""CRLs: revoked clients fail the handshake, intermediates' CRLs count, an expired CRL follows
--crl-expired, and a CRL reload cuts the revoked client's open connections and sessions."""

from __future__ import annotations

import datetime as dt
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mtls_proxy.cli import pki
from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Proxy,
    Upstream,
    ask,
    client_ctx,
    connect,
    get,
    handshake_rejected,
    make_test_pki,
    read_response,
    resume_and_request,
    run_proxy,
)
from tests.integration.test_reload import wait_reload


def make_crl(
    ca: pki.Issued, serials: list[int], next_update: dt.datetime
) -> x509.CertificateRevocationList:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(min(now, next_update) - dt.timedelta(days=1))
        .next_update(next_update)
    )
    for serial in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - dt.timedelta(days=1))
            .build()
        )
    return b.sign(ca.key, hashes.SHA256())


def serial(tp: Pki, name: str) -> int:
    return x509.load_pem_x509_certificates(Path(tp.crt(name)).read_bytes())[0].serial_number


@pytest.fixture
def own(tmp_path: Path) -> Pki:
    """A PKI of the test's own: revocations write DIR/crl.pem."""
    return make_test_pki(tmp_path / "pki")


def test_revoked_client_fails_and_a_crl_reload_cuts_its_connections_and_sessions(
    own: Pki, upstream: Upstream, loop: str
) -> None:
    """TLS-024, TLS-037, RLD-10."""
    crl = pki.revoke(own.dir, "other")  # client-other revoked from the start
    with run_proxy(own, f"http://127.0.0.1:{upstream.port}", "--crl", str(crl), loop=loop) as p:
        good = client_ctx(own, "good", tls13=True)
        assert get(p.port, good)[0] == 200
        # The client reads why: alert 44 certificate_revoked, in both TLS versions.
        assert handshake_rejected(p.port, client_ctx(own, "other")) == "CERTIFICATE_REVOKED"
        revoked12 = client_ctx(own, "other", tls13=False)
        assert handshake_rejected(p.port, revoked12) == "CERTIFICATE_REVOKED"
        assert p.metric('mtls_proxy_handshakes_total{reason="revoked",result="failed"}') == 2
        failed = [r for r in p.records() if r.get("msg") == "handshake failed"]
        assert failed and failed[0]["reason"] == "revoked" and failed[0]["client"] == "127.0.0.1"
        assert "revoked" in str(failed[0]["error"]) and failed[0]["suppressed"] == 0
        keep = connect(p.port, good)
        keep.sendall(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(keep, bytearray())[0] == 200
        session = keep.session
        assert session is not None
        # The CRL file is rewritten (no signal: the watcher sees it) to revoke client-good too.
        pki.revoke(own.dir, "good")
        wait_reload(p, 1, "success")
        assert p.metric('mtls_proxy_connections_cut_total{reason="revoked"}') == 1
        assert ask(keep, "/two") is None  # the open connection was closed
        keep.close()
        assert handshake_rejected(p.port, good)
        # Nor can the old session be resumed (a new context has new ticket keys).
        assert resume_and_request(p.port, good, session) == b""
        assert not any("/two" in seen.target for seen in upstream.seen)
        assert any('"closing a connection' in line for line in p.logs)


def test_crl_of_the_root_revokes_the_intermediate(own: Pki, upstream: Upstream) -> None:
    crl = pki.revoke(own.dir, "intermediate")
    with run_proxy(own, f"http://127.0.0.1:{upstream.port}", "--crl", str(crl)) as p:
        assert handshake_rejected(p.port, client_ctx(own, "good"))
        assert get(p.port, client_ctx(own, "direct"))[0] == 200  # issued by the root itself
        assert p.metric('mtls_proxy_handshakes_total{reason="revoked",result="failed"}') == 1


def test_crl_check_chain_needs_every_ca_and_leaf_mode_does_not(
    own: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """TLS-025: with CRL checking on, a CA without a CRL fails closed."""
    inter = pki.load_issuer(own.dir)
    only_inter = tmp_path / "inter-crl.pem"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    only_inter.write_bytes(
        make_crl(inter, [serial(own, "other")], later).public_bytes(serialization.Encoding.PEM)
    )
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(own, up, "--crl", str(only_inter)) as p:
        # Envoy's rule: a CRL for some CA of the chain means one is needed for all of them.
        assert handshake_rejected(p.port, client_ctx(own, "good"))
        assert p.metric('mtls_proxy_handshakes_total{reason="other",result="failed"}') == 1
    with run_proxy(own, up, "--crl", str(only_inter), "--crl-check", "leaf") as p:
        assert get(p.port, client_ctx(own, "good"))[0] == 200
        assert handshake_rejected(p.port, client_ctx(own, "other"))


def expired_crls(own: Pki, tmp_path: Path, revoked: str) -> Path:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    root = pki.load_issued(own.dir, "root")
    inter = pki.load_issuer(own.dir)
    path = tmp_path / "expired-crl.pem"
    path.write_bytes(
        make_crl(inter, [serial(own, revoked)], past).public_bytes(serialization.Encoding.PEM)
        + make_crl(root, [], past).public_bytes(serialization.Encoding.PEM)
    )
    return path


def test_expired_crl_rejects_by_default_and_is_reported(
    own: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """TLS-026, RLD-11."""
    path = expired_crls(own, tmp_path, "other")
    with run_proxy(own, f"http://127.0.0.1:{upstream.port}", "--crl", str(path)) as p:
        # Fail closed, and say why: OpenSSL's alert for a CRL past its nextUpdate.
        assert handshake_rejected(p.port, client_ctx(own, "good")) == "CERTIFICATE_EXPIRED"
        crl_time = p.metric('mtls_proxy_cert_not_after_timestamp_seconds{cert="crl"}')
        assert 0 < crl_time < time.time()
        assert any("past its nextUpdate" in line for line in p.logs)


def test_expired_crl_allow_keeps_enforcing_its_revocations(
    own: Pki, upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    path = expired_crls(own, tmp_path, "other")
    with run_proxy(
        own,
        f"http://127.0.0.1:{upstream.port}",
        "--crl",
        str(path),
        "--crl-expired",
        "allow",
        loop=loop,
    ) as p:
        assert get(p.port, client_ctx(own, "good"))[0] == 200
        for tls13 in (True, False):
            # Refused after the handshake (OpenSSL let the stale CRL through): a 403 says why.
            refusal = handshake_rejected(p.port, client_ctx(own, "other", tls13=tls13))
            assert refusal == "403 revoked"
        assert p.metric('mtls_proxy_handshakes_total{reason="revoked",result="failed"}') == 2
        assert len(upstream.seen) == 1  # only client-good's request
        assert any("still enforcing" in line for line in p.logs)


def outcomes(p: Proxy, names: list[str], own: Pki) -> dict[str, object]:
    """How the proxy answers each client (200 or "refused"), and the failure reasons counted."""
    seen: dict[str, object] = {}
    for name in names:
        try:
            s = connect(p.port, client_ctx(own, name))
        except (ssl.SSLError, ConnectionError):  # TLS 1.2, or a TLS 1.3 alert in time
            seen[name] = "refused"
            continue
        with s:
            try:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                status, _, body = read_response(s, bytearray())
            except (ConnectionError, ssl.SSLError, OSError):
                status, body = None, b""
        # Refused after the handshake (a stale CRL allowed): the 403 that names the reason.
        refused = status is None or (status == 403 and b"client_certificate_refused" in body)
        seen[name] = "refused" if refused else status
    for reason in ("revoked", "other"):
        seen[f"failed:{reason}"] = p.metric(
            f'mtls_proxy_handshakes_total{{reason="{reason}",result="failed"}}'
        )
    return seen


def test_int050_stale_crl_relaxes_only_its_issuer(
    own: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """INT-050: --crl-expired allow relaxes a stale CRL's own CA only. A CA without any CRL
    still fails closed, exactly as when the same CRL is fresh (OpenSSL's rule, TLS-025), in
    chain and in leaf mode; the stale CRL's revocations still count."""
    root = pki.load_issued(own.dir, "root")
    inter = pki.load_issuer(own.dir)
    second = pki.make_ca("second root")  # trusted too, never has a CRL
    Path(own.ca).write_bytes(Path(own.ca).read_bytes() + second.cert_pem(with_chain=False))
    pki.write_pair(own.dir, "second", pki.issue(second, "client", "c2", uris=[ALLOWED_URI]))
    pki.write_pair(own.dir, "direct2", pki.issue(root, "client", "d2", uris=[ALLOWED_URI]))
    now = dt.datetime.now(dt.UTC)
    names = ["direct", "direct2", "good", "other", "second"]
    up = f"http://127.0.0.1:{upstream.port}"

    def crl_file(ca: pki.Issued, revoked: str, next_update: dt.datetime) -> str:
        path = tmp_path / f"crl-{next_update.timestamp()}-{revoked}.pem"
        crl = make_crl(ca, [serial(own, revoked)], next_update)
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def run(ca: pki.Issued, revoked: str, stale: bool, *mode: str) -> dict[str, object]:
        nu = now + (dt.timedelta(hours=-1) if stale else dt.timedelta(days=1))
        crl = crl_file(ca, revoked, nu)
        with run_proxy(own, up, "--crl", crl, "--crl-expired", "allow", *mode) as p:
            return outcomes(p, names, own)

    # Chain mode, only the root has a CRL: its direct clients are checked against it; the
    # intermediate's clients (no CRL for the intermediate) and the second root's are refused.
    chain = {"direct": 200, "direct2": "refused", "good": "refused", "other": "refused"}
    expected = {**chain, "second": "refused", "failed:revoked": 1, "failed:other": 3}
    assert run(root, "direct2", stale=True) == expected
    assert run(root, "direct2", stale=False) == expected
    # Leaf mode, only the intermediate has a CRL: its clients are checked against it; the
    # roots' own clients (no CRL for either root) are refused.
    leaf = {"direct": "refused", "direct2": "refused", "good": 200, "other": "refused"}
    expected = {**leaf, "second": "refused", "failed:revoked": 1, "failed:other": 3}
    assert run(inter, "other", True, "--crl-check", "leaf") == expected
    assert run(inter, "other", False, "--crl-check", "leaf") == expected
    assert len(upstream.seen) == 4  # client-direct twice, client-good twice


def test_broken_crl_at_reload_keeps_the_old_one(own: Pki, upstream: Upstream) -> None:
    crl = pki.revoke(own.dir, "other")
    with run_proxy(
        own, f"http://127.0.0.1:{upstream.port}", "--crl", str(crl), "--reload-interval", "0.5"
    ) as p:
        crl.write_bytes(crl.read_bytes()[:200])  # truncated mid-way
        status = wait_reload(p, 1, "failure")
        last = status["last_reload"]
        assert last["ok"] is False and "CRL" in last["error"]  # type: ignore[index]
        assert handshake_rejected(p.port, client_ctx(own, "other"))
        assert get(p.port, client_ctx(own, "good"))[0] == 200


def test_crl_not_signed_by_its_issuer_is_refused_at_load(own: Pki, tmp_path: Path) -> None:
    """TLS-027: a CRL naming the trusted root but signed by another key is never trusted."""
    import subprocess
    import sys

    root = pki.load_issued(own.dir, "root")
    forged = pki.Issued(root.cert, pki.make_ca("impostor").key, ())
    path = tmp_path / "forged.pem"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    path.write_bytes(make_crl(forged, [], later).public_bytes(serialization.Encoding.PEM))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtls_proxy",
            "check",
            "--upstream",
            "http://127.0.0.1:9",
            "--cert",
            own.crt("server"),
            "--key",
            own.key("server"),
            "--cacert",
            own.ca,
            "--allow-all",
            "--crl",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "is not signed by that trusted CA's key" in r.stderr
