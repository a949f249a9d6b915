"""One generation of the listener's material: everything a reload replaces, built in one place.

Rules:
1. A `Generation` is frozen and built whole by `build()`: the SSLContext, the trust views, the
   policy and the identity-header cache of one set of files. A reload (or a fresh session
   cache, or a CRL going stale) makes a new one and the server swaps it in one assignment, so
   no handshake or request ever sees half of an old and half of a new generation.
2. A connection keeps the generation it was accepted under for what its handshake decided (the
   context, the identity headers, the post-handshake CRL view); the policy of each request is
   the current generation's, so that a rule removed by a reload stops the next request of an
   open connection too (docs/security.md, RLD-*), and a trust change re-checks open
   connections against `trust` (reloader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from mtls_proxy.core.headers import IdentityBlock, identity_block
from mtls_proxy.core.revocation import TrustView
from mtls_proxy.material.contexts import openssl_checks_crls, server_context
from mtls_proxy.material.verify import revocation_view

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

    from mtls_proxy.core.config import Config
    from mtls_proxy.core.identity import PeerIdentity
    from mtls_proxy.core.policy import Policy
    from mtls_proxy.material.tls import Material


@dataclass(frozen=True, slots=True)
class Generation:
    """The listener's material, trust and policy as of one load."""

    material: Material
    context: ssl.SSLContext  # every handshake accepted under this generation uses it
    policy: Policy
    # The CRLs enforced after each handshake (--crl-expired allow with a stale CRL), else None.
    revocation: TrustView | None
    # Whether OpenSSL checks the CRLs itself (contexts.openssl_checks_crls): when it stops (a CRL
    # went stale while loaded), the context must be rebuilt without them.
    openssl_crls: bool
    # Anchors and CRLs as the handshake applies them: open connections are re-checked against
    # this when a reload changes the trust.
    trust: TrustView
    # The encoded identity headers per peer (a peer repeats across connections: one encode).
    identity_block: Callable[[PeerIdentity | None], IdentityBlock]

    def with_fresh_context(self, cfg: Config) -> Generation:
        """The same files with a new SSLContext: an empty session cache (reloader.py bounds its
        size), or a context built again because the CRLs' mode changed."""
        return build(cfg, self.material, self.policy)


def build(
    cfg: Config, material: Material, policy: Policy, context: ssl.SSLContext | None = None
) -> Generation:
    """Everything the listener derives from *material* and *policy* (*context*: keep this one,
    and with it the TLS sessions, when the certificates and trust did not change)."""
    tls = cfg.tls
    dialects, mode, by = cfg.identity_headers, cfg.xfcc_mode, material.server_uri

    @lru_cache(maxsize=4096)
    def block(peer: PeerIdentity | None) -> IdentityBlock:
        return identity_block(peer, dialects, mode, by)

    return Generation(
        material=material,
        context=context if context is not None else server_context(cfg, material),
        policy=policy,
        revocation=revocation_view(cfg, material),
        openssl_crls=openssl_checks_crls(cfg, material),
        trust=TrustView.build(
            material.ca_certs,
            material.crls,
            leaf_only=tls.crl_check == "leaf",
            roots_only=tls.trust_anchors == "roots",
        ),
        identity_block=block,
    )
