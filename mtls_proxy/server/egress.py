"""`mtls-proxy client`'s process: the local listener (L4 or --http), the admin port, reloads and
signals, as serve's listener.py does for the way in.

Rules:
1. Reload (file watch, --reload-interval polling, SIGHUP) loads our certificate and the trust
   off the loop; new connections use the new material at once, open ones keep theirs; broken
   material keeps the old and says why (log, mtls_proxy_client_reloads_total, /status).
2. /readyz is 200 when listening, not draining, and the first hop (the proxy, else the target)
   accepts a TCP connection: an egress tunnel that cannot reach its target is not ready.
3. SIGTERM: stop accepting, let open connections finish for --shutdown-grace, then cut them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mtls_proxy import __version__
from mtls_proxy.core.addresses import Address
from mtls_proxy.core.egress import Listen, is_local
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.dataplane.dialer import Dialer, DialError
from mtls_proxy.dataplane.egress import EgressPlane, EgressRelay
from mtls_proxy.material.egress import ClientMaterial, client_context, load_client_material
from mtls_proxy.material.loader import DetachedLoads
from mtls_proxy.material.tls import CERT_DIR_NAMES
from mtls_proxy.server.admin import healthz, json_answer, rfc3339
from mtls_proxy.server.adminhttp import AdminServer, Answer, Route, serve_routes
from mtls_proxy.server.sockets import bind
from mtls_proxy.server.watch import FileWatch
from mtls_proxy.telemetry.egress import ClientMetrics

if TYPE_CHECKING:
    from aiohttp import web

    from mtls_proxy.core.egress import ClientConfig
    from mtls_proxy.dataplane.egress_http import Pool

logger = logging.getLogger("mtls_proxy.client")
RELOAD_TIMEOUT: Final = 10.0


class EgressServer:
    """One `client` process."""

    def __init__(self, cfg: ClientConfig, material: ClientMaterial) -> None:
        self.cfg, self.material = cfg, material
        self.metrics = ClientMetrics()
        self.dialer = Dialer(cfg, client_context(cfg, material))
        self.plane = EgressPlane(self.dialer, self.metrics, cfg.access_log, cfg.max_connections)
        self.last_reload: dict[str, object] | None = None
        self.listening = self.draining = False
        self.address = ""
        self.admin_address: str | None = None
        self._watch = FileWatch(self._paths, self._changed)
        self._loads = DetachedLoads(RELOAD_TIMEOUT)
        self._stop = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self._admin: AdminServer | None = None
        self._server: asyncio.Server | None = None
        self._pool: Pool | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeps = 0
        self._reach: tuple[float, bool] = (-1e9, False)
        self._expiry()

    # -- start and stop ----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the admin port and the listener, and start watching the files."""
        cfg = self.cfg
        if cfg.admin is not None:
            sock = bind(cfg.admin, backlog=128, option="--admin")
            self._admin = await serve_routes(_admin_routes(self), sock)
            host, port = sock.getsockname()[:2]
            self.admin_address = f"{host}:{port}"
        sock = self._bind()
        if cfg.http:
            # aiohttp only in --http mode (adminhttp.py: 14 MB of RSS otherwise).
            from aiohttp import web

            from mtls_proxy.dataplane.egress_http import Pool, egress_app

            self._pool = Pool(self.plane, cfg.idle_timeout, cfg.shutdown_grace)
            runner = web.AppRunner(
                egress_app(self.plane, self._pool), access_log=None, handle_signals=False,
                keepalive_timeout=cfg.idle_timeout,
                shutdown_timeout=cfg.shutdown_grace,  # rule 3 (aiohttp's own default is 60 s)
            )  # fmt: skip
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self._runners.append(runner)
        else:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: EgressRelay(self.plane, cfg.idle_timeout), sock=sock
            )
        name = sock.getsockname()
        self.address = f"unix:{name}" if isinstance(name, str) else f"{name[0]}:{name[1]}"
        self.listening = True
        self._watch.start()
        self._sweep()
        logger.info(
            "ready",
            extra={
                "listen": self.address,
                "target": str(cfg.target),
                "server_name": cfg.server_name,
                "mode": "http" if cfg.http else "l4",
                "proxy": cfg.proxy.url if cfg.proxy else None,
                "admin": self.admin_address,
                "version": __version__,
            },
        )

    def _bind(self) -> socket.socket:
        listen = self.cfg.listen
        if listen.address is not None:
            sock = bind(listen.address, option="--listen")
            # The config check trusts the name `localhost`; /etc/hosts or DNS decide what it
            # binds, so the bound address is checked too (core/egress.py rule 1).
            host = str(sock.getsockname()[0])
            if not self.cfg.unsafe_listen and not is_local(Listen(Address(host, 0))):
                sock.close()
                raise ConfigError(
                    f"--listen {listen.address}: resolved to {host}, which is not loopback; "
                    "anyone who reaches it speaks with our client certificate"
                )
            return sock
        path = listen.path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(Path(path).lstat().st_mode):
                Path(path).unlink()  # a socket left by an earlier run; any other file is refused
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Owner and group only: whoever can connect speaks with our certificate.
            Path(path).chmod(0o660)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(f"--listen unix:{path}: {exc.strerror or exc}") from exc
        return sock

    async def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT, drain, stop (rule 3)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._changed("SIGHUP"))
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def shutdown(self) -> None:
        """Stop accepting; open connections get --shutdown-grace, then are cut."""
        self.draining = True
        logger.info("draining", extra={"connections": len(self.plane.connections)})
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + self.cfg.shutdown_grace
        while self.plane.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for relay in list(self.plane.connections):
            relay.abort()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._pool is not None:
            await self._pool.close()
        self._watch.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.cfg.listen.address is None:
            with contextlib.suppress(OSError):
                Path(self.cfg.listen.path).unlink()  # noqa: ASYNC240 -- one unlink at exit
        self.listening = False
        logger.info("stopped")

    def _sweep(self) -> None:
        now = time.monotonic()
        for relay in list(self.plane.connections):
            relay.check_idle(now)
        self._sweeps += 1
        every = self.cfg.reload_interval
        if every and self._sweeps % max(1, round(every)) == 0:
            self._watch.poll()
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    # -- reload ------------------------------------------------------------------------------
    def _paths(self) -> list[Path]:
        t = self.cfg.tls
        files = (t.cert, t.key, t.cacert, t.keystore, t.truststore)
        paths = [Path(p) for p in files if p]
        if t.cert_dir:
            paths += [Path(t.cert_dir) / n for n in CERT_DIR_NAMES]
        return paths

    def _changed(self, why: str) -> None:
        if self.draining:
            return
        logger.info("reloadable files changed; reloading", extra={"trigger": why})
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> bool:
        """Load again; swap on success, keep the old on any error (rule 1)."""
        now = dt.datetime.now(dt.UTC)
        cfg = self.cfg
        try:
            material = await self._loads.run(lambda: load_client_material(cfg))
            if self.material.ca_certs and not material.ca_certs:
                # A --cert-dir whose ca.crt went missing would fall back to the system store:
                # trust must never widen by a file disappearing (red team note).
                raise ConfigError(
                    "the CAs to verify the target with are gone (ca.crt or the truststore); "
                    "keeping the previous trust, not the system store"
                )
            same = material.key() == self.material.key()
            context = None if same else client_context(cfg, material)
        except (ConfigError, OSError, ValueError) as exc:
            error = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            self.metrics.reloads.labels(result="failure").inc()
            self.last_reload = {"at": rfc3339(now), "ok": False, "error": error}
            logger.error("reload failed; keeping the previous material", extra={"error": error})
            return False
        if context is not None:
            self.dialer.context = context  # new connections from here on; open ones keep theirs
            if self._pool is not None:
                self._pool.renew()  # pooled keep-alive connections are not reused
        self.material = material
        self._expiry()
        self.metrics.reloads.labels(result="success").inc()
        self.last_reload = {"at": rfc3339(now), "ok": True, "error": None}
        own = material.own
        logger.info("reloaded", extra={"client_cert_sha256": own.server_sha256 if own else None})
        return True

    def _expiry(self) -> None:
        if self.material.not_after is not None:
            self.metrics.not_after.set(self.material.not_after.timestamp())

    # -- admin -------------------------------------------------------------------------------
    async def reachable(self) -> bool:
        """Rule 2: a dial succeeds (TCP, the proxy, the handshake and the checks, as a real
        connection's: a bare TCP probe would show in the remote's log as a failed handshake).
        Remembered for a second, so that probes cannot multiply dials."""
        now = time.monotonic()
        if now - self._reach[0] < 1.0:
            return self._reach[1]
        try:
            remote = await self.dialer.dial(asyncio.Protocol)
        except DialError as exc:
            ok, why = False, str(exc)
        else:
            remote.close()
            ok, why = True, ""
        self._reach = (time.monotonic(), ok)
        if not ok:
            logger.info("readiness: target not reached", extra={"error": why})
        return ok

    def status(self) -> dict[str, object]:
        """/status."""
        own = self.material.own
        cfg = self.cfg
        return {
            "version": __version__,
            "mode": "http" if cfg.http else "l4",
            "listen": self.address,
            "target": str(cfg.target),
            "server_name": cfg.server_name,
            "proxy": cfg.proxy.url if cfg.proxy else None,
            "client_cert": None
            if own is None
            else {
                "subject": own.server_subject,
                "sha256": own.server_sha256,
                "not_after": rfc3339(own.not_after),
            },
            "trusted_cas": len(self.material.ca_certs) or "system",
            "last_reload": self.last_reload,
            "connections_open": len(self.plane.connections),
            "draining": self.draining,
        }


def _admin_routes(server: EgressServer) -> dict[str, Route]:
    async def readyz() -> Answer:
        if server.draining or not server.listening:
            state = "draining" if server.draining else "starting"
            return json_answer({"status": state}, 503)
        if not await server.reachable():
            return json_answer({"status": "target unreachable"}, 503)
        return json_answer({"status": "ready"})

    async def status() -> Answer:
        return json_answer(server.status())

    async def metrics() -> Answer:
        return 200, CONTENT_TYPE_LATEST, generate_latest(server.metrics.registry)

    return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/metrics": metrics}
