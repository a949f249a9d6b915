"""The one place that loads certificate material (the SSLContexts are built from it in
contexts.py).

Rules:
1. Material is parsed and validated completely (files exist, PEM parses, key matches the
   certificate, the CA bundle holds certificates) before any context is built; a failure raises
   ConfigError naming the file, the key and the reason.
2. Client certificates are always verified against the configured CAs; nothing here disables
   verification. TLS 1.0/1.1 are never enabled; TLS 1.2 uses ECDHE + AEAD suites only.
3. Private keys and PEM bodies never reach a log line or an error message.
4. server_context is the one description of how a client is verified: the listener uses it,
   and so do ``explain`` and the tests (verify.py runs a handshake against a context it built).
   The CA bundle holds CAs only (anchors.py rule 1), whatever --trust-anchors says.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from mtls_proxy.core.config import TLSConfig
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import rfc2253
from mtls_proxy.core.keys import PrivateKey, is_private_key, key_matches
from mtls_proxy.material.anchors import bundle_problem, crl_chain_problem
from mtls_proxy.material.keystores import load_keystore, load_truststore
from mtls_proxy.material.loader import parse_crls, read_file

if TYPE_CHECKING:
    pass

# AEAD with forward secrecy only; SECLEVEL 2 (whatever the system's openssl.cnf says) refuses
# RSA keys < 2048 bits and SHA-1 signatures in client chains (TLS-028/029).


@dataclass(frozen=True, slots=True)
class Material:
    """Validated certificate material, ready to build contexts from."""

    cert_file: str  # where the certificate came from (a PEM file or a keystore), for messages
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first
    cacert_file: str | None
    ca_certs: tuple[x509.Certificate, ...]
    found: tuple[str, ...] = ()  # what --cert-dir supplied
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        """Our own certificate."""
        return self.chain[0]

    @property
    def chain_len(self) -> int:
        """Certificates we present (leaf + intermediates)."""
        return len(self.chain)

    @property
    def server_subject(self) -> str:
        """RFC 2253 subject of our own certificate."""
        return rfc2253(self.leaf.subject)

    @property
    def server_sha256(self) -> str:
        """SHA-256 of our own certificate's DER."""
        return hashlib.sha256(self.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def server_uri(self) -> str | None:
        """Our first URI SAN: XFCC's ``By``."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        return uris[0] if uris else None

    @property
    def not_after(self) -> dt.datetime:
        """Expiry of our own certificate."""
        return self.leaf.not_valid_after_utc

    @property
    def crl_next_update(self) -> dt.datetime | None:
        """The earliest nextUpdate among the CRLs (a CRL without one never goes stale)."""
        return min(
            (c.next_update_utc for c in self.crls if c.next_update_utc is not None), default=None
        )

    def crls_expired(self, now: dt.datetime | None = None) -> bool:
        """True when a CRL is past its nextUpdate: OpenSSL refuses its CA's clients then."""
        nu = self.crl_next_update
        return nu is not None and nu <= (now or dt.datetime.now(dt.UTC))

    @property
    def ca_not_after(self) -> dt.datetime | None:
        """The earliest expiry among the trusted CAs."""
        return min((c.not_valid_after_utc for c in self.ca_certs), default=None)


def _certs(data: bytes, path: str, key: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        try:
            x509.load_der_x509_certificate(data)
        except ValueError:
            pass
        else:  # the binary form (a .cer/.der from Windows or Java): name it and the way out
            raise ConfigError(
                f"{key}: {path}: a DER (binary) certificate; PEM is needed: convert it with "
                f"'openssl x509 -inform der -in {path} -out {path}.pem'"
            )
        raise ConfigError(
            f"{key}: {path}: not a PEM certificate file (no parsable "
            "'-----BEGIN CERTIFICATE-----' block)"
        )
    return certs


def resolve_password(secret: str | None, key: str) -> bytes | None:
    """A password given literally or as ``file:/path`` (``${ENV}`` is resolved by config)."""
    if secret is None:
        return None
    if secret.startswith("file:"):
        return read_file(secret[5:], key, "password").rstrip(b"\r\n")
    return secret.encode()


# cert-manager / Kubernetes secret keys, in the order they are preferred.
CERT_DIR_NAMES = (
    "tls.crt",
    "tls.key",
    "ca.crt",
    "keystore.p12",
    "keystore.jks",
    "truststore.p12",
    "truststore.jks",
)


def from_cert_dir(tls: TLSConfig, src: dict[str, str]) -> tuple[TLSConfig, tuple[str, ...]]:
    """Fill unset file options from a secret mount by the well-known names."""
    where = src.get("cert-dir", "--cert-dir")
    d = Path(str(tls.cert_dir))
    if not d.is_dir():
        raise ConfigError(f"{where}: {d}: not a directory")
    present = {n: str(d / n) for n in CERT_DIR_NAMES if (d / n).is_file()}
    changes: dict[str, str] = {}
    if tls.cert is None and tls.keystore is None:
        if "tls.crt" in present and "tls.key" in present:
            changes |= {"cert": present["tls.crt"], "key": present["tls.key"]}
        elif "keystore.p12" in present or "keystore.jks" in present:
            changes["keystore"] = present.get("keystore.p12") or present["keystore.jks"]
        else:
            raise ConfigError(f"{where}: {d}: no tls.crt + tls.key and no keystore.p12/.jks")
    if tls.cacert is None and tls.truststore is None:
        if "ca.crt" in present:
            changes["cacert"] = present["ca.crt"]
        elif "truststore.p12" in present or "truststore.jks" in present:
            changes["truststore"] = present.get("truststore.p12") or present["truststore.jks"]
        elif tls.client_auth != "none":
            raise ConfigError(
                f"{where}: {d}: no ca.crt and no truststore.p12/.jks to verify clients with"
            )
    for opt in changes:
        src.setdefault(opt.replace("_", "-"), f"{where} ({Path(changes[opt]).name})")
    return dataclasses.replace(tls, **changes), tuple(sorted(present))  # type: ignore[arg-type]  # only the path fields change


def load_material(tls: TLSConfig, sources: dict[str, str] | None = None) -> Material:
    """Read and validate key, chain and trusted CAs (rule 1). Blocking: run off the event loop."""
    src = dict(sources or {})
    found: tuple[str, ...] = ()
    if tls.cert_dir is not None:
        tls, found = from_cert_dir(tls, src)
    if tls.keystore is not None:
        where = f"{src.get('keystore', '--keystore')}: {tls.keystore}"
        password = resolve_password(
            tls.keystore_password, src.get("keystore-password", "--keystore-password")
        )
        km = load_keystore(
            read_file(tls.keystore, src.get("keystore", "--keystore"), "keystore"),
            password,
            tls.keystore_alias,
            where,
        )
        key, chain, cert_file = km.key, km.chain, str(tls.keystore)
    else:
        key, chain = _pem_pair(tls, src)
        cert_file = str(tls.cert)
    where = src.get("keystore" if tls.keystore is not None else "cert", "--cert")
    check_chain(chain, f"{where}: {cert_file}")
    ca_file, ca_certs = load_trust(tls, src)
    crls = load_crls(tls, src, ca_certs)
    return Material(cert_file, key, chain, ca_file, ca_certs, found, crls)


def load_crls(
    tls: TLSConfig, src: dict[str, str], ca_certs: tuple[x509.Certificate, ...]
) -> tuple[x509.CertificateRevocationList, ...]:
    """The CRLs of --crl (none without it), checked against the trusted CAs."""
    if tls.crl is None:
        return ()
    crl_key = src.get("crl", "--crl")
    crls = parse_crls(read_file(tls.crl, crl_key, "CRL"), tls.crl, crl_key, ca_certs)
    # An intermediate anchor would silently refuse all its clients (anchors.py rule 4).
    problem = crl_chain_problem(ca_certs, tls.crl_check, tls.trust_anchors)
    if problem is not None:
        raise ConfigError(f"{crl_key}: {problem}")
    return crls


CLOCK_SKEW: Final = dt.timedelta(minutes=5)


def check_chain(chain: tuple[x509.Certificate, ...], where: str) -> None:
    """Our own certificate is in its validity period, and each certificate after it issued the
    one before (rule 1): a wrong order or a foreign intermediate is caught here, not by clients."""
    now = dt.datetime.now(dt.UTC)
    leaf = chain[0]
    if leaf.not_valid_after_utc <= now:
        raise ConfigError(
            f"{where}: the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"(subject {rfc2253(leaf.subject)})"
        )
    if leaf.not_valid_before_utc > now + CLOCK_SKEW:
        raise ConfigError(
            f"{where}: the certificate is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} (subject {rfc2253(leaf.subject)})"
        )
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain), start=1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(
                f"{where}: certificate {i + 1} ({rfc2253(issuer.subject)}) did not issue "
                f"certificate {i} ({rfc2253(cert.subject)}): leaf first, then its issuer, and so on"
            ) from None
        except UnsupportedAlgorithm:
            continue  # a signature cryptography cannot check: OpenSSL and the clients will


def load_trust(
    tls: TLSConfig, src: dict[str, str]
) -> tuple[str | None, tuple[x509.Certificate, ...]]:
    """The CAs trusted for client certificates (truststore or PEM bundle) and where from."""
    ca_certs: tuple[x509.Certificate, ...] = ()
    ca_file = None
    if tls.truststore is not None:
        ts_key = src.get("truststore", "--truststore")
        password = resolve_password(
            tls.truststore_password, src.get("truststore-password", "--truststore-password")
        )
        ca_certs = tuple(
            load_truststore(
                read_file(tls.truststore, ts_key, "truststore"),
                password,
                f"{ts_key}: {tls.truststore}",
            )
        )
        ca_file = tls.truststore
        _only_cas(ca_certs, ts_key, ca_file)
    elif tls.cacert is not None:
        ca_key = src.get("cacert", "--cacert")
        ca_certs = tuple(_certs(read_file(tls.cacert, ca_key, "CA bundle"), tls.cacert, ca_key))
        ca_file = tls.cacert
        _only_cas(ca_certs, ca_key, ca_file)
    return ca_file, ca_certs


def _only_cas(certs: tuple[x509.Certificate, ...], key: str, path: str) -> None:
    """Refuse a bundle entry that is not a CA (anchors.py rule 1): with partial chains a leaf
    here would be trusted by itself, and without them it hides a mistake (a client certificate
    pasted where its CA belongs)."""
    problem = bundle_problem(certs)
    if problem is not None:
        raise ConfigError(f"{key}: {path}: {problem}")


def _pem_pair(
    tls: TLSConfig, src: dict[str, str]
) -> tuple[PrivateKey, tuple[x509.Certificate, ...]]:
    cert_key, key_key = src.get("cert", "--cert"), src.get("key", "--key")
    certs = _certs(read_file(tls.cert, cert_key, "certificate"), str(tls.cert), cert_key)
    key_data = read_file(tls.key, key_key, "private key")
    if key_key == cert_key and tls.key == tls.cert and b"PRIVATE KEY-----" not in key_data:
        # No --key was given, so config.py looked for the key in the --cert file (rule 1).
        raise ConfigError(
            f"{cert_key}: {tls.cert}: holds no private key, and no --key was given; "
            "give the key's file with --key (or one PEM file holding both as --cert)"
        )
    password = resolve_password(tls.key_password, src.get("key-password", "--key-password"))
    try:
        loaded = serialization.load_pem_private_key(key_data, password)
    except TypeError:
        hint = (
            "the key is encrypted: give --key-password"
            if password is None
            else "the key is not encrypted: drop --key-password"
        )
        raise ConfigError(f"{key_key}: {tls.key}: {hint}") from None
    except ValueError as exc:
        reason = (
            "wrong --key-password"
            if password and "password" in str(exc).lower()
            else "not a PEM private key (or wrong password)"
        )
        raise ConfigError(f"{key_key}: {tls.key}: {reason}") from None
    if not is_private_key(loaded):
        raise ConfigError(f"{key_key}: {tls.key}: unsupported key type")
    if not key_matches(loaded, certs[0]):
        raise ConfigError(
            f"{key_key}: {tls.key}: the private key does not match the certificate "
            f"in {tls.cert} (subject {rfc2253(certs[0].subject)})"
        )
    return loaded, tuple(certs)
