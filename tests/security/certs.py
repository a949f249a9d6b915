"""The certificate fixture zoo of docs/security.md, built at test time with cryptography (and
the openssl CLI for the SHA-1 leaf, which cryptography refuses to sign)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
from cryptography.x509.oid import NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
SPIFFE = "spiffe://test.local/ns/default/sa/client"


def name(cn: str, *extra: x509.NameAttribute) -> x509.Name:
    return x509.Name([*extra, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ku(sign: bool = True, certsign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certsign,
        crl_sign=certsign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class Cert:
    cert: x509.Certificate
    key: Key
    chain: list[x509.Certificate] = field(default_factory=list)  # sent after the leaf


def ca(
    subject: x509.Name,
    issuer: Cert | None = None,
    *,
    pathlen: int | None = None,
    nc: x509.NameConstraints | None = None,
    nb: dt.datetime | None = None,
    na: dt.datetime | None = None,
    key: Key | None = None,
) -> Cert:
    key = key or ec_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb or NOW - DAY)
        .not_valid_after(na or NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(ku(certsign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if nc:
        b = b.add_extension(nc, critical=True)
    return Cert(b.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def leaf(
    issuer: Cert,
    subject: x509.Name | None = None,
    *,
    eku: Sequence[x509.ObjectIdentifier] = (EKU.CLIENT_AUTH,),
    sans: Sequence[x509.GeneralName] | None = None,
    nb: dt.datetime | None = None,
    na: dt.datetime | None = None,
    key_usage: x509.KeyUsage | None = None,
    ca_flag: bool = False,
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
    key: Key | None = None,
    chain: Sequence[Cert] = (),
) -> Cert:
    key = key or ec_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject or name("client"))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb or NOW - DAY)
        .not_valid_after(na or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(key_usage or ku(), critical=True)
    )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    sans = [x509.UniformResourceIdentifier(SPIFFE)] if sans is None else sans
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for ext, crit in extra:
        b = b.add_extension(ext, critical=crit)
    return Cert(b.sign(issuer.key, hashes.SHA256()), key, [c.cert for c in chain])


def pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def write(d: Path, label: str, c: Cert) -> tuple[str, str]:
    """DIR/label.crt (leaf + chain) and DIR/label.key; returns both paths."""
    crt, key = d / f"{label}.crt", d / f"{label}.key"
    crt.write_bytes(pem(c.cert) + b"".join(pem(x) for x in c.chain))
    key.write_bytes(
        c.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(crt), str(key)


def sha1_leaf(d: Path, root_crt: Path, root_key: Path) -> tuple[str, str]:
    """TLS-028: cryptography refuses to sign with SHA-1; the openssl CLI still does."""
    key, csr, ext, crt = (d / f"sha1.{x}" for x in ("key", "csr", "ext", "crt"))
    run = ["openssl"]
    subprocess.run(
        [*run, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)], check=True
    )
    subprocess.run(
        [*run, "req", "-new", "-key", str(key), "-subj", "/CN=client", "-out", str(csr)], check=True
    )
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=clientAuth\nsubjectAltName=URI:{SPIFFE}\n"
    )
    subprocess.run(
        [
            *run,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(root_crt),
            "-CAkey",
            str(root_key),
            "-CAcreateserial",
            "-days",
            "30",
            "-sha1",
            "-extfile",
            str(ext),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    return str(crt), str(key)


def server(root: Cert) -> Cert:
    return leaf(
        root,
        name("proxy.test"),
        eku=(EKU.SERVER_AUTH,),
        sans=[
            x509.DNSName("proxy.test"),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
