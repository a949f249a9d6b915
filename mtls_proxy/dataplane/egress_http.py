"""`client --http`: the local app speaks plain HTTP/1.1; requests go to the target over pooled
keep-alive mTLS connections (handshakes amortised), streamed both ways.

Rules:
1. The local side is aiohttp's server (its C parser, llhttp); the target side aiohttp's client
   over `DialerConnector`, whose connections are dialer.py's: the same proxy, handshake and
   remote checks as the L4 mode, nothing of a request sent before the remote passed them.
2. `Host` is the target's (or --override-server-name's), as the remote's virtual hosts expect
   (ghostunnel users ask for this); hop-by-hop headers (RFC 9110 7.6.1, and those `Connection`
   names) are not forwarded either way; the rest passes untouched, bodies too (no decoding).
   Nothing is added: no X-Forwarded-*, the remote sees our certificate, not the app's address.
3. A target not reached or refused is a 502, a response not started within --upstream-timeout
   a 504, each a short JSON body as serve's (`{"error": ..., "reason": ...}`).
4. Upgrades (WebSocket) are not carried in this mode: 501; the L4 mode carries them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict
from yarl import URL

from mtls_proxy.dataplane.dialer import DialError

if TYPE_CHECKING:
    from mtls_proxy.dataplane.egress import EgressPlane

logger = logging.getLogger("mtls_proxy.client")
HOP_BY_HOP: Final = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "proxy-authorization", "proxy-authenticate", "host",
    }
)  # fmt: skip
PLANE: Final[web.AppKey[EgressPlane]] = web.AppKey("plane")
POOL: Final[web.AppKey[Pool]] = web.AppKey("pool")


class DialerConnector(aiohttp.BaseConnector):
    """aiohttp connections made by the dialer (rule 1)."""

    def __init__(self, plane: EgressPlane, idle: float) -> None:
        super().__init__(keepalive_timeout=idle, limit=0)
        self.plane = plane

    async def _create_connection(  # aiohttp's hook, as its UnixConnector overrides it
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 -- aiohttp's signature
    ) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        remote = await self.plane.dialer.dial(lambda: ResponseHandler(loop))
        self.plane.dialed(remote)
        proto = remote.get_protocol()
        if not isinstance(proto, ResponseHandler):  # the factory above made it
            raise TypeError(type(proto).__name__)
        return proto


class Pool:
    """The keep-alive connections to the target. After a reload that changed our certificate
    or the trust, `renew` starts a new pool: new requests get connections made with the new
    material, and the old pool is closed once its requests had --shutdown-grace to finish."""

    def __init__(self, plane: EgressPlane, idle: float, grace: float) -> None:
        self.plane, self.idle, self.grace = plane, idle, grace
        self.session = self._new()
        self._old: set[asyncio.Task[None]] = set()

    def _new(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=DialerConnector(self.plane, self.idle), auto_decompress=False
        )

    def renew(self) -> None:
        """Rule: connections made with the old material are not reused."""
        old, self.session = self.session, self._new()

        async def retire() -> None:
            await asyncio.sleep(self.grace)
            await old.close()

        task = asyncio.get_running_loop().create_task(retire())
        self._old.add(task)
        task.add_done_callback(self._old.discard)

    async def close(self) -> None:
        """Shutdown."""
        for task in list(self._old):
            task.cancel()
        await self.session.close()


def _forwardable(headers: Any) -> CIMultiDict[str]:
    """Rule 2: everything but hop-by-hop fields and those Connection names."""
    named = {
        t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")
    }  # fmt: skip
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in named:
            out.add(name, value)
    return out


def _origin_form(request: web.Request) -> str:
    """The request target in origin form (an absolute-form target's path and query: the
    remote is the target, whatever host the app named), otherwise exactly as sent."""
    url = request.message.url
    return url.raw_path_qs if url.is_absolute() else request.raw_path


def _error(status: int, error: str, reason: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status)


async def forward(request: web.Request) -> web.StreamResponse:
    """One request of the local app, to the target and back (rules 2-4)."""
    plane = request.app[PLANE]
    cfg = plane.dialer.cfg
    start = time.monotonic()
    status, error = 0, None
    try:
        if "upgrade" in request.headers.get("Connection", "").lower():
            status = 501
            return _error(501, "not_implemented", "upgrades are carried by the L4 mode (no --http)")
        out = await _exchange(request, plane)
        status = out.status
        return out
    except DialError as exc:
        plane.dial_failed(exc, request.remote or "-")
        status, error = (504 if exc.stage == "timeout" else 502), str(exc)
        return _error(status, "bad_gateway" if status == 502 else "gateway_timeout", str(exc))
    except TimeoutError:
        status, error = 504, "no response within --upstream-timeout"
        return _error(504, "gateway_timeout", error)
    except aiohttp.ClientError as exc:
        status, error = 502, f"{type(exc).__name__}: {exc}"
        return _error(502, "bad_gateway", error)
    finally:
        duration = time.monotonic() - start
        plane.metrics.requests.labels(status=str(status or 499)).inc()
        plane.metrics.request_duration.observe(duration)
        if plane.access_log:
            logger.info(
                "request",
                extra={
                    "client": request.remote,
                    "method": request.method,
                    "path": request.path,
                    "target": str(cfg.target),
                    "status": status or 499,
                    "duration_ms": int(duration * 1e6) / 1000,
                    "error": error,
                },
            )


async def _exchange(request: web.Request, plane: EgressPlane) -> web.StreamResponse:
    cfg = plane.dialer.cfg
    headers = _forwardable(request.headers)
    port = cfg.target.port
    headers["Host"] = cfg.server_name if port == 443 else f"{cfg.server_name}:{port}"
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        headers.popall("Content-Length", None)
    session = request.app[POOL].session
    timeout = aiohttp.ClientTimeout(total=None, sock_read=cfg.upstream_timeout)
    async with session.request(
        request.method,
        # The app's request target as it sent it: encoded=True keeps yarl from normalising
        # dot segments or re-encoding (rule 2: nothing is changed on the way). The connector
        # always dials the target, whatever the URL's host says.
        URL("http://target" + _origin_form(request), encoded=True),
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=timeout,
    ) as resp:
        out = _Relayed(status=resp.status, reason=resp.reason)
        out.not_added = [n for n in ("Content-Type", "Server") if n not in resp.headers]
        for name, value in _forwardable(resp.headers).items():
            out.headers.add(name, value)
        if resp.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out.headers.popall("Content-Length", None)
        await out.prepare(request)
        if request.method != "HEAD":
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        await out.write_eof()
        return out


class _Relayed(web.StreamResponse):
    """The remote's response as it was (rule 2): aiohttp's defaults for a response of its own,
    a `Content-Type: application/octet-stream` (which stops the app sniffing) and its
    `Server`, are not the remote's and are taken out again. (`Date` stays: RFC 9110 6.6.1
    has an intermediary with a clock add it.)"""

    not_added: list[str]

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for name in self.not_added:
            self.headers.popall(name, None)


def egress_app(plane: EgressPlane, pool: Pool) -> web.Application:
    """The local HTTP application."""
    app = web.Application(client_max_size=0)
    app[PLANE], app[POOL] = plane, pool
    # Every path, a decoded newline too (`.` would not match one: a 404 of our own).
    app.router.add_route("*", r"/{tail:[\s\S]*}", forward)
    return app
