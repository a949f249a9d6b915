"""``mtls-proxy explain --cert FILE``: would this client certificate be let in, and why (not)?

Exit 0 allowed, 3 denied (an untrusted chain included), 2 bad input. The chain is verified with
the configured trust using cryptography's X.509 client verifier (RFC 5280 path validation with
EKU clientAuth, the rules the listener's OpenSSL applies; cryptography is the stricter of the
two on malformed certificates), then the policy decides as it would for a request.

Every value printed goes through escape.for_terminal: a certificate is input from whoever holds
it, and a SAN holding CR, ESC or U+202E must not print a line of its own (a fake "decision:").
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from mtls_proxy.config import Config
from mtls_proxy.errors import ConfigError
from mtls_proxy.escape import for_terminal as esc
from mtls_proxy.identity import identity_from_der, rfc2253
from mtls_proxy.loader import load_policy, parse_crls, read_file
from mtls_proxy.paths import AmbiguousPath, match_path, normalize_target
from mtls_proxy.policy import decide
from mtls_proxy.revocation import TrustView
from mtls_proxy.tls import from_cert_dir, load_trust


def explain(cfg: Config, cert_file: str, method: str, path: str) -> tuple[int, str]:
    """The report and the exit code for *cert_file* under *cfg*."""
    data = read_file(cert_file, "--cert", "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise ConfigError(f"--cert: {cert_file}: not a PEM or DER certificate") from None
    leaf, intermediates = certs[0], certs[1:]
    der = leaf.public_bytes(serialization.Encoding.DER)
    peer = identity_from_der(der)
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    lines = [
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
        f"chain sent:   {len(intermediates)} intermediate(s) after the leaf",
    ]
    tls = cfg.tls
    src = dict(cfg.sources)
    if tls.cert_dir is not None:
        tls, _ = from_cert_dir(tls, src)
    _, cas = load_trust(tls, src)
    if tls.client_auth != "none":
        if not cas:
            raise ConfigError("no trusted CAs configured (--cacert, --truststore or --cert-dir)")
        verifier = (
            PolicyBuilder()
            .store(Store(list(cas)))
            .time(dt.datetime.now(dt.UTC))
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            lines.append(f"trust:        UNTRUSTED: {esc(exc)}")
            lines.append("decision:     denied at the TLS handshake (nothing reaches HTTP)")
            return 3, "\n".join(lines)
        path_names = " -> ".join(esc(rfc2253(c.subject)) for c in verified.chain)
        lines.append(f"trust:        trusted: {path_names}")
        if tls.crl is not None:
            key = src.get("crl", "--crl")
            crls = parse_crls(read_file(tls.crl, key, "CRL"), tls.crl, key, cas)
            view = TrustView.build(cas, crls, leaf_only=tls.crl_check == "leaf")
            if view.revoked(verified.chain):
                lines.append("revocation:   REVOKED by a CRL in " + esc(tls.crl))
                lines.append("decision:     denied at the TLS handshake (nothing reaches HTTP)")
                return 3, "\n".join(lines)
            lines.append(f"revocation:   not revoked ({len(crls)} CRL(s) in {esc(tls.crl)})")
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
