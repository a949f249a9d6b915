"""PURE. What the certificates of a CA bundle (or truststore) can do as trust anchors.

Rules:
1. A bundle holds CAs: basicConstraints CA:TRUE and, when keyUsage is present, keyCertSign (what
   OpenSSL's X509_check_ca asks of an issuer), or an X.509 v1 self-signed root (OpenSSL counts
   those as CAs; old roots are v1). Anything else is refused when the bundle is loaded, in both
   ``--trust-anchors`` modes: with ``any`` (VERIFY_X509_PARTIAL_CHAIN) a leaf in the bundle would
   pin that exact certificate, and in either mode it is never what the operator meant.
2. ``--trust-anchors any``: each CA of the bundle anchors a chain by itself (Java PKIX, Go).
   ``roots``: a chain must end at a self-signed CA of the bundle; an intermediate in the bundle
   only helps a chain that reaches such a root (OpenSSL without PARTIAL_CHAIN).
3. A bundle whose anchors cannot verify any client now (none in its validity period, or with
   ``roots`` no valid self-signed root) is reported by ``mtls-proxy check`` (exit 2).
4. ``any`` with CRLs in ``--crl-check chain`` mode and an intermediate in the bundle is refused
   when loaded. Measured: with partial chains OpenSSL ends a chain at the first CA of the bundle
   it reaches, and CRL_CHECK_ALL then wants that CA's own CRL checked with its issuer's key,
   which the chain no longer holds, so every client below the intermediate would be refused
   (reason other) without a word.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from mtls_proxy.core.identity import rfc2253


def self_signed(cert: x509.Certificate) -> bool:
    """Issued by itself: same name, and its own key verifies its signature."""
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    except UnsupportedAlgorithm:
        return True  # a signature cryptography cannot check: the names are all we can go by
    return True


def unreadable(cert: x509.Certificate) -> str | None:
    """Why cryptography cannot read *cert*'s extensions (it is stricter than OpenSSL), or None."""
    try:
        cert.extensions  # noqa: B018 -- parsed on first access
    except (ValueError, TypeError) as exc:  # cryptography raises both for malformed values
        return str(exc) or type(exc).__name__
    return None


def not_a_ca(cert: x509.Certificate) -> str | None:
    """Why *cert* cannot issue client certificates (rule 1), or None for a CA.

    A certificate whose extensions cryptography cannot read is not refused here: OpenSSL reads
    it and decides at each handshake (``check`` lists it as unreadable)."""
    if unreadable(cert) is not None:
        return None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        if cert.version is x509.Version.v1 and self_signed(cert):
            return None  # an X.509 v1 root: OpenSSL counts it as a CA
        return "no basicConstraints extension, so not a CA certificate"
    if not bc.ca:
        return "basicConstraints CA:FALSE: an end-entity (leaf) certificate, not a CA"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return "its keyUsage lacks keyCertSign, so it cannot issue certificates"
    return None


def bundle_problem(certs: Sequence[x509.Certificate]) -> str | None:
    """Why a bundle of *certs* is refused (rule 1), or None."""
    for i, cert in enumerate(certs, start=1):
        why = not_a_ca(cert)
        if why is not None:
            return (
                f"certificate {i} of {len(certs)} ({rfc2253(cert.subject)}) is not a CA: {why}. "
                "A CA bundle or truststore holds the CAs that issue client certificates; remove "
                "it (to trust one client, trust its CA and allow it by --allow-sha256)"
            )
    return None


def crl_chain_problem(certs: Sequence[x509.Certificate], crl_check: str, mode: str) -> str | None:
    """Why CRLs cannot be checked with this bundle and these settings (rule 4), or None."""
    if crl_check != "chain" or mode != "any":
        return None
    for cert in certs:
        if not self_signed(cert):
            return (
                "--crl-check chain cannot work with --trust-anchors any and an intermediate CA "
                f"in the bundle ({rfc2253(cert.subject)}): OpenSSL ends chains there and then "
                "needs that CA's own CRL checked with its issuer's key, so every client it "
                "issued would be refused. Use --trust-anchors roots (with its root in the "
                "bundle), or --crl-check leaf"
            )
    return None


@dataclass(frozen=True, slots=True)
class Anchor:
    """One certificate of the bundle, as ``check`` lists it."""

    subject: str
    issuer: str
    self_signed: bool
    ca_problem: str | None  # None: a CA (rule 1), or extensions not readable here
    unreadable: str | None  # why cryptography cannot read the extensions, if it cannot
    not_before: dt.datetime
    not_after: dt.datetime

    def valid_at(self, now: dt.datetime) -> bool:
        """In its validity period at *now*."""
        return self.not_before <= now < self.not_after


def describe(cert: x509.Certificate) -> Anchor:
    """The facts ``check`` prints about one bundle certificate."""
    return Anchor(
        rfc2253(cert.subject),
        rfc2253(cert.issuer),
        self_signed(cert),
        not_a_ca(cert),
        unreadable(cert),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def report(
    certs: Sequence[x509.Certificate], mode: str, now: dt.datetime | None = None
) -> list[str]:
    """``check``'s line per bundle certificate: subject, root or issuer, CA or not, validity."""
    now = now or dt.datetime.now(dt.UTC)
    lines = []
    for cert in certs:
        a = describe(cert)
        kind = "self-signed root" if a.self_signed else f"issued by {a.issuer}"
        if a.unreadable is not None:
            ca = f"extensions not readable here ({a.unreadable}): OpenSSL decides"
        else:
            ca = "CA" if a.ca_problem is None else f"NOT A CA ({a.ca_problem})"
        when = (
            f"valid until {_time(a.not_after)}"
            if a.valid_at(now)
            else f"NOT VALID NOW ({_time(a.not_before)} .. {_time(a.not_after)})"
        )
        unused = (
            "; unused with --trust-anchors roots (its root is not in the bundle)"
            if mode == "roots" and not a.self_signed and not reaches_root(cert, certs, now)
            else ""
        )
        lines.append(f"{a.subject}: {kind}, {ca}, {when}{unused}")
    return lines


def _time(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def reaches_root(
    cert: x509.Certificate, bundle: Sequence[x509.Certificate], now: dt.datetime
) -> bool:
    """With ``roots``: whether *cert* leads, through the bundle, to a valid self-signed CA
    (rule 2). Names and signatures only; OpenSSL still checks the rest at each handshake."""
    seen: set[int] = set()
    current = cert
    while not self_signed(current):
        seen.add(id(current))
        issuers = [
            c
            for c in bundle
            if id(c) not in seen and c.subject == current.issuer and _issued(current, c)
        ]
        if not issuers:
            return False
        current = issuers[0]
    return describe(current).valid_at(now)


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    except UnsupportedAlgorithm:
        return True
    return True


def unusable(
    bundle: Sequence[x509.Certificate], mode: str, now: dt.datetime | None = None
) -> str | None:
    """Why no client can be verified with *bundle* now (rule 3), or None when some can."""
    now = now or dt.datetime.now(dt.UTC)
    if not bundle:
        return "it holds no certificate"
    valid = [c for c in bundle if describe(c).valid_at(now)]
    if not valid:
        return "every certificate in it is outside its validity period (expired or not yet valid)"
    if mode == "roots" and not any(self_signed(c) for c in valid):
        return (
            "with --trust-anchors roots a client chain must end at a self-signed root of the "
            "bundle, and it holds no valid one (add the root, or use --trust-anchors any to "
            "trust the intermediates it holds)"
        )
    return None
