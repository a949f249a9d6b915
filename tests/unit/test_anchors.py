"""anchors.py (pure): what a CA bundle's certificates can do as trust anchors (issue 14 item 2)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mtls_proxy.material import anchors
from tests.security import certs as c
from tests.security.certs import DAY, NOW

ROOT = c.ca(c.name("Root"))
INTER = c.ca(c.name("Inter"), ROOT, pathlen=0)
LEAF = c.leaf(INTER)


def _no_certsign_ca() -> x509.Certificate:
    """basicConstraints CA:TRUE, but a keyUsage without keyCertSign."""
    key = c.ec_key()
    return (
        x509.CertificateBuilder()
        .subject_name(c.name("Signs nothing"))
        .issuer_name(c.name("Signs nothing"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(c.ku(sign=True, certsign=False), critical=True)
        .sign(key, hashes.SHA256())
    )


def _ca_without_key_usage() -> x509.Certificate:
    key = c.ec_key()
    return (
        x509.CertificateBuilder()
        .subject_name(c.name("No KU"))
        .issuer_name(c.name("No KU"))
        .public_key(key.public_key())
        .serial_number(3)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _no_bc() -> x509.Certificate:
    key = c.ec_key()
    return (
        x509.CertificateBuilder()
        .subject_name(c.name("No BC"))
        .issuer_name(c.name("No BC"))
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("cert", "problem"),
    [
        (ROOT.cert, None),
        (INTER.cert, None),
        (LEAF.cert, "CA:FALSE"),
        (c.leaf(ROOT, ca_flag=True, key_usage=c.ku(certsign=True)).cert, None),
        (_no_certsign_ca(), "keyCertSign"),
        (_ca_without_key_usage(), None),
        (_no_bc(), "no basicConstraints"),
    ],
    ids=["root", "intermediate", "leaf", "CA leaf", "no keyCertSign", "no keyUsage", "no BC"],
)
def test_only_ca_certificates_can_be_trust_anchors(
    cert: x509.Certificate, problem: str | None
) -> None:
    why = anchors.not_a_ca(cert)
    assert (why is None) if problem is None else (why is not None and problem in why), why


def test_describe_tells_roots_from_intermediates() -> None:
    root, inter = anchors.describe(ROOT.cert), anchors.describe(INTER.cert)
    assert root.self_signed and root.subject == "CN=Root" and root.ca_problem is None
    assert not inter.self_signed and inter.issuer == "CN=Root"
    assert root.valid_at(NOW) and not root.valid_at(NOW + 400 * DAY)
    assert anchors.describe(LEAF.cert).ca_problem is not None
    assert root.unreadable is None
    spoof = c.ca(c.name("Root"), ROOT)  # issuer name == subject, signed by another key
    assert not anchors.describe(spoof.cert).self_signed


def test_reaches_root_follows_names_and_signatures_within_the_bundle() -> None:
    sub = c.ca(c.name("Sub"), INTER)
    assert anchors.reaches_root(sub.cert, [ROOT.cert, INTER.cert, sub.cert], NOW)
    assert not anchors.reaches_root(sub.cert, [INTER.cert, sub.cert], NOW)
    other_root = c.ca(c.name("Root"))  # same name, other key: not the issuer
    assert not anchors.reaches_root(INTER.cert, [other_root.cert, INTER.cert], NOW)
    old_root = c.ca(c.name("Old"), nb=NOW - 10 * DAY, na=NOW - DAY)
    old_inter = c.ca(c.name("Old inter"), old_root)
    assert not anchors.reaches_root(old_inter.cert, [old_root.cert, old_inter.cert], NOW)


@pytest.mark.parametrize(
    ("bundle", "mode", "needle"),
    [
        ([], "any", "no certificate"),
        ([c.ca(c.name("Old"), nb=NOW - 10 * DAY, na=NOW - DAY).cert], "any", "validity"),
        ([c.ca(c.name("Later"), nb=NOW + DAY, na=NOW + 10 * DAY).cert], "roots", "validity"),
        ([INTER.cert], "roots", "--trust-anchors roots"),
        ([INTER.cert], "any", None),
        ([ROOT.cert], "roots", None),
        ([ROOT.cert, INTER.cert], "roots", None),
    ],
    ids=["empty", "expired", "not yet valid", "roots: intermediate only", "any: intermediate",
         "roots: root", "roots: root + intermediate"],
)  # fmt: skip
def test_unusable_says_why_no_client_can_be_verified(
    bundle: list[x509.Certificate], mode: str, needle: str | None
) -> None:
    why = anchors.unusable(bundle, mode, NOW)
    assert (why is None) if needle is None else (why is not None and needle in why), why


def test_unusable_defaults_to_now() -> None:
    assert anchors.unusable([ROOT.cert], "any") is None
    assert anchors.unusable([c.ca(c.name("Old"), na=NOW - dt.timedelta(hours=1)).cert], "any")


def test_bundle_problem_names_the_first_certificate_that_is_not_a_ca() -> None:
    assert anchors.bundle_problem([ROOT.cert, INTER.cert]) is None
    why = anchors.bundle_problem([ROOT.cert, LEAF.cert])
    assert why is not None and why.startswith("certificate 2 of 2 (CN=client) is not a CA: ")


@pytest.mark.parametrize(
    ("bundle", "crl_check", "mode", "refused"),
    [
        ([ROOT.cert, INTER.cert], "chain", "any", True),
        ([INTER.cert], "chain", "any", True),
        ([ROOT.cert], "chain", "any", False),
        ([ROOT.cert, INTER.cert], "chain", "roots", False),
        ([ROOT.cert, INTER.cert], "leaf", "any", False),
    ],
)
def test_crl_chain_mode_refuses_intermediate_anchors_with_partial_chains(
    bundle: list[x509.Certificate], crl_check: str, mode: str, refused: bool
) -> None:
    why = anchors.crl_chain_problem(bundle, crl_check, mode)
    assert (why is not None) is refused
    if why:
        assert "(CN=Inter)" in why and "--crl-check leaf" in why


def _limbo_trusted(case_id: str) -> x509.Certificate:
    data = json.loads(
        (Path(__file__).parents[1] / "data/x509-limbo/limbo-client-subset.json").read_text()
    )
    (case,) = [t for t in data["testcases"] if t["id"] == case_id]
    return x509.load_pem_x509_certificate(case["trusted_certs"][0].encode())


def test_a_ca_cryptography_cannot_read_is_left_to_openssl() -> None:
    """A name constraint with a '*' DNS name: OpenSSL reads it, cryptography refuses it."""
    odd = _limbo_trusted("rfc5280::nc::invalid-dnsname-wildcard")
    assert anchors.unreadable(odd) is not None
    assert anchors.not_a_ca(odd) is None and anchors.bundle_problem([odd]) is None
    (line,) = anchors.report([odd], "any", NOW)
    assert "extensions not readable here" in line and "OpenSSL decides" in line


def test_report_lists_each_certificate() -> None:
    old = c.ca(c.name("Old"), nb=NOW - 10 * DAY, na=NOW - DAY)
    lonely = c.ca(c.name("Lonely"), c.ca(c.name("Elsewhere")))
    lines = anchors.report([ROOT.cert, INTER.cert, old.cert, lonely.cert, LEAF.cert], "roots", NOW)
    root, inter, expired, unused, leaf = lines
    assert root.startswith("CN=Root: self-signed root, CA, valid until ")
    assert inter.startswith("CN=Inter: issued by CN=Root, CA, valid until ")
    assert not inter.endswith("(its root is not in the bundle)")
    assert "NOT VALID NOW (" in expired
    assert unused.endswith("; unused with --trust-anchors roots (its root is not in the bundle)")
    assert "NOT A CA (basicConstraints CA:FALSE" in leaf
    assert not any("unused" in x for x in anchors.report([lonely.cert], "any", NOW))
