"""keys.py: the key types every loader takes, key-matches-certificate, the PEM CRL block."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ed448

from mtls_proxy.cli import pki
from mtls_proxy.core.keys import CRL_PEM, is_private_key, key_matches


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_taken_key_types(key_type: str) -> None:
    assert is_private_key(pki.new_key(key_type))  # type: ignore[arg-type]


def test_other_key_types_are_not_taken() -> None:
    assert not is_private_key(dsa.generate_private_key(2048))
    assert not is_private_key(ed448.Ed448PrivateKey.generate())
    assert not is_private_key(b"-----BEGIN PRIVATE KEY-----")


def test_key_matches_its_certificate_only() -> None:
    root = pki.make_ca("r")
    leaf = pki.issue(root, "client", "c")
    assert key_matches(leaf.key, leaf.cert) and key_matches(root.key, root.cert)
    assert not key_matches(leaf.key, root.cert)


def test_crl_blocks_are_found_one_by_one() -> None:
    root = pki.make_ca("r")
    now = dt.datetime.now(dt.UTC)
    crl = pki._sign_crl(root, [], now).public_bytes(serialization.Encoding.PEM)
    blocks = CRL_PEM.findall(b"junk\n" + crl + crl + b"tail")
    assert blocks == [crl.strip(), crl.strip()]
