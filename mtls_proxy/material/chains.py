"""The verified chains behind resumed TLS sessions.

OpenSSL verifies a client's chain during a full handshake only. A resumed session carries the
client's leaf but not the chain it was verified with (SSL_get0_verified_chain is empty), yet the
checks after the handshake and after a reload (revocation.py) need the whole chain. So the
chain of every full handshake is remembered under its leaf's SHA-256, and a resumed session
takes the chain its leaf was last verified with (its session was issued by that handshake or a
later one under the same trust: a trust change starts a new SSLContext, see reloader.py).

A leaf that is no longer remembered (more than LIMIT other leaves since) has an unknown chain,
which the callers treat as refused (fail closed).
"""

from __future__ import annotations

import ssl
from typing import Final

from cryptography import x509

SSL_DER: Final = 2  # _ssl.ENCODING_DER, for Certificate.public_bytes (Python 3.13+)
LIMIT: Final = 16384


def verified_ders(sslobj: ssl.SSLObject) -> tuple[bytes, ...]:
    """The chain OpenSSL verified in this handshake, leaf first, as DER (empty if resumed)."""
    # Public from Python 3.13; the same C method exists since 3.10 on the inner object.
    get = getattr(sslobj, "get_verified_chain", None) or getattr(
        getattr(sslobj, "_sslobj", None), "get_verified_chain", None
    )
    return tuple(c.public_bytes(SSL_DER) for c in (get() or ())) if get is not None else ()


class ChainMemo:
    """Leaf SHA-256 -> the certificates that followed it in its last verified chain."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._by_leaf: dict[str, tuple[x509.Certificate, ...]] = {}
        # Thousands of leaves share a handful of issuer chains: parse and hold each once.
        self._interned: dict[tuple[bytes, ...], tuple[x509.Certificate, ...]] = {}

    def remember(self, leaf_sha256: str, issuers: tuple[bytes, ...]) -> None:
        """Record the issuer part of a chain verified just now (most recent last)."""
        chain = self._interned.get(issuers)
        if chain is None:
            if len(self._interned) >= self.limit:
                self._interned.clear()  # only reached with very many CAs; re-parsed on demand
            chain = tuple(x509.load_der_x509_certificate(d) for d in issuers)
            self._interned[issuers] = chain
        by_leaf = self._by_leaf
        by_leaf.pop(leaf_sha256, None)
        by_leaf[leaf_sha256] = chain
        if len(by_leaf) > self.limit:
            del by_leaf[next(iter(by_leaf))]  # the least recently verified leaf

    def recall(self, leaf_sha256: str) -> tuple[x509.Certificate, ...] | None:
        """The issuers of *leaf_sha256*'s last verified chain; None if not remembered."""
        chain = self._by_leaf.pop(leaf_sha256, None)
        if chain is not None:
            self._by_leaf[leaf_sha256] = chain  # recently used: evicted last
        return chain
