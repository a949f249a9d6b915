"""What every connection of one listener shares: config, the current generation, the upstream
pool, metrics, the access log and the set of open connections.

The data plane reads it on the hot path and never imports upward: a connection is known here
only by the `Connection` protocol that the server's sweeper, drain and trust re-check use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from mtls_proxy.material.chains import ChainMemo
from mtls_proxy.telemetry.tracing import created

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from mtls_proxy.core.config import Config
    from mtls_proxy.core.identity import PeerIdentity
    from mtls_proxy.core.tracecontext import ChildFactory
    from mtls_proxy.dataplane.h2upstream import H2UpstreamPool
    from mtls_proxy.dataplane.upstream import UpstreamPool
    from mtls_proxy.material.generation import Generation
    from mtls_proxy.telemetry.logs import AccessLog
    from mtls_proxy.telemetry.metrics import Metrics
    from mtls_proxy.telemetry.tracing import Tracing


class Connection(Protocol):
    """An open client connection as the listener manages it."""

    @property
    def peer(self) -> PeerIdentity | None:
        """The client's identity (None: no certificate)."""

    def check_deadlines(self, now: float) -> None:
        """Enforce its timeouts (called by the sweeper with the loop's time)."""

    def drain(self) -> None:
        """Shutdown: close when idle, else after the response in flight."""

    def cut(self) -> None:
        """Close at once (the reloaded trust refuses the client)."""

    def abort(self) -> None:
        """The drain grace is over: close without waiting."""

    def verified_chain(self) -> list[x509.Certificate] | None:
        """The client's chain as verified (empty: no certificate; None: not known)."""


class DataPlane:
    """The state one listener's connections share; `gen` is swapped whole on reload."""

    def __init__(
        self,
        cfg: Config,
        gen: Generation,
        metrics: Metrics,
        pool: UpstreamPool,
        clock: Callable[[], float],
        access_log: AccessLog | None,
    ) -> None:
        self.cfg = cfg
        self.gen = gen
        self.clock = clock  # the event loop's time(): deadlines are compared against it
        self.access_log = access_log
        self.metrics = metrics
        self.pool = pool
        self.h2pool: H2UpstreamPool | None = None  # --upstream-protocol h2c|auto (h2upstream.py)
        self.connections: set[Connection] = set()
        self.chains = ChainMemo()  # the verified chains behind resumed sessions
        self.draining = False
        # --otlp-endpoint: the spans (set by the server), whose start is then trace_make.
        self.tracing: Tracing | None = None
        self.trace_make: ChildFactory | None = created if cfg.trace_context == "create" else None
        u = cfg.upstream
        self.upstream_host = (u.host_header if u.scheme != "unix" else "localhost").encode()
