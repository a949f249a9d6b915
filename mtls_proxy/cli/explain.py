"""``mtls-proxy explain --client-cert FILE``: would this client be let in, and why (not)?

Exit 0 allowed, 3 denied (a refused handshake included), 2 bad input. The handshake verdict is
the listener's own (verify.py): its SSLContext, built by contexts.server_context from the same
configuration, verifies the chain, so the answer and its reason (the label of
mtls_proxy_handshakes_total) are what a real connection gets. Without ``--client-key`` the chain
is checked as the listener checks a client's Certificate message; with it, a whole handshake
also proves the key. Then the policy decides as it would for a request.

Every value printed goes through escape.for_terminal: a certificate is input from whoever holds
it, and a SAN holding CR, ESC or U+202E must not print a line of its own (a fake "decision:").
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec

from mtls_proxy.core.config import Config
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.escape import for_terminal as esc
from mtls_proxy.core.identity import PeerIdentity, identity_from_der, rfc2253
from mtls_proxy.core.paths import AmbiguousPath, match_path, normalize_target
from mtls_proxy.core.policy import decide
from mtls_proxy.material.contexts import via_memfd
from mtls_proxy.material.loader import load_policy, read_file
from mtls_proxy.material.tls import from_cert_dir, load_crls, load_trust
from mtls_proxy.material.verify import (
    Verdict,
    after_handshake,
    check_chain,
    client_context,
    handshake,
    listener_context,
    revocation_view,
)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)
_REFUSED = "decision:     denied at the TLS handshake (nothing reaches HTTP)"
_REFUSED_AFTER = "decision:     DENIED 403 right after the handshake (nothing reaches the upstream)"


def read_chain(cert_file: str) -> list[bytes]:
    """The DER certificates of *cert_file* (PEM blocks in order, or one DER certificate).

    Taken as bytes, not parsed: OpenSSL decides what it accepts, and a certificate our
    parser refuses is still one a client can send."""
    data = read_file(cert_file, "--client-cert", "certificate")
    blocks = _PEM_CERT.findall(data)
    try:
        ders = [base64.b64decode(b"".join(b.split()), validate=True) for b in blocks]
    except ValueError:
        ders = []
    if not blocks and data[:1] == b"\x30":
        ders = [data]
    if not ders:
        raise ConfigError(f"--client-cert: {cert_file}: not a PEM or DER certificate")
    return ders


def _describe(ders: list[bytes]) -> tuple[list[str], x509.Certificate | None, PeerIdentity | None]:
    try:
        leaf = x509.load_der_x509_certificate(ders[0])
        peer = identity_from_der(ders[0])
        spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
        # Still verified below: OpenSSL may accept what cryptography cannot read.
        return [f"subject:      (not readable here: {esc(exc)})"], None, None
    return (
        [
            f"subject:      {esc(peer.subject)}",
            f"issuer:       {esc(rfc2253(leaf.issuer))}",
            f"validity:     {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. "
            f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            f"sha256:       {peer.sha256}",
            f"spki pin:     sha256/{base64.b64encode(hashlib.sha256(spki).digest()).decode()}",
            *(
                f"{label:<13} {', '.join(map(esc, values))}"
                for label, values in (
                    ("SAN dns:", peer.dns),
                    ("SAN uri:", peer.uri),
                    ("SAN email:", peer.email),
                    ("SAN ip:", peer.ip),
                )
                if values
            ),
        ],
        leaf,
        peer,
    )


def _verdict(
    cfg: Config, ders: list[bytes], cert_file: str, key_file: str | None
) -> tuple[Verdict, str, int]:
    """The listener's verdict, where the CRLs came from, and how many there are."""
    tls = cfg.tls
    src = dict(cfg.sources)
    if tls.cert_dir is not None:
        tls, _ = from_cert_dir(tls, src)
    _, cas = load_trust(tls, src)
    if not cas:
        raise ConfigError("no trusted CAs configured (--cacert, --truststore or --cert-dir)")
    crls = load_crls(tls, src, cas)
    ctx, material = listener_context(cfg, cas, crls)
    if key_file is None:
        verdict = check_chain(ctx, ders)
    else:
        client = client_context(material)
        pem = read_file(key_file, "--client-key", "private key")
        pem += b"".join(ssl.DER_cert_to_PEM_cert(d).encode() for d in ders)

        def load(path: str) -> None:
            try:
                client.load_cert_chain(path, password=lambda: b"")  # never prompt
            except ssl.SSLError as exc:
                raise ConfigError(
                    f"--client-key: {key_file}: OpenSSL cannot use it with {cert_file} as a "
                    f"client ({exc.reason}): not the certificate's key, an encrypted key, or a "
                    "certificate OpenSSL cannot load"
                ) from None

        via_memfd(pem, load)
        verdict = handshake(ctx, client)
    return after_handshake(cfg, revocation_view(cfg, material), verdict), tls.crl or "", len(crls)


def _trust_lines(verdict: Verdict, crl: str, n_crls: int, with_key: bool) -> list[str]:
    lines = []
    if verdict.chain:
        names = []
        for der in verdict.chain:
            try:
                names.append(esc(rfc2253(x509.load_der_x509_certificate(der).subject)))
            except (ValueError, TypeError):
                names.append("(not readable here)")
        lines.append(f"trust:        trusted: {' -> '.join(names)}")
    elif verdict.reason == "no_certificate":
        lines.append(
            "trust:        not checked: the client sent no certificate (an OpenSSL client does "
            "so when it cannot sign with its key in the TLS version agreed)"
        )
    elif verdict.reason != "revoked":
        lines.append(f"trust:        UNTRUSTED: {esc(verdict.message)}")
    if verdict.reason == "revoked":
        lines.append(f"revocation:   REVOKED by a CRL in {esc(crl)} ({esc(verdict.message)})")
    elif crl and verdict.chain:
        lines.append(f"revocation:   not revoked ({n_crls} CRL(s) in {esc(crl)})")
    if verdict.accepted:
        how = (
            "a whole handshake against the listener's context"
            if with_key
            else "the chain verified as the listener does; --client-key also proves the key"
        )
        lines.append(f"handshake:    accepted ({how})")
    else:
        detail = f": {esc(verdict.message)}" if verdict.chain else ""
        lines.append(f"handshake:    refused, reason {verdict.reason}{detail}")
        if verdict.alert is not None:
            sees = verdict.alert if verdict.alert == "HTTP 403" else f"TLS alert {verdict.alert}"
            lines.append(f"client reads: {sees}")
    return lines


def tls13_can_sign(leaf: x509.Certificate) -> bool:
    """Whether TLS 1.3 has a signature scheme for the leaf's key (RFC 8446 4.2.3): no DSA, and
    ECDSA on P-256/384/521 only."""
    key = leaf.public_key()
    if isinstance(key, dsa.DSAPublicKey):
        return False
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in ("secp256r1", "secp384r1", "secp521r1")
    return True


def explain(
    cfg: Config, cert_file: str, method: str, path: str, key_file: str | None = None
) -> tuple[int, str]:
    """The report and the exit code for *cert_file* (and its key, if given) under *cfg*."""
    ders = read_chain(cert_file)
    lines, leaf, peer = _describe(ders)
    lines.append(f"chain sent:   {len(ders) - 1} intermediate(s) after the leaf")
    tls = cfg.tls
    if tls.client_auth != "none":
        verdict, crl, n_crls = _verdict(cfg, ders, cert_file, key_file)
        lines += _trust_lines(verdict, crl, n_crls, key_file is not None)
        if key_file is None and leaf is not None and not tls13_can_sign(leaf):
            lines.append(
                "note:         a TLS 1.3 client cannot sign with this key type: it sends no "
                "certificate (reason no_certificate); the answer above is a TLS 1.2 client's"
            )
        if not verdict.accepted:
            lines.append(_REFUSED_AFTER if verdict.alert == "HTTP 403" else _REFUSED)
            return 3, "\n".join(lines)
    policy = load_policy(cfg)
    asked = f"{esc(method)} {esc(path)}"
    try:
        target = normalize_target(path.encode()) if policy.routes else path.encode()
    except AmbiguousPath as exc:
        lines.append(f"decision:     DENIED 400 for {asked}: ambiguous path ({esc(exc)})")
        return 3, "\n".join(lines)
    d = decide(policy, peer if tls.client_auth != "none" else None, method, match_path(target))
    if d.allowed:
        lines.append(f"decision:     ALLOWED ({d.kind}; rule {esc(d.rule)}) for {asked}")
        return 0, "\n".join(lines)
    rules = ", ".join(esc(r.name) for r in policy.rules) or "none"
    lines.append(f"decision:     DENIED {d.status} for {asked}: {esc(d.reason)} (rules: {rules})")
    return 3, "\n".join(lines)
