"""PURE. --strict-client-certs: leaves that OpenSSL accepts but strict PKIs refuse.

OpenSSL (and so Envoy, nginx and ghostunnel) accepts a client leaf without an EKU extension, a
leaf that is itself a CA, and X.509 v1 certificates; RFC 5280 allows them, the CA/Browser
Forum's rules and webpki do not (docs/security.md, TLS-013, TLS-015). With the option on, the proxy
refuses them right after the handshake, before any request is read.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID


def strict_refusal(cert: x509.Certificate) -> str | None:
    """Why a strict deployment refuses *cert* as a client identity, or None."""
    if cert.version is not x509.Version.v3:
        return "X.509 v1 certificate"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        return "the certificate is a CA (basicConstraints CA:TRUE)"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "no extendedKeyUsage extension (clientAuth required)"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return "extendedKeyUsage without clientAuth"
    return None
