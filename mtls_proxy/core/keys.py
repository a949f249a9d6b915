"""PURE. What every loader of key material agrees on: the private key types the proxy takes, when
a key belongs to a certificate, and how a PEM CRL block looks. No I/O: callers read the bytes
and word the errors (naming their option and file).
"""

from __future__ import annotations

import re
from typing import Final, TypeGuard

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
# One PEM CRL; a file may hold several (one per CA), in any order.
CRL_PEM: Final = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def is_private_key(key: object) -> TypeGuard[PrivateKey]:
    """True for an ECDSA, RSA or Ed25519 private key: the types a server or client key may be."""
    return isinstance(key, PrivateKey)


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """True when *key* is the private half of *cert*'s public key (SubjectPublicKeyInfo equal)."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
