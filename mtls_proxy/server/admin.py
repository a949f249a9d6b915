"""The admin listener: /healthz, /readyz, /status, /metrics (plain HTTP, loopback by default)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Final, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mtls_proxy import __version__

if TYPE_CHECKING:
    import socket

    from prometheus_client import CollectorRegistry

    from mtls_proxy.core.config import Config
    from mtls_proxy.material.tls import Material


class AdminTarget(Protocol):
    """What the admin endpoints read: a ProxyServer, or the workers' Master for all workers."""

    cfg: Config

    @property
    def last_reload(self) -> dict[str, object] | None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def connections_open(self) -> int: ...
    @property
    def registry(self) -> CollectorRegistry: ...
    async def refresh(self) -> None: ...
    def material_status(self) -> dict[str, object]: ...


def material_status(m: Material) -> dict[str, object]:
    """The /status fields that describe the loaded material."""
    return {
        "server_cert": {
            "subject": m.server_subject,
            "sha256": m.server_sha256,
            "not_after": rfc3339(m.not_after),
        },
        "trusted_cas": len(m.ca_certs),
    }


SERVER: Final[web.AppKey[AdminTarget]] = web.AppKey("server")


def rfc3339(t: dt.datetime | None) -> str | None:
    """UTC time as ``2026-12-01T00:00:00Z``."""
    if t is None:
        return None
    return t.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when listening with valid material and not draining."""
    server = request.app[SERVER]
    if server.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "draining" if server.draining else "starting"}, status=503)


async def status(request: web.Request) -> web.Response:
    """A JSON summary of what the proxy runs with."""
    server = request.app[SERVER]
    await server.refresh()
    return web.json_response(
        {
            "version": __version__,
            "listen": str(server.cfg.listen),
            "upstream": server.cfg.upstream.url,
            **server.material_status(),
            "last_reload": server.last_reload,
            "connections_open": server.connections_open,
            "draining": server.draining,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    server = request.app[SERVER]
    await server.refresh()
    body = generate_latest(server.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def admin_app(server: AdminTarget) -> web.Application:
    """The admin application bound to *server*."""
    app = web.Application()
    app[SERVER] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_admin(target: AdminTarget, sock: socket.socket) -> tuple[web.AppRunner, str]:
    """Serve the admin endpoints for *target* on the bound *sock*: (runner, "host:port")."""
    runner = web.AppRunner(admin_app(target), access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    return runner, f"{host}:{port}"
