"""State shared by every connection of one listener: config, policy, pool, metrics."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from mtls_proxy.chains import ChainMemo
from mtls_proxy.headers import IdentityBlock, identity_block

if TYPE_CHECKING:
    from collections.abc import Callable

    from mtls_proxy.config import Config
    from mtls_proxy.identity import PeerIdentity
    from mtls_proxy.logs import AccessLog
    from mtls_proxy.metrics import Metrics
    from mtls_proxy.policy import Policy
    from mtls_proxy.proxy import ClientConnection
    from mtls_proxy.revocation import TrustView
    from mtls_proxy.upstream import UpstreamPool


class Shared:
    """What connections read on the hot path; `policy` is swapped whole on reload."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        pool: UpstreamPool,
        by: str | None,
        clock: Callable[[], float],
        access_log: AccessLog | None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock  # the event loop's time(): deadlines are compared against it
        self.access_log = access_log
        self.policy: Policy = cfg.policy
        self.metrics = metrics
        self.pool = pool
        self.by = by
        self.connections: set[ClientConnection] = set()
        # Set only with --crl-expired allow and a stale CRL: checked after each handshake.
        self.revocation: TrustView | None = None
        self.chains = ChainMemo()  # the verified chains behind resumed sessions
        self.draining = False
        u = cfg.upstream
        self.upstream_host = (u.host_header if u.scheme != "unix" else "localhost").encode()
        self.set_by(by)

    def set_by(self, by: str | None) -> None:
        """(Re)build the identity-header cache for our URI SAN (XFCC ``By``), e.g. on reload."""
        dialects, mode = self.cfg.identity_headers, self.cfg.xfcc_mode
        self.by = by

        @lru_cache(maxsize=4096)
        def _block(peer: PeerIdentity | None) -> IdentityBlock:
            return identity_block(peer, dialects, mode, by)

        self.identity_block = _block

    def sweep(self) -> None:
        """Enforce every connection's deadlines (idle, header, send, upstream first byte)."""
        now = self.clock()
        for conn in list(self.connections):
            if conn.deadline or conn.up_deadline or conn.send_deadline:
                conn.check_deadlines(now)
