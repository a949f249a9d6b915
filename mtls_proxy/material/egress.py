"""`client`'s material: our client certificate (unless --disable-authentication) and the trust
for the remote server, and the SSLContext that dials with them.

Rules:
1. The remote's chain is always verified (the configured CAs, else the system store); its name
   too, unless a --verify-spki-pin replaces that check (core/egress.py rule 2). Nothing here
   turns verification off.
2. Loads are blocking: at startup and in the reload's thread, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.material.contexts import TLS12_CIPHERS, load_chain_from_memory
from mtls_proxy.material.tls import Material, from_cert_dir, load_material, load_trust

if TYPE_CHECKING:
    from mtls_proxy.core.egress import ClientConfig


@dataclass(frozen=True, slots=True)
class ClientMaterial:
    """What `client` dials with: ours (None with --disable-authentication) and the trust."""

    own: Material | None
    ca_certs: tuple[x509.Certificate, ...]  # empty: the system trust store
    ca_file: str | None

    def key(self) -> tuple[object, ...]:
        """Equal when nothing a handshake uses changed (a reload keeps the context then)."""
        der = serialization.Encoding.DER
        chain = () if self.own is None else tuple(c.public_bytes(der) for c in self.own.chain)
        return chain, tuple(c.public_bytes(der) for c in self.ca_certs)

    @property
    def not_after(self) -> dt.datetime | None:
        """When our client certificate expires."""
        return None if self.own is None else self.own.not_after


def load_client_material(cfg: ClientConfig) -> ClientMaterial:
    """Read and validate our certificate and the trust (rule 2)."""
    src = dict(cfg.sources)
    if cfg.disable_authentication:
        tls = cfg.tls
        if tls.cert_dir is not None:
            tls = dataclasses.replace(tls, cert="-", key="-")  # only the trust is looked for
            tls, _ = from_cert_dir(tls, src)
        ca_file, ca_certs = load_trust(tls, src)
        return ClientMaterial(None, ca_certs, ca_file)
    own = load_material(cfg.tls, src)
    return ClientMaterial(own, own.ca_certs, own.cacert_file)


def client_context(cfg: ClientConfig, material: ClientMaterial) -> ssl.SSLContext:
    """The SSLContext that dials the target (rule 1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, names checked
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.tls.min_tls_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if cfg.http:
        ctx.set_alpn_protocols(["http/1.1"])
    if material.ca_certs:
        pem = (c.public_bytes(serialization.Encoding.PEM).decode() for c in material.ca_certs)
        ctx.load_verify_locations(cadata="".join(pem))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if not ctx.get_ca_certs() and not _has_default_paths():
            raise ConfigError(
                "no --cacert or --truststore, and no system trust store was found to verify "
                "the target with"
            )
    # A pin replaces the name check, never the chain's (core/egress.py rule 2).
    ctx.check_hostname = cfg.verify.check_name
    ctx.verify_mode = ssl.CERT_REQUIRED
    if material.own is not None:
        try:
            load_chain_from_memory(ctx, material.own)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{cfg.sources.get('cert', '--cert')}: {material.own.cert_file}: OpenSSL "
                f"refused the certificate/key ({exc.reason})"
            ) from None
    return ctx


def _has_default_paths() -> bool:
    """OpenSSL loads a hashed CA directory lazily: get_ca_certs() shows it empty."""
    paths = ssl.get_default_verify_paths()
    return any(p and Path(p).exists() for p in (paths.cafile, paths.capath))


def spki_sha256(der: bytes) -> bytes:
    """SHA-256 of a certificate's SubjectPublicKeyInfo (the RFC 7469 pin)."""
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).digest()
