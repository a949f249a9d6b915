"""The SSLContexts built from validated material, and what a failed handshake is called.

Rules:
1. Client certificates are always verified against the configured CAs; nothing here disables
   verification. TLS 1.0/1.1 are never enabled; TLS 1.2 uses ECDHE + AEAD suites only.
2. server_context is the one description of how a client is verified: the listener uses it
   (generation.py), and so do ``explain`` and the tests (verify.py runs a handshake against a
   context it built).
3. A decrypted key reaches OpenSSL through an anonymous in-memory file, never a disk.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import serialization

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.material.loader import read_file

if TYPE_CHECKING:
    from collections.abc import Callable

    from mtls_proxy.core.config import Config
    from mtls_proxy.material.tls import Material

TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"


def via_memfd(pem: bytes, use: Callable[[str], None]) -> None:
    """load_cert_chain and (for CRLs) load_verify_locations only take paths: hand them an
    anonymous in-memory file, so that a decrypted key never touches a disk and what OpenSSL
    reads is exactly what was validated here."""
    fd = os.memfd_create("mtls-proxy-material", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        use(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def load_chain_from_memory(ctx: ssl.SSLContext, material: Material) -> None:
    pem = material.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem += b"".join(c.public_bytes(serialization.Encoding.PEM) for c in material.chain)
    via_memfd(pem, ctx.load_cert_chain)


def openssl_checks_crls(cfg: Config, material: Material) -> bool:
    """Whether the CRLs go to OpenSSL (the handshake refuses revoked clients), or, with
    --crl-expired allow and an expired CRL, are enforced after the handshake (revocation.py).

    All or nothing: OpenSSL refuses every client of a stale CRL's CA and has no per-issuer
    exception, and Python's ssl offers no verify callback to make one. So with a stale CRL
    allowed, none go to OpenSSL, and revocation.py makes OpenSSL's demands itself (every CA it
    checks needs a CRL), relaxing only the stale CRL's own issuer."""
    return bool(material.crls) and not (cfg.tls.crl_expired == "allow" and material.crls_expired())


def server_context(cfg: Config, material: Material) -> ssl.SSLContext:
    """The listener's SSLContext for *material* (rule 2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.tls.min_tls_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if cfg.tls.sessions == "cache":
        # Sessions stay in this context's memory instead of travelling in tickets sealed with
        # a key that lives as long as the context (Mozilla's advice: forward secrecy). It is
        # also 2-3x cheaper: resuming a ticket decodes the client's certificate again
        # (d2i_SSL_SESSION), a cached session is already decoded. With OP_NO_TICKET, TLS 1.3
        # tickets carry only the cache's session ID, TLS 1.2 resumes by session ID.
        # One ticket per handshake: each is a cache entry (a client resumes with the last).
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 1
    # h2 only when asked for (--http2 on); a client without ALPN speaks HTTP/1.1.
    # --mode tcp offers none: the client's ALPN is the TCP service's business (it is passed on
    # in the PROXY v2 header when the client sent one and OpenSSL chose nothing).
    if cfg.mode != "tcp":
        ctx.set_alpn_protocols(["h2", "http/1.1"] if cfg.http2 == "on" else ["http/1.1"])
    try:
        load_chain_from_memory(ctx, material)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cfg.source('cert')}: {material.cert_file}: OpenSSL refused the "
            f"certificate/key ({exc.reason})"
        ) from None
    if cfg.tls.client_auth != "none":
        ctx.load_verify_locations(
            cadata="".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in material.ca_certs
            )
        )
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if cfg.tls.client_auth == "require" else ssl.CERT_OPTIONAL
        )
        if cfg.strict_client_certs:
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        if cfg.tls.trust_anchors == "any":
            # Every CA of the bundle anchors a chain, an intermediate too: what Java's PKIX
            # (a Spring truststore often holds only the issuing intermediate) and Go's
            # crypto/tls (ghostunnel, Caddy, Traefik) do. Trusting what the operator listed
            # is narrower than also trusting everything else its root signed; the bundle
            # holds CAs only (load_trust), so this never pins a leaf.
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if openssl_checks_crls(cfg, material):
            crl_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in material.crls)
            via_memfd(crl_pem, lambda path: ctx.load_verify_locations(cafile=path))
            ctx.verify_flags |= (
                ssl.VERIFY_CRL_CHECK_LEAF
                if cfg.tls.crl_check == "leaf"
                else ssl.VERIFY_CRL_CHECK_CHAIN
            )
    return ctx


def upstream_context(cafile: str | None = None) -> ssl.SSLContext:
    """Client context for an https:// upstream: verified against *cafile* (or the system trust
    store), hostname checked."""
    cadata = None
    if cafile is not None:  # read as every material file is: a regular file, capped (loader.py)
        cadata = read_file(cafile, "--upstream-cacert", "CA bundle").decode("latin-1")
        if not cadata.strip():  # an empty cadata would fall back to the system trust store
            raise ConfigError(f"--upstream-cacert: {cafile}: the file is empty")
    try:
        ctx = ssl.create_default_context(cadata=cadata)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--upstream-cacert: {cafile}: cannot load ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# OpenSSL X509_V_ERR_* codes -> the handshake failure reasons of docs/metrics.md.
_VERIFY_REASONS: Final = {
    10: "expired",
    9: "expired",
    2: "unknown_ca",
    18: "unknown_ca",  # a self-signed leaf
    19: "unknown_ca",
    20: "unknown_ca",
    21: "unknown_ca",
    23: "revoked",
    3: "other",
}


def classify_handshake_error(exc: BaseException) -> str:
    """Map a failed server handshake to the bounded `reason` label of handshakes_total."""
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_certificate"
        if "CERTIFICATE" in reason:
            return "bad_certificate"
        return "protocol"
    return "other"
