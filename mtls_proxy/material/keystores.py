"""Keystores and truststores as Java teams have them: PKCS12 (modern and legacy) and JKS/JCEKS.

The format is chosen by content (JKS magic 0xFEEDFEED, JCEKS 0xCECECECE, PEM armour, else DER
PKCS12), never by the file name. Every failure raises ConfigError naming the option, the file
and the reason; passwords and key material never appear in a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.keys import (
    PrivateKey as PrivateKey,  # re-exported: tls.py imports it from here
)
from mtls_proxy.core.keys import is_private_key, key_matches

_JKS_MAGIC: Final = b"\xfe\xed\xfe\xed"
_JCEKS_MAGIC: Final = b"\xce\xce\xce\xce"
REEXPORT_HINT: Final = (
    "re-export it with a modern profile: `openssl pkcs12 -export -keypbe AES-256-CBC -certpbe "
    "AES-256-CBC -macalg sha256 ...` or `keytool -importkeystore -deststoretype PKCS12 ...`"
)


@dataclass(frozen=True)
class KeyMaterial:
    """A private key and its certificate chain (leaf first)."""

    key: PrivateKey
    chain: tuple[x509.Certificate, ...]


def store_format(data: bytes) -> str:
    """'jks', 'jceks', 'pem' or 'pkcs12' (by content); '' for an empty file."""
    if not data:
        return ""
    if data.startswith(_JKS_MAGIC):
        return "jks"
    if data.startswith(_JCEKS_MAGIC):
        return "jceks"
    if b"-----BEGIN" in data[:4096]:
        return "pem"
    return "pkcs12"


def _check_key(key: object, where: str) -> PrivateKey:
    if not is_private_key(key):
        raise ConfigError(f"{where}: unsupported private key type {type(key).__name__}")
    return key


def _bad_password(password: bytes | None, option: str) -> str:
    """Why a store would not open: "wrong password" misleads when none was given at all."""
    if password is None:
        return f"the store is password-protected and no password was given ({option})"
    return "wrong password (the store's integrity check failed, or the file is corrupt)"


def _load_pkcs12(
    data: bytes, password: bytes | None, alias: str | None, where: str, secret_option: str
) -> tuple[KeyMaterial | None, list[x509.Certificate]]:
    try:
        p12 = pkcs12.load_pkcs12(data, password)
    except UnsupportedAlgorithm as exc:
        raise ConfigError(
            f"{where}: uses an algorithm this OpenSSL cannot read ({exc}); {REEXPORT_HINT}"
        ) from None
    except ValueError as exc:
        text = str(exc).lower()
        if "password" in text or "mac" in text:
            raise ConfigError(f"{where}: {_bad_password(password, secret_option)}") from None
        raise ConfigError(
            f"{where}: not a readable PKCS12 keystore (truncated or corrupt: {exc})"
        ) from None
    others = [c.certificate for c in p12.additional_certs]
    if p12.key is None or p12.cert is None:
        return None, others
    name = p12.cert.friendly_name.decode(errors="replace") if p12.cert.friendly_name else None
    if alias is not None and name is not None and alias != name:
        raise ConfigError(f"{where}: no key entry with alias {alias!r} (found {name!r})")
    key = _check_key(p12.key, where)
    return KeyMaterial(key, (p12.cert.certificate, *others)), []


def _jks(data: bytes, password: bytes | None, where: str, secret_option: str) -> object:
    import jks

    try:
        return jks.KeyStore.loads(data, (password or b"").decode("utf-8", "replace"))
    except jks.util.KeystoreSignatureException:
        raise ConfigError(f"{where}: {_bad_password(password, secret_option)}") from None
    except jks.util.DecryptionFailureException:
        raise ConfigError(f"{where}: wrong key password") from None
    except (jks.util.BadKeystoreFormatException, ValueError, IndexError, EOFError) as exc:
        raise ConfigError(
            f"{where}: not a readable JKS keystore (truncated or corrupt: {type(exc).__name__})"
        ) from None


def _load_jks(
    data: bytes, password: bytes | None, alias: str | None, where: str, secret_option: str
) -> tuple[KeyMaterial | None, list[x509.Certificate]]:
    ks = _jks(data, password, where, secret_option)
    keys = dict(ks.private_keys)  # type: ignore[attr-defined]  # pyjks has no type hints
    trusted = [x509.load_der_x509_certificate(e.cert) for e in ks.certs.values()]  # type: ignore[attr-defined]  # pyjks
    if not keys:
        return None, trusted
    if alias is None:
        if len(keys) > 1:
            raise ConfigError(
                f"{where}: holds {len(keys)} keys ({', '.join(sorted(keys))}); "
                "choose one with --keystore-alias"
            )
        alias = next(iter(keys))
    if alias not in keys:
        raise ConfigError(
            f"{where}: no key entry with alias {alias!r} (found {', '.join(sorted(keys))})"
        )
    entry = keys[alias]
    key = _check_key(serialization.load_der_private_key(entry.pkey_pkcs8, None), where)
    chain = tuple(x509.load_der_x509_certificate(der) for _, der in entry.cert_chain)
    return KeyMaterial(key, chain), trusted


def load_keystore(
    data: bytes,
    password: bytes | None,
    alias: str | None,
    where: str,
    secret_option: str = "--keystore-password",  # noqa: S107 -- an option name, no secret
) -> KeyMaterial:
    """The key and chain of a PKCS12 or JKS keystore; ConfigError naming *where* otherwise."""
    fmt = store_format(data)
    if not fmt:
        raise ConfigError(f"{where}: the file is empty")
    if fmt == "pem":
        raise ConfigError(f"{where}: this is a PEM file; give it with --cert/--key instead")
    loaded, _ = (_load_jks if fmt in ("jks", "jceks") else _load_pkcs12)(
        data, password, alias, where, secret_option
    )
    if loaded is None:
        raise ConfigError(f"{where}: contains no private key (is it a truststore?)")
    if not loaded.chain:
        raise ConfigError(f"{where}: the key entry has no certificate")
    if not key_matches(loaded.key, loaded.chain[0]):
        raise ConfigError(f"{where}: the private key does not match its certificate")
    return loaded


def load_truststore(
    data: bytes,
    password: bytes | None,
    where: str,
    secret_option: str = "--truststore-password",  # noqa: S107 -- an option name, no secret
) -> list[x509.Certificate]:
    """The trusted certificates of a PKCS12/JKS truststore (or a PEM bundle)."""
    fmt = store_format(data)
    if not fmt:
        raise ConfigError(f"{where}: the file is empty")
    if fmt == "pem":
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
    elif fmt in ("jks", "jceks"):
        _, certs = _load_jks(data, password, None, where, secret_option)
    else:
        loaded, certs = _load_pkcs12(data, password, None, where, secret_option)
        if loaded is not None:
            certs = [*loaded.chain[1:], *certs]
    if not certs:
        raise ConfigError(f"{where}: contains no trusted certificates")
    return certs


def export_pkcs12(material: KeyMaterial, password: bytes, name: bytes) -> bytes:
    """A modern PKCS12 keystore (AES-256, PBKDF2, SHA-256 MAC), as keytool and Spring read it."""
    enc = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(
        name, material.key, material.chain[0], list(material.chain[1:]), enc
    )


def export_pkcs12_truststore(certs: list[x509.Certificate], password: bytes) -> bytes:
    """A PKCS12 truststore whose entries Java treats as trusted (the trustedKeyUsage bag)."""
    entries = [pkcs12.PKCS12Certificate(c, f"ca-{i}".encode()) for i, c in enumerate(certs)]
    return pkcs12.serialize_java_truststore(
        entries, serialization.BestAvailableEncryption(password)
    )


def export_jks(
    material: KeyMaterial | None, certs: list[x509.Certificate], password: bytes, alias: str
) -> bytes:
    """A JKS keystore (key entry) or truststore (trusted certificate entries)."""
    import jks

    der = serialization.Encoding.DER
    entries: list[object] = []
    if material is not None:
        pkcs8 = material.key.private_bytes(
            der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        entries.append(
            jks.PrivateKeyEntry.new(
                alias, [c.public_bytes(der) for c in material.chain], pkcs8, "pkcs8"
            )
        )
    entries += [
        jks.TrustedCertEntry.new(f"ca-{i}", c.public_bytes(der)) for i, c in enumerate(certs)
    ]
    store = jks.KeyStore.new("jks", entries)
    return bytes(store.saves(password.decode()))
