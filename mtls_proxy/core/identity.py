"""PURE. The peer identity, extracted once per connection from the leaf certificate's DER.

Subject strings are rendered exactly as OpenSSL prints them with ``XN_FLAG_RFC2253`` (what nginx's
``$ssl_client_s_dn`` and Envoy show): last RDN first, RFC 2253 escapes, and every control or
non-ASCII byte of the UTF-8 form written as ``\\XX``. The result is always pure ASCII, so it is
safe in a header value.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

# OpenSSL's short names (XN_FLAG_FN_SN) for the attribute types it knows.
_SHORT_NAMES: Final[dict[str, str]] = {
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "title",
    "2.5.4.13": "description",
    "2.5.4.15": "businessCategory",
    "2.5.4.17": "postalCode",
    "2.5.4.41": "name",
    "2.5.4.42": "GN",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.45": "x500UniqueIdentifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym",
    "2.5.4.72": "role",
    "2.5.4.97": "organizationIdentifier",
    "1.2.840.113549.1.9.1": "emailAddress",
    "1.2.840.113549.1.9.2": "unstructuredName",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL",
    "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
}
# RFC 2253 §2.4 specials, escaped with a backslash anywhere in a value.
_SPECIALS: Final = frozenset(',+"\\<>;')


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Everything policy and header encoders may know about a client certificate."""

    subject: str
    cn: tuple[str, ...] = ()
    o: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    sha256: str = ""
    der: bytes = b""
    not_after: dt.datetime | None = None

    @property
    def spiffe_id(self) -> str | None:
        """The first ``spiffe://`` URI SAN, if any."""
        return next((u for u in self.uri if u.startswith("spiffe://")), None)


def escape_value(value: str) -> str:
    """Escape one attribute value the way OpenSSL's ASN1_STRFLGS_RFC2253 does."""
    raw = value.encode("utf-8", "surrogatepass")
    out: list[str] = []
    last = len(raw) - 1
    for i, b in enumerate(raw):
        c = chr(b)
        if b < 0x20 or b >= 0x7F:
            out.append(f"\\{b:02X}")
        elif c in _SPECIALS or (i == 0 and c in "# ") or (i == last and c == " "):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _attribute_der(attr: x509.NameAttribute[str | bytes]) -> bytes:
    """Re-encode an attribute value as DER (for OpenSSL's '#hex' dump of unknown types)."""
    value = attr.value
    if isinstance(value, str):
        tag = attr._type.value
        body = value.encode("utf-16-be" if tag == 30 else "utf-8")
    else:
        tag, body = 3, value
    n = len(body)
    length = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + body


def rfc2253(name: x509.Name) -> str:
    """Render *name* like OpenSSL's ``X509_NAME_print_ex(..., XN_FLAG_RFC2253)``."""
    rdns: list[str] = []
    for rdn in reversed(list(name.rdns)):
        parts: list[str] = []
        for attr in reversed(list(rdn)):
            short = _SHORT_NAMES.get(attr.oid.dotted_string)
            if short is None or not isinstance(attr.value, str):
                # XN_FLAG_DUMP_UNKNOWN_FIELDS: dotted OID and the DER value in hex.
                label = short or attr.oid.dotted_string
                parts.append(f"{label}=#{_attribute_der(attr).hex().upper()}")
            else:
                parts.append(f"{short}={escape_value(attr.value)}")
        rdns.append("+".join(parts))
    return ",".join(rdns)


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(str(a.value) for a in name.get_attributes_for_oid(oid))


@lru_cache(maxsize=4096)
def identity_from_der(der: bytes) -> PeerIdentity:
    """Parse a DER certificate into a PeerIdentity (cached: clients reconnect with one cert)."""
    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass  # no SANs: every SAN rule simply fails to match (fail closed)
    else:
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uri = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        email = tuple(san.get_values_for_type(x509.RFC822Name))
        ip = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    return PeerIdentity(
        subject=rfc2253(subject),
        cn=_values(subject, NameOID.COMMON_NAME),
        o=_values(subject, NameOID.ORGANIZATION_NAME),
        ou=_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        dns=dns,
        uri=uri,
        email=email,
        ip=ip,
        sha256=hashlib.sha256(der).hexdigest(),
        der=der,
        not_after=cert.not_valid_after_utc,
    )
