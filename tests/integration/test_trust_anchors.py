"""Issue 14: --trust-anchors, the CA bundle as ``check`` lists and refuses it, and explain's
options (``--client-cert``/``--client-key`` beside the server's own ``--cert``/``--key``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtls_proxy.cli import pki
from mtls_proxy.material.keystores import export_pkcs12_truststore
from tests.helpers import ALLOWED_URI, Pki, Upstream, client_ctx, get, proxy_cmd, run_proxy
from tests.security import certs as c
from tests.security.certs import DAY, NOW


def mtls(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(proxy_cmd(*args), capture_output=True, text=True, timeout=60)


def server(tp: Pki) -> list[str]:
    return ["--cert", tp.crt("server"), "--key", tp.key("server"), "--upstream", "http://x:1"]


def _pem(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def _leaf_of(tp: Pki, name: str) -> bytes:
    leaf = x509.load_pem_x509_certificates(_pem(tp.crt(name)))[0]
    return leaf.public_bytes(serialization.Encoding.PEM)


# -- check -----------------------------------------------------------------------------------
def test_check_lists_each_trust_anchor(tp: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(_pem(tp.ca) + _pem(tp.dir / "intermediate.crt"))
    r = mtls("check", *server(tp), "--cacert", str(bundle), "--allow-all")
    assert r.returncode == 0, r.stderr
    assert f"trusted CAs:       2 ({bundle}), --trust-anchors any" in r.stdout
    lines = [x.strip() for x in r.stdout.splitlines() if x.startswith("    - CN=mtls-proxy dev")]
    assert len(lines) == 2, r.stdout
    root, inter = lines
    assert root.startswith("- CN=mtls-proxy dev root,O=mtls-proxy dev: self-signed root, CA, ")
    assert "valid until 20" in root
    assert inter.startswith(
        "- CN=mtls-proxy dev intermediate,O=mtls-proxy dev: issued by CN=mtls-proxy dev root"
    )
    assert ", CA, valid until 20" in inter


def test_check_marks_an_intermediate_without_its_root_unused_with_roots(
    tp: Pki, tmp_path: Path
) -> None:
    other = c.ca(c.name("Other inter"), c.ca(c.name("Other root")))
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(_pem(tp.ca) + c.pem(other.cert))
    r = mtls(
        "check", *server(tp), "--cacert", str(bundle), "--allow-all", "--trust-anchors", "roots"
    )
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if "CN=Other inter" in x]
    assert "unused with --trust-anchors roots (its root is not in the bundle)" in line


def _expired_ca(d: Path) -> Path:
    p = d / "expired-ca.crt"
    p.write_bytes(c.pem(c.ca(c.name("Expired CA"), nb=NOW - 10 * DAY, na=NOW - DAY).cert))
    return p


@pytest.mark.parametrize(
    ("bundle", "extra", "needle"),
    [
        ("leaf", (), "certificate 1 of 1 (CN=client-good,O=Example Corp) is not a CA: "),
        ("root+leaf", (), "certificate 2 of 2 (CN=client-good,O=Example Corp) is not a CA: "),
        ("leaf", ("--trust-anchors", "roots"), "is not a CA: basicConstraints CA:FALSE"),
        ("intermediate", ("--trust-anchors", "roots"), "it holds no valid one"),
        ("expired", (), "outside its validity period"),
        ("empty", (), "not a PEM certificate file"),
    ],
)
def test_check_refuses_a_bundle_that_cannot_verify_any_client(
    tp: Pki, tmp_path: Path, bundle: str, extra: tuple[str, ...], needle: str
) -> None:
    path = tmp_path / "bundle.crt"
    path.write_bytes(
        {
            "leaf": _leaf_of(tp, "good"),
            "root+leaf": _pem(tp.ca) + _leaf_of(tp, "good"),
            "intermediate": _pem(tp.dir / "intermediate.crt"),
            "expired": _pem(_expired_ca(tmp_path)),
            "empty": b"",
        }[bundle]
    )
    r = mtls("check", *server(tp), "--cacert", str(path), "--allow-all", *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(path) in r.stderr and needle in r.stderr, r.stderr


def test_a_leaf_in_a_truststore_is_refused_by_serve_too(tp: Pki, tmp_path: Path) -> None:
    """The refusal is made where the bundle is loaded: serve, reload, check and explain alike."""
    leaf = x509.load_pem_x509_certificates(_pem(tp.crt("good")))[0]
    root = x509.load_pem_x509_certificate(_pem(tp.ca))
    store = tmp_path / "truststore.p12"
    store.write_bytes(export_pkcs12_truststore([root, leaf], b"changeit"))
    args = ["--truststore", str(store), "--truststore-password", "changeit", "--allow-all"]
    r = mtls("serve", *server(tp), "--listen", "127.0.0.1:0", "--admin", "off", *args)
    assert r.returncode == 2 and f"--truststore: {store}: certificate 2 of 2" in r.stderr
    assert "is not a CA" in r.stderr


def test_crl_chain_mode_with_an_intermediate_anchor_is_refused(tp: Pki, tmp_path: Path) -> None:
    """Measured: with partial chains OpenSSL ends the chain at the bundle's intermediate, and
    --crl-check chain then fails every client below it (reason other). Refused at load, with
    the two ways out; both work."""
    d = tmp_path / "pki"
    pki.init_pki(d)
    pki.write_pair(d, "app", pki.issue(pki.load_issuer(d), "client", "app", uris=[ALLOWED_URI]))
    pki.revoke(d, "app")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(_pem(d / "ca.crt") + _pem(d / "intermediate.crt"))
    base = [*server(tp), "--cacert", str(bundle), "--crl", str(d / "crl.pem"), "--allow-all"]
    r = mtls("check", *base)
    assert r.returncode == 2, r.stdout
    assert "--crl-check chain cannot work with --trust-anchors any" in r.stderr
    assert "CN=mtls-proxy dev intermediate" in r.stderr
    r = mtls("explain", "--client-cert", str(d / "app.crt"), *base)
    assert r.returncode == 2 and "--crl-check chain cannot work" in r.stderr
    for way_out in (("--trust-anchors", "roots"), ("--crl-check", "leaf")):
        assert mtls("check", *base, *way_out).returncode == 0, way_out
        r = mtls("explain", "--client-cert", str(d / "app.crt"), *base, *way_out)
        assert r.returncode == 3 and "REVOKED" in r.stdout, r.stdout + r.stderr


def test_serve_trusts_an_intermediate_alone_and_reports_the_verified_chain(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    inter = tmp_path / "inter.crt"
    inter.write_bytes(_pem(tp.dir / "intermediate.crt"))
    material = ["--cert", tp.crt("server"), "--key", tp.key("server"), "--cacert", str(inter)]
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", *material, extra_cert_args=False) as p:
        status, _, _ = get(p.port, client_ctx(tp, "good"))
        assert status == 200
    r = mtls(
        "explain",
        "--client-cert",
        tp.crt("good"),
        *server(tp),
        "--cacert",
        str(inter),
        "--allow-all",
    )
    assert "trust:        trusted: CN=client-good,O=Example Corp -> CN=mtls-proxy dev " in r.stdout
    assert r.stdout.count(" -> ") == 1  # the chain ends at the intermediate, the anchor


# -- explain's options -----------------------------------------------------------------------
def test_explain_takes_the_servers_cert_and_key_beside_client_cert(tp: Pki) -> None:
    r = mtls(
        "explain",
        *("--client-cert", tp.crt("good"), "--client-key", tp.key("good")),
        *server(tp),
        *("--cacert", tp.ca, "--allow-uri", ALLOWED_URI),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "subject:      CN=client-good,O=Example Corp" in r.stdout  # the client's, not ours
    assert "handshake:    accepted (a whole handshake" in r.stdout


def test_explain_with_a_keystore_config(tp: Pki, tmp_path: Path) -> None:
    """Before, explain set a stand-in --cert, which a keystore configuration refused."""
    out = pki.export(tp.dir, "server", "p12", "changeit", tmp_path / "ks")
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"upstream: http://x:1\ntls:\n  keystore: {out / 'keystore.p12'}\n"
        f"  keystore_password: changeit\n  cacert: {tp.ca}\nallow_all: true\n"
    )
    r = mtls("explain", "--client-cert", tp.crt("good"), "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "handshake:    accepted" in r.stdout


def test_explain_cert_is_a_deprecated_alias_only_without_server_material(tp: Pki) -> None:
    r = mtls(
        *("explain", "--cert", tp.crt("good"), "--cacert", tp.ca, "--upstream", "http://x:1"),
        *("--allow-cn", "someone-else"),
    )
    assert r.returncode == 3, r.stderr  # no rule allows it, but it was read as the client's
    assert "deprecated; use --client-cert" in r.stderr
    assert "subject:      CN=client-good,O=Example Corp" in r.stdout
    r = mtls("explain", *server(tp), "--cacert", tp.ca, "--allow-all")
    assert r.returncode == 2 and "--client-cert FILE is required" in r.stderr


def test_explain_reports_the_listeners_reason_and_checks_the_key(tp: Pki, tmp_path: Path) -> None:
    base = [*server(tp), "--cacert", tp.ca, "--allow-all"]
    r = mtls("explain", "--client-cert", tp.crt("expired"), *base)
    assert r.returncode == 3
    assert "trust:        UNTRUSTED: certificate has expired" in r.stdout
    assert "handshake:    refused, reason expired" in r.stdout
    assert "client reads: TLS alert certificate_expired" in r.stdout  # what curl/Java print
    r = mtls("explain", "--client-cert", tp.crt("server_eku"), *base)
    assert "handshake:    refused, reason bad_certificate" in r.stdout
    assert "unsuitable certificate purpose" in r.stdout
    assert "client reads: TLS alert unsupported_certificate" in r.stdout
    # Refused after the handshake (--strict-client-certs: no EKU): a 403, not an alert.
    root = c.ca(c.name("Root"))
    (tmp_path / "root.crt").write_bytes(c.pem(root.cert))
    crt, key = c.write(tmp_path, "no_eku", c.leaf(root, eku=()))
    strict = [*server(tp), "--cacert", str(tmp_path / "root.crt"), "--allow-all"]
    for with_key in ([], ["--client-key", key]):
        r = mtls("explain", "--client-cert", crt, *with_key, *strict, "--strict-client-certs")
        assert r.returncode == 3, r.stdout + r.stderr
        assert "client reads: HTTP 403" in r.stdout, r.stdout
        assert "decision:     DENIED 403 right after the handshake" in r.stdout
    r = mtls("explain", "--client-cert", tp.crt("good"), "--client-key", tp.key("other"), *base)
    assert r.returncode == 2 and f"--client-key: {tp.key('other')}: OpenSSL cannot use" in r.stderr
    der = tmp_path / "good.der"
    der.write_bytes(x509.load_pem_x509_certificates(_pem(tp.crt("good")))[0].public_bytes(
        serialization.Encoding.DER
    ))  # fmt: skip
    r = mtls("explain", "--client-cert", str(der), *base)
    assert "chain sent:   0 intermediate(s)" in r.stdout
    assert "handshake:    refused, reason unknown_ca" in r.stdout  # its intermediate not sent


def test_explain_notes_a_key_a_tls13_client_cannot_sign_with(tp: Pki, tmp_path: Path) -> None:
    root = c.ca(c.name("Root"))
    p192 = c.leaf(root, key=ec.generate_private_key(ec.SECP192R1()))
    (tmp_path / "root.crt").write_bytes(c.pem(root.cert))
    crt, key = c.write(tmp_path, "p192", p192)
    base = [*server(tp), "--cacert", str(tmp_path / "root.crt"), "--allow-all"]
    r = mtls("explain", "--client-cert", crt, *base)
    assert "handshake:    refused, reason bad_certificate" in r.stdout  # too weak for level 2
    assert "note:         a TLS 1.3 client cannot sign with this key type" in r.stdout
    r = mtls("explain", "--client-cert", crt, "--client-key", key, *base)
    assert "handshake:    refused, reason no_certificate" in r.stdout, r.stdout + r.stderr
