"""PURE. The identity-header dialects other upstreams already read: RFC 9440, Tomcat, Traefik.

Rules:
1. Every value is printable ASCII without CR/LF: base64, hex, URL-escaping or RFC 8941 byte
   sequences; nothing from a certificate is copied raw.
2. Peer-only parts are computed once per certificate (the caller caches them); the TLS
   parameters (cipher, session id) and the client-sent chain are per connection.
"""

from __future__ import annotations

import base64
from typing import Final
from urllib.parse import quote

from cryptography import x509
from cryptography.x509.oid import NameOID

from mtls_proxy.core.identity import PeerIdentity

TOMCAT_CERT: Final = "ssl_client_cert"
_PEM_BEGIN: Final = "-----BEGIN CERTIFICATE-----"
_PEM_END: Final = "-----END CERTIFICATE-----"


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode("ascii")


def rfc9440(peer: PeerIdentity) -> list[tuple[str, str]]:
    """RFC 9440 §2.2: ``Client-Cert`` as an RFC 8941 byte sequence of the leaf's DER."""
    return [("Client-Cert", f":{_b64(peer.der)}:")]


def rfc9440_chain(chain: tuple[bytes, ...]) -> list[tuple[str, str]]:
    """RFC 9440 §2.3: ``Client-Cert-Chain``, the certificates the client sent after its leaf."""
    if not chain:
        return []
    return [("Client-Cert-Chain", ", ".join(f":{_b64(der)}:" for der in chain))]


def tomcat(peer: PeerIdentity) -> list[tuple[str, str]]:
    """What Tomcat's SSLValve reads: the PEM with spaces for line breaks (the valve cuts the
    27-character BEGIN line and the 25-character END line and turns spaces back into newlines)."""
    return [(TOMCAT_CERT, f"{_PEM_BEGIN} {_b64(peer.der)} {_PEM_END}")]


def tomcat_tls(
    cipher: str | None, session_id: bytes | None, bits: int | None
) -> list[tuple[str, str]]:
    """SSLValve's other headers: cipher suite, session id (hex) and key size."""
    out: list[tuple[str, str]] = []
    if cipher:
        out.append(("ssl_cipher", cipher.encode("ascii", "replace").decode()))
    if session_id:
        out.append(("ssl_session_id", session_id.hex()))
    if bits:
        out.append(("ssl_cipher_usekeysize", str(bits)))
    return out


# Traefik's DN layout (passtlsclientcert): a fixed attribute order, each value repeated per
# occurrence, joined with commas; not RFC 2253.
_TRAEFIK_DN: Final = (
    (NameOID.DOMAIN_COMPONENT, "DC"),
    (NameOID.COUNTRY_NAME, "C"),
    (NameOID.STATE_OR_PROVINCE_NAME, "ST"),
    (NameOID.LOCALITY_NAME, "L"),
    (NameOID.ORGANIZATION_NAME, "O"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"),
    (NameOID.SERIAL_NUMBER, "SerialNumber"),
    (NameOID.COMMON_NAME, "CN"),
)


def _traefik_value(value: str) -> str:
    """One value inside a quoted, comma-separated field: '\\', '"', ',' and ';' are
    backslash-escaped and control bytes written as \\XX, so that a CN such as
    ``x";SAN="spiffe://td/admin`` cannot add a field or a list element once the consumer has
    URL-decoded the header (INT-033; the other dialects escape the same characters)."""
    out = []
    for ch in value:
        if ch in '\\",;':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def _traefik_dn(name: x509.Name) -> str:
    parts = [
        f"{short}={_traefik_value(str(a.value))}"
        for oid, short in _TRAEFIK_DN
        for a in name.get_attributes_for_oid(oid)
    ]
    return ",".join(parts)


def traefik(peer: PeerIdentity) -> list[tuple[str, str]]:
    """``X-Forwarded-Tls-Client-Cert`` (the PEM body: base64 without BEGIN/END lines and line
    breaks, not URL-escaped) and ``-Info`` (URL-escaped
    ``Subject="..";Issuer="..";NB="..";NA="..";SAN=".."``), as Traefik v3 sends them. Traefik
    v2 URL-escaped the certificate too; v3 dropped that, and apps decode v3's form (base64 is
    printable ASCII already, rule 1)."""
    cert = x509.load_der_x509_certificate(peer.der)
    sans = [*peer.dns, *peer.email, *peer.ip, *peer.uri]
    info = (
        f'Subject="{_traefik_dn(cert.subject)}";Issuer="{_traefik_dn(cert.issuer)}";'
        f'NB="{int(cert.not_valid_before_utc.timestamp())}";'
        f'NA="{int(cert.not_valid_after_utc.timestamp())}";'
        f'SAN="{",".join(_traefik_value(v) for v in sans)}"'
    )
    return [
        ("X-Forwarded-Tls-Client-Cert", _b64(peer.der)),
        ("X-Forwarded-Tls-Client-Cert-Info", quote(info, safe="")),
    ]
