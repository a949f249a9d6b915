"""PURE. Is a client chain that OpenSSL verified earlier still acceptable under the trust now?

OpenSSL checks chains only during the handshake. After a reload that removes a CA or adds a
revocation, the proxy re-checks every open connection with this module (docs/config.md,
Reloading: a client the new trust refuses cannot continue on an existing connection). With
``--crl-expired allow`` and an
expired CRL, OpenSSL is not given the CRLs (it would refuse every client of that CA, and it cannot
relax one issuer only), so this module enforces all of them right after each handshake instead,
with the same demands OpenSSL makes: the stale CRL still counts for its own issuer, and nothing
else is relaxed.

Rules:
1. The input is the *verified* chain from the handshake: leaf first, trust anchor last.
2. Anchored: some certificate of the chain past the leaf is, by subject and public key, one of
   the CAs trusted now (``--trust-anchors any``: OpenSSL's partial chains end at any CA of the
   bundle); with ``--trust-anchors roots`` (``roots_only``) it must be the chain's last one,
   its self-signed root, as OpenSSL demands. Only removals can fail this; it is not a second
   path validation.
3. Checked certificates: every certificate of the chain (``crl_check: chain``: OpenSSL's
   CRL_CHECK_ALL checks the anchor too) or only the leaf (``crl_check: leaf``). A certificate's
   issuer is the next one of the chain; the anchor (self-signed) is its own issuer.
4. A CRL counts for an issuer when it names that issuer, its signature verifies with the issuer's
   key from that same chain, and the issuer may sign CRLs (no keyUsage, or one with cRLSign:
   OpenSSL's rule). Its nextUpdate is not looked at: only ``--crl-expired allow`` gets here.
5. Revoked: a checked certificate's serial is on a CRL that counts for its issuer.
6. After a handshake (``needs_crls``), a checked certificate whose issuer has no CRL that counts
   fails closed, as OpenSSL's "unable to get certificate CRL" does (reason ``other``, the label
   the handshake path gives that error). So one stale CRL relaxes only its own issuer.
7. On a reload re-check (not ``needs_crls``) a missing CRL revokes nothing: OpenSSL refuses such
   a chain at its next handshake, and an open connection is not cut for a CRL merely missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
# Verified (issuer, CRLs) pairs kept: the chains come from verified handshakes, so the issuers
# are the trusted CAs and their intermediates; the bound only caps a pathological PKI.
_CACHE_LIMIT: Final = 1024

CRLs = tuple[x509.CertificateRevocationList, ...]


def _key(cert: x509.Certificate) -> tuple[bytes, bytes]:
    return cert.subject.public_bytes(), cert.public_key().public_bytes(*_SPKI)


def _may_sign_crls(issuer: x509.Certificate) -> bool:
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no keyUsage: any use is allowed (RFC 5280 4.2.1.3, OpenSSL)
    return usage.crl_sign


def _revoked(checked: Sequence[tuple[x509.Certificate, CRLs]]) -> bool:
    return any(
        crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        for cert, crls in checked
        for crl in crls
    )


@dataclass(frozen=True, slots=True)
class TrustView:
    """The trusted CAs and CRLs in a form quick to check chains against."""

    anchors: frozenset[tuple[bytes, bytes]]
    crls: dict[bytes, CRLs] = field(default_factory=dict)
    leaf_only: bool = False
    needs_crls: bool = False
    roots_only: bool = False  # rule 2
    # (issuer name, issuer certificate) -> the CRLs that count for it (rule 4): one signature
    # check per CRL and issuer, not one per handshake.
    _counting: dict[tuple[bytes, x509.Certificate], CRLs] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(
        cls,
        cas: Sequence[x509.Certificate],
        crls: Sequence[x509.CertificateRevocationList],
        leaf_only: bool = False,
        needs_crls: bool = False,
        roots_only: bool = False,
    ) -> TrustView:
        """Index *cas* by (subject, key) and *crls* by issuer."""
        by_issuer: dict[bytes, list[x509.CertificateRevocationList]] = {}
        for crl in crls:
            by_issuer.setdefault(crl.issuer.public_bytes(), []).append(crl)
        return cls(
            frozenset(_key(c) for c in cas),
            {k: tuple(v) for k, v in by_issuer.items()},
            leaf_only,
            needs_crls,
            roots_only,
        )

    def refuses(self, chain: Sequence[x509.Certificate]) -> str | None:
        """None when *chain* is still acceptable, else the reason label of handshakes_total
        (``unknown_ca``, ``revoked``, or ``other`` for a missing CRL: rule 6)."""
        if not chain:
            return None
        issuers = chain[-1:] if self.roots_only else chain[1:]
        if len(chain) > 1 and not any(_key(c) in self.anchors for c in issuers):
            return "unknown_ca"
        checked = self._checked(chain)
        if _revoked(checked):
            return "revoked"
        if self.needs_crls and not all(crls for _, crls in checked):
            # Fail closed (rule 6): a CA of the chain has no CRL at all, stale or fresh, so its
            # clients are refused as OpenSSL's chain/leaf mode refuses them.
            return "other"
        return None

    def revoked(self, chain: Sequence[x509.Certificate]) -> bool:
        """True when a checked certificate of *chain* is on a CRL of its issuer (rule 5)."""
        return _revoked(self._checked(chain))

    def _checked(self, chain: Sequence[x509.Certificate]) -> list[tuple[x509.Certificate, CRLs]]:
        """(certificate, the CRLs that count for its issuer) for each checked one (rule 3)."""
        last = 1 if self.leaf_only else len(chain)
        return [
            (cert, self._counting_for(cert, chain[i + 1] if i + 1 < len(chain) else cert))
            for i, cert in enumerate(chain[:last])
        ]

    def _counting_for(self, cert: x509.Certificate, issuer: x509.Certificate) -> CRLs:
        """The CRLs naming *cert*'s issuer that *issuer* (from the chain) signed (rule 4)."""
        name = cert.issuer.public_bytes()
        named = self.crls.get(name, ())
        if not named:
            return ()
        found = self._counting.get((name, issuer))
        if found is None:
            found = (
                tuple(
                    c
                    for c in named
                    if c.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]  # CA keys are signing keys
                )
                if _may_sign_crls(issuer)
                else ()
            )
            if len(self._counting) >= _CACHE_LIMIT:
                self._counting.clear()
            self._counting[(name, issuer)] = found
        return found
