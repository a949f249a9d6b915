"""A small development PKI: root -> intermediate -> server/client leaves, with correct extensions.

Used by ``mtls-proxy pki``, the demo and the test-suite (trustme cannot make URI SANs).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtls_proxy.core.keys import CRL_PEM, PrivateKey, is_private_key

KeyType = Literal["ec", "rsa", "ed25519"]
_DAY = dt.timedelta(days=1)


def new_key(key_type: KeyType = "ec") -> PrivateKey:
    """A fresh private key: ECDSA P-256, RSA-2048 or Ed25519."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclass(frozen=True)
class Issued:
    """A certificate with its key, and the chain above it (issuer first, root excluded)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self, with_chain: bool = True) -> bytes:
        """The certificate in PEM, followed by its intermediates."""
        certs = (self.cert, *self.chain) if with_chain else (self.cert,)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self, password: bytes | None = None) -> bytes:
        """The private key in PKCS#8 PEM, encrypted when *password* is given."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )


def _name(cn: str, o: str | None = None, ou: Sequence[str] = ()) -> x509.Name:
    # Most-significant first in DER (O, OU..., CN), so RFC 2253 prints CN first.
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o)] if o else []
    attrs.extend(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in ou)
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _key_usage(*, ca: bool, key_type_rsa: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=key_type_rsa and not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    cn: str = "mtls-proxy dev root",
    *,
    key_type: KeyType = "ec",
    days: int = 3650,
    issuer: Issued | None = None,
    path_len: int | None = None,
) -> Issued:
    """A root CA (issuer None) or an intermediate CA signed by *issuer*."""
    key = new_key(key_type)
    now = dt.datetime.now(dt.UTC)
    sign_key = issuer.key if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, "mtls-proxy dev"))
        .issuer_name(issuer.cert.subject if issuer else _name(cn, "mtls-proxy dev"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + days * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    cert = b.sign(sign_key, _hash_for(sign_key))
    chain = (issuer.cert, *issuer.chain) if issuer else ()
    # A root is never part of a chain we send; drop the self-signed tail.
    return Issued(cert, key, tuple(c for c in chain if c.issuer != c.subject))


def issue(
    issuer: Issued,
    kind: Literal["server", "client"],
    cn: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    emails: Sequence[str] = (),
    o: str | None = None,
    ou: Sequence[str] = (),
    days: int = 825,
    key_type: KeyType = "ec",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = None,
) -> Issued:
    """A leaf certificate for a server or a client, signed by *issuer*."""
    key = new_key(key_type)
    now = dt.datetime.now(dt.UTC)
    nb = not_before or now - _DAY
    na = not_after or now + days * _DAY
    if eku is None:
        eku = [
            ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        ]
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.RFC822Name(e) for e in emails]
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, o, ou))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, key_type_rsa=key_type == "rsa"), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(issuer.key, _hash_for(issuer.key))
    chain = (issuer.cert, *issuer.chain) if issuer.cert.issuer != issuer.cert.subject else ()
    return Issued(cert, key, chain)


def write_private(path: Path, data: bytes) -> None:
    """Write *data* to *path* with mode 0600 from the start (no window where it is readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


def write_pair(directory: Path, name: str, item: Issued, password: bytes | None = None) -> None:
    """Write DIR/NAME.crt (leaf + intermediates) and DIR/NAME.key (0600)."""
    (directory / f"{name}.crt").write_bytes(item.cert_pem())
    write_private(directory / f"{name}.key", item.key_pem(password))


def load_issuer(directory: Path) -> Issued:
    """Load DIR/intermediate.{crt,key} written by init_pki (the issuer of leaves)."""
    return load_issued(directory, "intermediate")


def init_pki(directory: Path, key_type: KeyType = "ec") -> tuple[Issued, Issued]:
    """Write root.crt/key, intermediate.crt/key and ca.crt (the trust bundle) into *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    root = make_ca(key_type=key_type)
    inter = make_ca(
        "mtls-proxy dev intermediate", key_type=key_type, issuer=root, path_len=0, days=1825
    )
    write_pair(directory, "root", root)
    write_pair(directory, "intermediate", inter)
    (directory / "ca.crt").write_bytes(root.cert_pem(with_chain=False))
    return root, inter


def load_issued(directory: Path, name: str) -> Issued:
    """DIR/NAME.crt (leaf + chain) and DIR/NAME.key."""
    certs = x509.load_pem_x509_certificates((directory / f"{name}.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / f"{name}.key").read_bytes(), None)
    if not is_private_key(key):
        raise ValueError(f"{directory / (name + '.key')}: unsupported key type")
    return Issued(certs[0], key, tuple(certs[1:]))


def _sign_crl(
    ca: Issued, revoked: Sequence[x509.RevokedCertificate], now: dt.datetime, days: int = 7
) -> x509.CertificateRevocationList:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + days * _DAY)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for r in revoked:
        b = b.add_revoked_certificate(r)
    return b.sign(ca.key, _hash_for(ca.key))


def revoke(directory: Path, name: str, now: dt.datetime | None = None) -> Path:
    """Add DIR/NAME.crt's serial to DIR/crl.pem, which holds one CRL per CA: the intermediate's
    (leaves) and the root's (the intermediate; ``revoke intermediate``). Both are always written,
    so that ``--crl-check chain`` (every CA of a chain needs a CRL) works; entries are kept."""
    now = now or dt.datetime.now(dt.UTC)
    inter, root, entries = _crl_entries(directory)
    leaf = x509.load_pem_x509_certificates((directory / f"{name}.crt").read_bytes())[0]
    if leaf.issuer not in (inter.cert.subject, root.cert.subject):
        raise ValueError(f"{directory / (name + '.crt')}: not issued by this PKI's CAs")
    entries.setdefault(leaf.issuer, {}).setdefault(
        leaf.serial_number,
        x509.RevokedCertificateBuilder()
        .serial_number(leaf.serial_number)
        .revocation_date(now)
        .build(),
    )
    return _write_crls(directory, inter, root, entries, now, 7)


def refresh_crls(
    directory: Path, days: int = 7, now: dt.datetime | None = None
) -> tuple[Path, int]:
    """Re-sign DIR/crl.pem with the same revoked entries and a nextUpdate *days* out (a CRL past
    its nextUpdate makes the proxy refuse its CA's clients); returns the path and the number
    of entries. Without a crl.pem, writes empty CRLs of both CAs."""
    inter, root, entries = _crl_entries(directory)
    now = now or dt.datetime.now(dt.UTC)
    path = _write_crls(directory, inter, root, entries, now, days)
    return path, sum(len(e) for e in entries.values())


_Entries = dict[x509.Name, dict[int, x509.RevokedCertificate]]


def _crl_entries(directory: Path) -> tuple[Issued, Issued, _Entries]:
    """The two CAs and the entries already revoked in DIR/crl.pem, by issuer and serial."""
    inter = load_issuer(directory)
    root = load_issued(directory, "root")
    entries: _Entries = {inter.cert.subject: {}, root.cert.subject: {}}
    crl_path = directory / "crl.pem"
    if crl_path.exists():
        for block in CRL_PEM.findall(crl_path.read_bytes()):
            old = x509.load_pem_x509_crl(block)
            for r in old:
                entries.setdefault(old.issuer, {})[r.serial_number] = r
    return inter, root, entries


def _write_crls(
    directory: Path, inter: Issued, root: Issued, entries: _Entries, now: dt.datetime, days: int
) -> Path:
    crls = [
        _sign_crl(ca, list(entries[ca.cert.subject].values()), now, days) for ca in (inter, root)
    ]
    crl_path = directory / "crl.pem"
    crl_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    return crl_path


def export(directory: Path, name: str, fmt: str, password: str, out: Path | None = None) -> Path:
    """Write NAME's key + chain and the trust bundle as keystore.*/truststore.* (or PEM)."""
    from mtls_proxy.material import keystores

    item = load_issued(directory, name)
    ca = x509.load_pem_x509_certificates((directory / "ca.crt").read_bytes())
    out = out or directory / f"{name}-export"
    out.mkdir(parents=True, exist_ok=True)
    material = keystores.KeyMaterial(item.key, (item.cert, *item.chain))
    pw = password.encode()
    if fmt == "p12":
        write_private(out / "keystore.p12", keystores.export_pkcs12(material, pw, name.encode()))
        write_private(out / "truststore.p12", keystores.export_pkcs12_truststore(ca, pw))
    elif fmt == "jks":
        write_private(out / "keystore.jks", keystores.export_jks(material, [], pw, name))
        write_private(out / "truststore.jks", keystores.export_jks(None, ca, pw, name))
    else:
        (out / "tls.crt").write_bytes(item.cert_pem())
        write_private(out / "tls.key", item.key_pem())
        (out / "ca.crt").write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca)
        )
    return out
