"""TrustView: the re-check of verified chains after a reload (anchors removed, CRLs added)."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mtls_proxy import pki
from mtls_proxy.revocation import TrustView


def crl(
    ca: pki.Issued, serials: list[int], key_of: pki.Issued | None = None
) -> x509.CertificateRevocationList:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
    )
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build()
        )
    return b.sign((key_of or ca).key, hashes.SHA256())  # type: ignore[arg-type]


ROOT = pki.make_ca("root")
INTER = pki.make_ca("inter", issuer=ROOT, path_len=0)
LEAF = pki.issue(INTER, "client", "leaf")
CHAIN = [LEAF.cert, INTER.cert, ROOT.cert]


def test_unchanged_trust_accepts() -> None:
    assert TrustView.build([ROOT.cert], []).refuses(CHAIN) is None
    assert TrustView.build([ROOT.cert], []).refuses([]) is None


def test_removed_anchor_refuses() -> None:
    other = pki.make_ca("other root")
    assert TrustView.build([other.cert], []).refuses(CHAIN) == "unknown_ca"
    # Same subject, another key: not the same CA.
    impostor = pki.make_ca("root")
    assert TrustView.build([impostor.cert], []).refuses(CHAIN) == "unknown_ca"
    # An intermediate trusted directly is an anchor too.
    assert TrustView.build([INTER.cert], []).refuses(CHAIN) is None


def test_revoked_leaf_and_intermediate() -> None:
    leaf_crl = crl(INTER, [LEAF.cert.serial_number])
    assert TrustView.build([ROOT.cert], [leaf_crl]).refuses(CHAIN) == "revoked"
    inter_crl = crl(ROOT, [INTER.cert.serial_number])
    assert TrustView.build([ROOT.cert], [inter_crl]).refuses(CHAIN) == "revoked"
    # leaf mode: only the leaf's issuer's CRL counts.
    assert TrustView.build([ROOT.cert], [inter_crl], leaf_only=True).refuses(CHAIN) is None
    assert TrustView.build([ROOT.cert], [crl(INTER, [12345])]).refuses(CHAIN) is None


def test_crl_with_a_bad_signature_revokes_nothing() -> None:
    forged = crl(INTER, [LEAF.cert.serial_number], key_of=pki.make_ca("inter"))
    assert TrustView.build([ROOT.cert], [forged]).refuses(CHAIN) is None


def test_strict_refusals() -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from mtls_proxy.strict import strict_refusal

    assert strict_refusal(LEAF.cert) is None
    assert "CA" in str(strict_refusal(INTER.cert))
    no_eku = pki.issue(INTER, "client", "x", eku=[])
    assert "no extendedKeyUsage" in str(strict_refusal(no_eku.cert))
    server_only = pki.issue(INTER, "client", "x", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert "without clientAuth" in str(strict_refusal(server_only.cert))


def test_strict_refuses_x509_v1(tmp_path: Path) -> None:
    from mtls_proxy.strict import strict_refusal

    pki.write_pair(tmp_path, "ca", ROOT)
    run = ["openssl"]
    subprocess.run(
        [
            *run,
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(tmp_path / "v1.key"),
            "-subj",
            "/CN=v1",
            "-out",
            str(tmp_path / "v1.csr"),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run,
            "x509",
            "-req",
            "-in",
            str(tmp_path / "v1.csr"),
            "-CA",
            str(tmp_path / "ca.crt"),
            "-CAkey",
            str(tmp_path / "ca.key"),
            "-CAcreateserial",
            "-days",
            "3",
            "-out",
            str(tmp_path / "v1.crt"),
        ],
        check=True,
        capture_output=True,
    )
    v1 = x509.load_pem_x509_certificate((tmp_path / "v1.crt").read_bytes())
    assert strict_refusal(v1) == "X.509 v1 certificate"


def test_strict_accepts_a_v3_leaf_without_basic_constraints() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from mtls_proxy.strict import strict_refusal

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")]))
        .issuer_name(INTER.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(INTER.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    assert strict_refusal(cert) is None
