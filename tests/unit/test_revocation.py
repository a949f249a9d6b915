"""TrustView: the re-check of verified chains after a reload (anchors removed, CRLs added), and
the CRL checks after each handshake with --crl-expired allow (needs_crls)."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtls_proxy.cli import pki
from mtls_proxy.core import revocation
from mtls_proxy.core.revocation import TrustView


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
    return b.sign((key_of or ca).key, hashes.SHA256())


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
    # An intermediate trusted directly is an anchor too (--trust-anchors any) ...
    assert TrustView.build([INTER.cert], []).refuses(CHAIN) is None
    # ... but not with --trust-anchors roots: OpenSSL wants the chain's root in the bundle.
    other_root = [other.cert, INTER.cert]
    assert TrustView.build(other_root, [], roots_only=True).refuses(CHAIN) == "unknown_ca"
    assert TrustView.build([ROOT.cert], [], roots_only=True).refuses(CHAIN) is None


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


def test_after_a_handshake_a_ca_without_a_crl_fails_closed() -> None:
    """INT-050 (rule 6): a stale CRL allowed relaxes its own CA only; every other CA that
    OpenSSL's chain/leaf mode would check still needs a CRL."""
    root_crl, inter_crl = crl(ROOT, []), crl(INTER, [])
    for crls, leaf_only, refused in [
        ([root_crl], False, "other"),  # the intermediate has none
        ([inter_crl], False, "other"),  # the root (checked for the intermediate) has none
        ([root_crl, inter_crl], False, None),
        ([inter_crl], True, None),  # leaf mode: the leaf's issuer only
        ([root_crl], True, "other"),
    ]:
        view = TrustView.build([ROOT.cert], crls, leaf_only=leaf_only, needs_crls=True)
        assert view.refuses(CHAIN) == refused
        # Rule 7: an open connection is not cut for a CRL that is merely missing.
        assert TrustView.build([ROOT.cert], crls, leaf_only=leaf_only).refuses(CHAIN) is None
    # A client of the root itself needs the root's CRL only.
    direct = [pki.issue(ROOT, "client", "direct").cert, ROOT.cert]
    assert TrustView.build([ROOT.cert], [root_crl], needs_crls=True).refuses(direct) is None
    # No client certificate: nothing to check.
    assert TrustView.build([ROOT.cert], [], needs_crls=True).refuses([]) is None


def test_revoked_is_reported_before_a_missing_crl() -> None:
    view = TrustView.build([ROOT.cert], [crl(INTER, [LEAF.cert.serial_number])], needs_crls=True)
    assert view.refuses(CHAIN) == "revoked"


def test_forged_crl_does_not_stand_in_for_a_missing_one() -> None:
    forged = crl(INTER, [], key_of=pki.make_ca("inter"))
    view = TrustView.build([ROOT.cert], [crl(ROOT, []), forged], needs_crls=True)
    assert view.refuses(CHAIN) == "other"


def test_anchor_on_its_own_crl_is_revoked_in_chain_mode() -> None:
    """OpenSSL's CRL_CHECK_ALL checks the self-signed anchor against its own CRL too."""
    own = crl(ROOT, [ROOT.cert.serial_number])
    assert TrustView.build([ROOT.cert], [own, crl(INTER, [])]).refuses(CHAIN) == "revoked"
    assert TrustView.build([ROOT.cert], [own], leaf_only=True).refuses(CHAIN) is None


def _intermediate(usage: x509.KeyUsage | None) -> pki.Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no crl sign")]))
        .issuer_name(ROOT.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if usage is not None:
        b = b.add_extension(usage, critical=True)
    return pki.Issued(b.sign(ROOT.key, hashes.SHA256()), key, (ROOT.cert,))


def test_a_crl_counts_only_from_an_issuer_allowed_to_sign_crls() -> None:
    """Rule 4, OpenSSL's X509_V_ERR_KEYUSAGE_NO_CRL_SIGN: keyUsage without cRLSign."""
    cert_sign_only = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    for usage, counts in [(cert_sign_only, False), (None, True)]:
        inter = _intermediate(usage)
        leaf = pki.issue(inter, "client", "leaf")
        chain = [leaf.cert, inter.cert, ROOT.cert]
        revoking = crl(inter, [leaf.cert.serial_number])
        view = TrustView.build([ROOT.cert], [crl(ROOT, []), revoking], needs_crls=True)
        assert view.refuses(chain) == ("revoked" if counts else "other")
        assert view.revoked(chain) is counts


def test_verified_crls_are_remembered_per_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    view = TrustView.build([ROOT.cert], [crl(ROOT, []), crl(INTER, [])], needs_crls=True)
    assert view.refuses(CHAIN) is None
    assert len(view._counting) == 2  # (inter, by the root), (leaf, by inter); the root's reused
    assert view.refuses(CHAIN) is None
    monkeypatch.setattr(revocation, "_CACHE_LIMIT", 1)
    other = pki.make_ca("inter", issuer=ROOT, path_len=0)  # same name, another key
    assert view.refuses([pki.issue(other, "client", "x").cert, other.cert, ROOT.cert]) == "other"
    assert len(view._counting) == 1  # bounded: emptied when full


def test_strict_refusals() -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from mtls_proxy.core.strict import strict_refusal

    assert strict_refusal(LEAF.cert) is None
    assert "CA" in str(strict_refusal(INTER.cert))
    no_eku = pki.issue(INTER, "client", "x", eku=[])
    assert "no extendedKeyUsage" in str(strict_refusal(no_eku.cert))
    server_only = pki.issue(INTER, "client", "x", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert "without clientAuth" in str(strict_refusal(server_only.cert))


def test_strict_refuses_x509_v1(tmp_path: Path) -> None:
    from mtls_proxy.core.strict import strict_refusal

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

    from mtls_proxy.core.strict import strict_refusal

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
        .sign(INTER.key, hashes.SHA256())
    )
    assert strict_refusal(cert) is None
