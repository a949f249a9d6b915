"""PURE. Is a client chain that OpenSSL verified earlier still acceptable under the trust now?

OpenSSL checks chains only during the handshake. After a reload that removes a CA or adds a
revocation, the proxy re-checks every open connection with this module (SPEC: a client the new
trust refuses cannot continue on an existing connection). With ``--crl-expired allow`` and an
expired CRL, OpenSSL is not given the CRLs (it would refuse every client of that CA) and this
module enforces them right after each handshake instead.

Rules:
1. The input is the *verified* chain from the handshake: leaf first, trust anchor last.
2. Anchored: some certificate of the chain past the leaf is, by subject and public key, one of
   the CAs trusted now. Only removals can fail this; it is not a second path validation.
3. Revoked: a certificate of the chain (only the leaf with ``crl_check: leaf``) appears in a CRL
   of its issuer whose signature verifies with the issuer's key from that same chain.
4. A CA without a CRL revokes nothing here (OpenSSL's chain mode would refuse such a chain at the
   next handshake; an open connection is not cut for a CRL that is merely missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key(cert: x509.Certificate) -> tuple[bytes, bytes]:
    return cert.subject.public_bytes(), cert.public_key().public_bytes(*_SPKI)


@dataclass(frozen=True, slots=True)
class TrustView:
    """The trusted CAs and CRLs in a form quick to check chains against."""

    anchors: frozenset[tuple[bytes, bytes]]
    crls: dict[bytes, tuple[x509.CertificateRevocationList, ...]] = field(default_factory=dict)
    leaf_only: bool = False

    @classmethod
    def build(
        cls,
        cas: Sequence[x509.Certificate],
        crls: Sequence[x509.CertificateRevocationList],
        leaf_only: bool = False,
    ) -> TrustView:
        """Index *cas* by (subject, key) and *crls* by issuer."""
        by_issuer: dict[bytes, list[x509.CertificateRevocationList]] = {}
        for crl in crls:
            by_issuer.setdefault(crl.issuer.public_bytes(), []).append(crl)
        return cls(
            frozenset(_key(c) for c in cas),
            {k: tuple(v) for k, v in by_issuer.items()},
            leaf_only,
        )

    def refuses(self, chain: Sequence[x509.Certificate]) -> str | None:
        """None when *chain* is still acceptable, else the reason (``unknown_ca``/``revoked``)."""
        if not chain:
            return None
        if len(chain) > 1 and not any(_key(c) in self.anchors for c in chain[1:]):
            return "unknown_ca"
        return "revoked" if self.revoked(chain) else None

    def revoked(self, chain: Sequence[x509.Certificate]) -> bool:
        """True when a certificate of *chain* is on a CRL of its issuer (rule 3)."""
        last = 1 if self.leaf_only else len(chain) - 1
        for i in range(min(last, len(chain) - 1)):
            cert, issuer = chain[i], chain[i + 1]
            for crl in self.crls.get(cert.issuer.public_bytes(), ()):
                if (
                    crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
                    and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]  # CA keys are signing keys
                ):
                    return True
        return False
