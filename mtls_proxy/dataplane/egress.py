"""`client` in its default L4 mode: each local plaintext connection gets one mTLS connection to
the target (dialer.py), and bytes pass both ways untouched.

Rules:
1. The local app's bytes are held (at most BUFFER_LIMIT, then it is not read) until the target
   is reached and verified; a target that cannot be reached or is refused closes the local
   connection, with one log record and the metrics saying why.
2. Half-close both ways: the app's FIN becomes close_notify + FIN to the target, the target's
   end becomes a FIN to the app, and the other direction stays open.
3. Back-pressure: a side whose peer reads slowly stops being read.
4. A reset on either side reaches the other as a reset, never as a clean end.
5. One access record per connection (JSON, logger mtls_proxy.client): bytes both ways, the
   duration, how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from mtls_proxy.dataplane.dialer import DialError, RemoteTLS

if TYPE_CHECKING:
    from mtls_proxy.dataplane.dialer import Dialer
    from mtls_proxy.telemetry.egress import ClientMetrics

logger = logging.getLogger("mtls_proxy.client")
BUFFER_LIMIT: Final = 256 * 1024


class EgressPlane:
    """What every egress connection shares: the dialer, the metrics, the open connections."""

    def __init__(
        self, dialer: Dialer, metrics: ClientMetrics, access_log: bool, max_connections: int
    ) -> None:
        self.dialer, self.metrics, self.access_log = dialer, metrics, access_log
        self.max_connections = max_connections
        self.connections: set[EgressRelay] = set()

    def dial_failed(self, exc: DialError, client: str) -> None:
        """The log record and the metrics of a target not reached (rule 1)."""
        m = self.metrics
        if exc.stage == "tls":
            m.handshakes.labels(result="failed").inc()
        if exc.reason is not None:
            m.verify_failures.labels(reason=exc.reason).inc()
        else:
            m.connect_errors.labels(stage=exc.stage).inc()
        cfg = self.dialer.cfg
        logger.warning(
            "target not reached",
            extra={
                "target": str(cfg.target),
                "server_name": cfg.server_name,
                "stage": exc.stage,
                "reason": exc.reason,
                "error": str(exc),
                "client": client,
            },
        )

    def dialed(self, remote: RemoteTLS) -> None:
        """A handshake that succeeded."""
        self.metrics.handshakes.labels(result="resumed" if remote.resumed else "ok").inc()


class EgressRelay(asyncio.Protocol):
    """One local connection (rules 1-5)."""

    def __init__(self, plane: EgressPlane, idle_timeout: float) -> None:
        self.plane, self.idle_timeout = plane, idle_timeout
        self.local: asyncio.Transport | None = None
        self.remote: RemoteTLS | None = None
        self.start = time.monotonic()
        self.deadline = self.start + idle_timeout
        self.bytes_sent = self.bytes_received = 0
        self.client = "-"
        self.ended = "closed"
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._local_eof = self._remote_eof = False
        self._task: asyncio.Task[None] | None = None

    # -- the local side -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.local = transport  # type: ignore[assignment]  # a stream transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        plane = self.plane
        if len(plane.connections) >= plane.max_connections:
            # Over --max-connections: closed at once, before any dial; not a relay to count.
            self.local = None
            transport.abort()  # type: ignore[attr-defined]  # a stream transport
            return
        plane.connections.add(self)
        plane.metrics.connections.inc()
        plane.metrics.connections_open.inc()
        self._task = asyncio.get_running_loop().create_task(self._open())

    def data_received(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.deadline = time.monotonic() + self.idle_timeout
        if self.remote is not None:
            self.remote.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > BUFFER_LIMIT and self.local is not None:
            self.local.pause_reading()

    def eof_received(self) -> bool:
        self._local_eof = True
        if self.remote is not None:
            self.remote.write_eof()
        self._maybe_done()
        return True  # the target may still answer (rule 2)

    def pause_writing(self) -> None:
        if self.remote is not None:
            self.remote.pause_reading()

    def resume_writing(self) -> None:
        if self.remote is not None:
            self.remote.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.local is None:  # refused in connection_made
            return
        self.local = None
        if exc is not None:  # rule 4; mid-dial too (the dial is cancelled, its socket closed)
            self.ended = "reset by the local app"
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.remote is not None:
            if exc is None:
                self.remote.close()
            else:  # rule 4
                self.remote.abort()
            self.remote = None
        plane = self.plane
        plane.connections.discard(self)
        plane.metrics.connections_open.dec()
        m = plane.metrics.bytes
        m.labels(direction="sent").inc(self.bytes_sent)
        m.labels(direction="received").inc(self.bytes_received)
        if plane.access_log:
            logger.info(
                "connection",
                extra={
                    "client": self.client,
                    "target": str(plane.dialer.cfg.target),
                    "bytes_sent": self.bytes_sent,
                    "bytes_received": self.bytes_received,
                    "duration_ms": int((time.monotonic() - self.start) * 1e6) / 1000,
                    "ended": self.ended,
                },
            )

    # -- the remote side -------------------------------------------------------------------------
    async def _open(self) -> None:
        plane = self.plane
        try:
            remote = await plane.dialer.dial(lambda: _Remote(self))
        except DialError as exc:
            plane.dial_failed(exc, self.client)
            self.ended = f"target not reached ({exc.stage})"
            if self.local is not None:
                self.local.close()
            return
        except Exception as exc:  # a bug: the app must not wait for a relay that never starts
            logger.error("dialing the target raised", exc_info=exc)
            self.ended = f"internal error ({type(exc).__name__})"
            if self.local is not None:
                self.local.abort()
            return
        plane.dialed(remote)
        if self.local is None:  # the app left meanwhile
            remote.close()
            return
        self.remote = remote
        held, self._held = self._held, []
        if held:
            remote.write(b"".join(held))
        self._held_bytes = 0
        self.local.resume_reading()
        if self._local_eof:
            remote.write_eof()

    def from_remote(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self.deadline = time.monotonic() + self.idle_timeout
        if self.local is not None:
            self.local.write(data)

    def remote_eof(self) -> None:
        self._remote_eof = True
        if self.local is not None and self.local.can_write_eof():
            self.local.write_eof()
        self._maybe_done()

    def remote_lost(self, exc: Exception | None) -> None:
        self.remote = None
        if self.local is None:
            return
        if exc is None:
            self.local.close()
        else:  # rule 4
            self.ended = "reset by the target"
            self.local.abort()

    # -- shared ----------------------------------------------------------------------------------
    def _maybe_done(self) -> None:
        if self._local_eof and self._remote_eof and self.local is not None:
            self.local.close()

    def check_idle(self, now: float) -> None:
        """--idle-timeout with no byte either way."""
        if now >= self.deadline:
            self.ended = "idle timeout"
            self.abort()

    def abort(self) -> None:
        """Close both sides now (idle, shutdown's end)."""
        if self.remote is not None:
            self.remote.abort()
        if self.local is not None:
            self.local.abort()


class _Remote(asyncio.Protocol):
    """The target's side of one relay."""

    def __init__(self, relay: EgressRelay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.from_remote(data)

    def eof_received(self) -> bool:
        self.relay.remote_eof()
        return True

    def pause_writing(self) -> None:
        if self.relay.local is not None:
            self.relay.local.pause_reading()

    def resume_writing(self) -> None:
        if self.relay.local is not None:
            self.relay.local.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.remote_lost(exc)
