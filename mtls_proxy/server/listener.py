"""Lifecycle: listeners, the accept loop under the connection cap, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
import ssl
import time
from typing import TYPE_CHECKING, Final

from mtls_proxy import __version__
from mtls_proxy.dataplane import h2lib, handshakes
from mtls_proxy.dataplane.admission import Refused, admit
from mtls_proxy.dataplane.connection import Http1Connection
from mtls_proxy.dataplane.h2conn import H2Connection
from mtls_proxy.dataplane.h2upstream import H2UpstreamPool
from mtls_proxy.dataplane.l4 import TcpRelay
from mtls_proxy.dataplane.plane import DataPlane
from mtls_proxy.dataplane.tlsconn import TLSServerLayer
from mtls_proxy.dataplane.upstream import UpstreamPool
from mtls_proxy.material.contexts import classify_handshake_error, upstream_context
from mtls_proxy.material.generation import Generation, build
from mtls_proxy.material.loader import load_policy
from mtls_proxy.material.tls import Material
from mtls_proxy.server.admin import material_status, serve_admin
from mtls_proxy.server.adminhttp import AdminServer
from mtls_proxy.server.reloader import Reloader
from mtls_proxy.server.sockets import bind
from mtls_proxy.telemetry.logs import AccessLog, RateLimiter
from mtls_proxy.telemetry.metrics import Metrics
from mtls_proxy.telemetry.tracing import Tracing

if TYPE_CHECKING:
    import ssl as ssl_

    from prometheus_client import CollectorRegistry

    from mtls_proxy.core.config import Config
    from mtls_proxy.core.policy import Policy

logger = logging.getLogger("mtls_proxy.server")  # a stable name: log filters outlive module paths
SWEEP_INTERVAL: Final = 0.25


def raise_fd_limit(max_connections: int) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one: each client may cost two descriptors
    (itself and an upstream connection), and the default soft limit (1024) is far below the
    default --max-connections (nginx's worker_rlimit_nofile does the same)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections * 2 + 256
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < max_connections + 256:  # not even one descriptor per client
            logger.warning(
                "open-file limit %d is below what --max-connections %d may need (%d)",
                new,
                max_connections,
                want,
            )


class ProxyServer:
    """One proxy process: the mTLS listener, the admin listener and their shared state."""

    def __init__(
        self,
        cfg: Config,
        material: Material,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        policy: Policy | None = None,
    ) -> None:
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.metrics = metrics or Metrics()
        if cfg.http2 == "on":
            self.metrics.label_protocol()
        if cfg.http2 == "on" or cfg.upstream_protocol != "http1":
            h2lib.select(cfg.h2_library)  # ConfigError (exit 2) when jh2 is asked for and absent
        pool = UpstreamPool(
            cfg.upstream,
            cfg.upstream_timeout,
            ssl_context=upstream_context(cfg.upstream_cacert)
            if cfg.upstream.scheme == "https"
            else None,
        )
        loop = asyncio.get_running_loop()
        access = AccessLog(cfg.log_format) if cfg.access_log else None
        gen = build(cfg, material, policy if policy is not None else load_policy(cfg))
        self.plane = DataPlane(cfg, gen, self.metrics, pool, loop.time, access)
        if cfg.otlp_endpoint is not None:  # ConfigError (exit 2) without the otel extra
            self.plane.tracing = tracing = Tracing(cfg.otlp_endpoint)
            self.plane.trace_make = tracing.start
        if cfg.upstream_protocol != "http1":
            self.plane.h2pool = H2UpstreamPool(
                cfg.upstream, cfg.upstream_timeout, cfg.h2_max_header_list_bytes
            )
        self.reloader = Reloader(cfg, self.plane, self.metrics)
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeps = 0
        # --reload-interval: compare the files' stamps every so many sweeps.
        self._poll_every = (
            max(1, round(cfg.reload_interval / SWEEP_INTERVAL)) if (cfg.reload_interval > 0) else 0
        )
        self.listening = False
        self._hup_early = False  # SIGHUP before the listener was up (run())
        self.sock: socket.socket | None = None
        self.admin_runner: AdminServer | None = None
        self.admin_address: str | None = None
        # One slot per connection (--max-connections), held from accept until its socket closes.
        self._connection_slots = asyncio.Semaphore(cfg.max_connections)
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self._handshake_log = RateLimiter(10)

    @property
    def gen(self) -> Generation:
        """The generation new connections are accepted under (generation.py)."""
        return self.plane.gen

    @property
    def material(self) -> Material:
        """The material in effect."""
        return self.plane.gen.material

    @property
    def last_reload(self) -> dict[str, object] | None:
        """The last reload's outcome (/status)."""
        return self.reloader.last_reload

    async def reload(self) -> bool:
        """Load the files again and swap, or keep serving the old generation (reloader.py)."""
        return await self.reloader.reload()

    async def refresh(self) -> None:
        """Nothing to gather: one process holds all its state (see workers.Master)."""

    def material_status(self) -> dict[str, object]:
        """The /status fields of the material in effect."""
        return material_status(self.material)

    @property
    def ready(self) -> bool:
        """Listening with valid material and not draining."""
        return self.listening and not self.plane.draining

    @property
    def draining(self) -> bool:
        """SIGTERM came: finishing what is in flight (admin.AdminTarget)."""
        return self.plane.draining

    @property
    def connections_open(self) -> int:
        """Client connections past their handshake (admin.AdminTarget)."""
        return len(self.plane.connections)

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry the admin port exposes (admin.AdminTarget)."""
        return self.metrics.registry

    @property
    def address(self) -> tuple[str, int]:
        """The bound listener address (useful with port 0)."""
        assert self.sock is not None  # noqa: S101 -- only called after start()
        host, port = self.sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind both listeners and start accepting."""
        if self.cfg.admin is not None:
            admin_sock = bind(self.cfg.admin, backlog=128, option="--admin")  # port 0 works
            self.admin_runner, self.admin_address = await serve_admin(self, admin_sock)
        raise_fd_limit(self.cfg.max_connections)
        self.sock = bind(self.cfg.listen, reuse_port=self.reuse_port, option="--listen")
        self.listening = True
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        self.reloader.start_watching()
        self._sweep()
        # Everything loaded so far (cryptography, prometheus_client, config) lives for the whole
        # process: move it out of the collector's view so that full collections stay short (p99).
        gc.collect()
        gc.freeze()
        self.started.set()
        host, port = self.address
        # One "ready" line per proxy (docs/cli.md, Signals): a worker's says "worker ready".
        logger.info(
            "worker ready" if self.reuse_port else "ready",
            extra={
                "listen": f"{host}:{port}",
                "admin": self.admin_address,
                "upstream": self.cfg.upstream.url,
                "version": __version__,
                "server_cert_sha256": self.material.server_sha256,
            },
        )

    def _sweep(self) -> None:
        # Timeouts are deadlines checked here, 4 times a second (dataplane/connection.py rule 4).
        now = self.plane.clock()
        for conn in list(self.plane.connections):
            conn.check_deadlines(now)
        self._sweeps += 1
        if self._poll_every and self._sweeps % self._poll_every == 0:
            self.reloader.poll()
        if self._sweeps % 40 == 0 and self.material.crls:  # every 10 s
            self.reloader.check_crl_expiry()
        if self.cfg.tls.sessions == "cache":
            self.reloader.bound_session_cache()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock
        assert sock is not None  # noqa: S101 -- set by start()
        while True:
            # At the cap, stop accepting: new connections wait in the kernel backlog.
            await self._connection_slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self._connection_slots.release()
                logger.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)  # e.g. EMFILE: back off instead of spinning
                continue
            except BaseException:
                self._connection_slots.release()
                raise
            self._spawn(loop, conn)
            # Under load several connections are waiting: take them without another wakeup.
            while not self._connection_slots.locked():
                try:
                    conn, _ = sock.accept()
                except OSError:  # BlockingIOError when the backlog is empty; retried above
                    break
                await self._connection_slots.acquire()  # not locked: returns at once
                self._spawn(loop, conn)

    def _spawn(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = loop.create_task(self._handshake(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        client = "-"
        gen, plane = self.plane.gen, self.plane  # the generation this connection is accepted under
        release = self._connection_slots.release

        tcp_mode = self.cfg.mode == "tcp"

        def admitted(sslobj: ssl_.SSLObject) -> Http1Connection | H2Connection | TcpRelay:
            # After a successful handshake: who the client is, or Refused (admission.py); the
            # protocol is the one ALPN chose (h2 only with --http2 on).
            if tcp_mode:
                try:
                    return TcpRelay(plane, admit(plane, gen, sslobj), release)
                except Refused as exc:
                    exc.answer = b""  # a TCP service's client reads no HTTP: just the close
                    raise
            peer = admit(plane, gen, sslobj)
            if sslobj.selected_alpn_protocol() == "h2":
                return H2Connection(plane, peer, release)
            return Http1Connection(plane, peer, release)

        # What the client shows (SNI, version, leaf) is captured for the log of a failure: the
        # transport's callbacks run in a copy of this task's context (handshakes.py).
        handshakes.watch(gen.context)
        handshakes.SEEN.set(seen := handshakes.Seen())
        layer: TLSServerLayer | None = None
        try:
            client = str(conn.getpeername()[0])
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Our own TLS layer (tlsconn.py), so that a refused client receives the alert.
            tls = TLSServerLayer(gen.context, admitted, patience=self.cfg.send_timeout)
            await loop.connect_accepted_socket(lambda: tls, conn)
            layer = tls  # the transport owns the socket from here
            done, _ = await asyncio.wait((layer.handshake,), timeout=self.cfg.handshake_timeout)
            if not done:
                layer.handshake.cancel()
                layer.abort()
                raise TimeoutError("the TLS handshake took longer than --handshake-timeout")
            layer.handshake.result()  # raises the handshake's error
        except asyncio.CancelledError:  # shutdown: handshakes are not drained
            conn.close()
            if layer is not None:
                layer.handshake.cancel()
                layer.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, EOFError, Refused) as exc:
            seen.done = True
            if isinstance(exc, Refused):  # found after the handshake (strict.py, revocation.py)
                self._handshake_failed(exc.reason, client, exc.why, seen)
            else:
                self._handshake_failed(classify_handshake_error(exc), client, exc, seen)
            if layer is None:
                conn.close()
                release()
            else:  # no connection was made: the socket holds the slot until it has closed
                layer.when_lost(release)
            return
        seen.done = True
        seen.leaf = None  # the connection's context keeps *seen*: not its certificate
        self.metrics.handshake("ok")
        self.metrics.connections.inc()
        if layer.get_extra_info("ssl_object").session_reused:
            self.metrics.resumed.inc()

    def _handshake_failed(
        self, reason: str, client: str, exc: BaseException | str, seen: handshakes.Seen
    ) -> None:
        self.metrics.handshake("failed", reason)
        suppressed = self._handshake_log.allow(time.monotonic())
        if suppressed is not None:
            # OpenSSL's reason string names the check that failed, never key material.
            error = (
                exc
                if isinstance(exc, str)
                else (getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__)
            )
            logger.info(
                "handshake failed",
                extra={
                    "reason": reason,
                    "client": client,
                    "error": str(error)[:300],
                    # The SNI, TLS version and the leaf's SHA-256, subject and issuer (if the
                    # client sent one): names only, never the certificate.
                    **seen.fields(),
                    "suppressed": suppressed,
                },
            )

    def request_stop(self) -> None:
        """Ask run() to drain and return (SIGTERM/SIGINT); again while draining: logged only."""
        if self._stop.is_set():
            logger.info("already draining", extra={"grace_s": self.cfg.shutdown_grace})
        self._stop.set()

    async def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        # Handlers first: "ready" is logged inside start(), and a SIGTERM or SIGHUP sent on
        # seeing it must not meet the default action (kill).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        await self.start()
        if self._hup_early:  # a SIGHUP during start(): the files may have changed since
            self._on_hup()
        try:
            await self._stop.wait()
        finally:
            # The handlers stay while draining: a second SIGTERM or a SIGHUP must not fall back
            # to the default action (kill) in the middle of the drain (RES-26, RES-27).
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_hup(self) -> None:
        if not self.listening:
            self._hup_early = True
            return
        if self.plane.draining:
            logger.info("SIGHUP ignored: draining")
            return
        asyncio.get_running_loop().create_task(self.reload())

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight requests up to the grace period, close."""
        plane = self.plane
        plane.draining = True
        logger.info(
            "draining",
            extra={"connections": len(plane.connections), "grace_s": self.cfg.shutdown_grace},
        )
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self.sock is not None:
            self.sock.close()  # new connections are refused from here on
        self.listening = False
        for conn in list(plane.connections):
            conn.drain()
        # Handshakes in progress are cancelled, not drained (as ghostunnel does, RES-25): no
        # request has been made on them yet.
        for task in list(self._handshakes):
            task.cancel()
        deadline = time.monotonic() + self.cfg.shutdown_grace
        # A 50 ms poll during shutdown is simpler than an event per connection.
        while plane.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for conn in list(plane.connections):
            conn.abort()
        for task in list(self._handshakes):
            task.cancel()
        plane.pool.close()
        if plane.h2pool is not None:
            plane.h2pool.close()
        self.reloader.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if plane.access_log is not None:
            plane.access_log.flush()
        if plane.tracing is not None:  # the spans still queued (it waits for the collector)
            await asyncio.to_thread(plane.tracing.shutdown)
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        logger.info("stopped")
