"""The dev PKI writes certificates with the extensions strict verifiers expect."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtls_proxy.cli import pki


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_extensions(key_type: str) -> None:
    root = pki.make_ca("r", key_type=key_type)  # type: ignore[arg-type]
    inter = pki.make_ca("i", key_type=key_type, issuer=root, path_len=0)  # type: ignore[arg-type]
    server = pki.issue(inter, "server", "s", dns=["s.test"], key_type=key_type)  # type: ignore[arg-type]
    client = pki.issue(inter, "client", "c", uris=["spiffe://t/c"], key_type=key_type)  # type: ignore[arg-type]
    ext = inter.cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ext.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == (
        root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    for leaf, eku in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        e = leaf.cert.extensions
        assert not e.get_extension_for_class(x509.BasicConstraints).value.ca
        assert e.get_extension_for_class(x509.KeyUsage).value.digital_signature
        assert list(e.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        assert e.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert leaf.chain == (inter.cert,)
