"""The admin listener: /healthz, /readyz, /status, /metrics (plain HTTP, loopback by default)."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mtls_proxy import __version__
from mtls_proxy.server.adminhttp import JSON, AdminServer, Answer, Route, serve_routes

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


def rfc3339(t: dt.datetime | None) -> str | None:
    """UTC time as ``2026-12-01T00:00:00Z``."""
    if t is None:
        return None
    return t.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def json_answer(data: object, status: int = 200) -> Answer:
    """A JSON answer, as aiohttp's json_response made it."""
    return status, JSON, json.dumps(data).encode()


async def healthz() -> Answer:
    """Liveness: 200 while the process serves."""
    return json_answer({"status": "ok"})


def admin_routes(server: AdminTarget) -> dict[str, Route]:
    """The admin endpoints of *server* (SPEC section 7)."""

    async def readyz() -> Answer:
        """Readiness: 200 when listening with valid material and not draining."""
        if server.ready:
            return json_answer({"status": "ready"})
        return json_answer({"status": "draining" if server.draining else "starting"}, 503)

    async def status() -> Answer:
        """A JSON summary of what the proxy runs with."""
        await server.refresh()
        return json_answer(
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

    async def metrics() -> Answer:
        """Prometheus exposition."""
        await server.refresh()
        return 200, CONTENT_TYPE_LATEST, generate_latest(server.registry)

    return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/metrics": metrics}


async def serve_admin(target: AdminTarget, sock: socket.socket) -> tuple[AdminServer, str]:
    """Serve the admin endpoints for *target* on the bound *sock*: (server, "host:port")."""
    server = await serve_routes(admin_routes(target), sock)
    host, port = sock.getsockname()[:2]
    return server, f"{host}:{port}"
