"""`serve --mode tcp`: after the mTLS handshake and the allow-list, a byte relay to a TCP
service (a database, Redis, Kafka), with the client's identity passed on in a PROXY protocol v2
header when asked (core/proxyproto.py), as ghostunnel's server mode does.

Rules:
1. The allow-list decides once, right after the handshake, on identity alone (there is no
   path); a denied client is disconnected before any byte is relayed and counted as a denied
   request, one per connection.
2. An allowed client gets one new upstream connection (--upstream tcp://HOST:PORT or unix:path,
   within --upstream-timeout); the PROXY v2 header goes first, then the bytes the client sent
   meanwhile (at most BUFFER_LIMIT: beyond it the client is not read until the upstream is up).
3. Bytes pass both ways untouched. The client's end (EOF) is passed on as a TCP half-close, and
   the upstream may still answer; the upstream's end closes the client's TLS connection once
   the bytes before it are written (TLS has no half-close: close_notify ends both ways). Either
   side failing ends both.
4. Back-pressure: a side whose peer reads slowly stops being read (the transports' pause and
   resume). --idle-timeout cuts a connection with no byte either way for that long.
5. One access record and one request metric per connection: 200 when relayed, 403 when
   denied, 502/504 when the upstream could not be reached; bytes both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from mtls_proxy.core import proxyproto
from mtls_proxy.core.policy import decide_route
from mtls_proxy.dataplane.admission import connection_facts
from mtls_proxy.dataplane.handshakes import SEEN

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from mtls_proxy.core.identity import PeerIdentity
    from mtls_proxy.dataplane.admission import Peer
    from mtls_proxy.dataplane.plane import DataPlane

logger = logging.getLogger("mtls_proxy.proxy")
BUFFER_LIMIT: Final = 256 * 1024
MAX_LEAF_TLV: Final = 12 * 1024  # HAProxy 2.6 reads a PROXY header into a 16 KiB buffer


class TcpRelay(asyncio.Protocol):
    """One client connection in --mode tcp (plane.Connection)."""

    protocol = "tcp"

    def __init__(self, plane: DataPlane, admitted: Peer, release: Callable[[], None]) -> None:
        self.plane, self.admitted, self._release = plane, admitted, release
        self.transport: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self._held: list[bytes] = []  # client bytes before the upstream is up (rule 2)
        self._held_bytes = 0
        # Why the client is not read (rules 2 and 4): read again only when no reason holds.
        self._paused: set[str] = set()
        self._client_eof = self._up_eof = self.closed = self.aborting = False
        self.bytes_in = self.bytes_out = 0
        self.status = 0
        self.decision = "deny"
        self.rule: str | None = None
        self.reason: str | None = None
        self.start = time.monotonic()
        self.deadline = 0.0  # --idle-timeout (rule 4)
        self.log_fields = ""
        self._header = b""

    @property
    def peer(self) -> PeerIdentity | None:
        """The client's identity (None: no certificate)."""
        return self.admitted.identity

    def verified_chain(self) -> list[x509.Certificate] | None:
        """The client's verified chain (admission.Peer.verified_chain)."""
        return self.admitted.verified_chain()

    # -- the client side -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Decide (rule 1), then connect upstream (rule 2)."""
        self.transport = t = transport  # type: ignore[assignment]
        plane = self.plane
        _, _, self.log_fields = connection_facts(plane, self.admitted, t)
        plane.connections.add(self)
        plane.metrics.connections_open.inc()
        d = decide_route(plane.gen.policy, None, self.admitted.identity)
        self.decision, self.rule = d.kind, d.rule
        if not d.allowed:
            self.status, self.reason = d.status, d.reason
            self.closed = True
            t.close()  # no byte relayed: the record is written in connection_lost
            return
        if d.kind == "audit":
            self.reason = d.reason
        try:
            self._header = self._proxy_header(t)
        except ValueError as exc:  # proxyproto rule 4: never a cut header
            logger.warning("PROXY v2 header not written", extra={"error": str(exc)})
            self.status, self.reason = 502, f"PROXY v2 header: {exc}"
            self.closed = True
            t.close()
            return
        self.deadline = plane.clock() + plane.cfg.idle_timeout
        asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        """Client bytes: upstream, or held until it is up (rule 2)."""
        self.bytes_in += len(data)
        self._touch()
        if self.up is not None:
            self.up.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > BUFFER_LIMIT:
            self.pause_client("held")

    def eof_received(self) -> bool:
        """The client ended its side: so does the upstream's (rule 3)."""
        self._client_eof = True
        if self.up is not None and self.up.can_write_eof():
            self.up.write_eof()
        self._maybe_done()
        return True  # keep the connection: the upstream may still answer

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading the upstream (rule 4)."""
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up."""
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Rule 5: the record, once; the upstream goes too."""
        self.closed = True
        if self.up is not None:
            if exc is None:
                self.up.close()
            else:  # the client's reset reaches the upstream as one, not as a clean FIN
                self.up.abort()
            self.up = None
        self.transport = None
        self.admitted.sslobj = None
        plane = self.plane
        plane.connections.discard(self)
        plane.metrics.connections_open.dec()
        self._record()
        self._release()

    # -- plane.Connection ----------------------------------------------------------------------
    def check_deadlines(self, now: float) -> None:
        """--idle-timeout with no byte either way (rule 4)."""
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            self.abort()

    def drain(self) -> None:
        """Shutdown: a byte stream has no point to stop at; the listener's grace period ends it."""

    def cut(self) -> None:
        """The reloaded trust refuses this client."""
        self.admitted.sslobj = None
        self.abort()

    def abort(self) -> None:
        """Close both sides now."""
        self.aborting = True
        if self.up is not None:
            self.up.abort()
        if self.transport is not None:
            self.transport.abort()

    # -- the upstream side ---------------------------------------------------------------------
    async def _connect(self) -> None:
        plane = self.plane
        u = plane.cfg.upstream
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(plane.cfg.upstream_timeout):
                if u.scheme == "unix":
                    up, _ = await loop.create_unix_connection(lambda: _Upstream(self), u.path)
                else:
                    up, _ = await loop.create_connection(lambda: _Upstream(self), u.host, u.port)
        except (OSError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
            plane.metrics.upstream_errors.labels(kind=kind).inc()
            logger.warning(
                "upstream error",
                extra={"upstream": u.url, "kind": kind, "stage": "connect", "error": str(exc)},
            )
            self.status = 504 if kind == "timeout" else 502
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed:
            up.close()
            return
        self.status = 200
        self.up = up
        held, self._held = self._held, []
        up.write(self._header + b"".join(held))  # may pause the client ("upstream")
        self._held_bytes = 0
        self.resume_client("held")
        if self._client_eof and up.can_write_eof():
            up.write_eof()

    def _from_upstream(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._touch()
        if self.transport is not None:
            self.transport.write(data)

    def _upstream_eof(self) -> None:
        self._up_eof = True
        if self.transport is not None:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:  # TLS has no half-close (close_notify ends both ways): end after the bytes
                self.transport.close()
                return
        self._maybe_done()

    def _upstream_lost(self, exc: Exception | None) -> None:
        self.up = None
        if self.transport is not None:
            if exc is None:
                self.transport.close()
            else:  # a reset is no clean end: the client must not read a truncation as one
                self.aborting = True
                self.transport.abort()

    def pause_client(self, reason: str) -> None:
        """Stop reading the client for *reason* (rules 2, 4)."""
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_client(self, reason: str) -> None:
        """*reason* no longer holds; read the client again when none does."""
        self._paused.discard(reason)
        if not self._paused and self.transport is not None:
            self.transport.resume_reading()

    # -- internals -------------------------------------------------------------------------------
    def _touch(self) -> None:
        self.deadline = self.plane.clock() + self.plane.cfg.idle_timeout

    def _maybe_done(self) -> None:
        if self._client_eof and self._up_eof and self.transport is not None:
            self.transport.close()

    def _proxy_header(self, t: asyncio.BaseTransport) -> bytes:
        """The PROXY v2 header for --proxy-protocol (core/proxyproto.py rule 3), or b""."""
        mode = self.plane.cfg.proxy_protocol
        if mode == "off":
            return b""
        peer, sock = t.get_extra_info("peername"), t.get_extra_info("sockname")
        src = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        dst = (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else None
        tlvs = b""
        sslobj = self.admitted.sslobj
        if mode != "conn" and sslobj is not None:
            alpn = sslobj.selected_alpn_protocol()
            if alpn:
                tlvs += proxyproto.tlv(proxyproto.ALPN, alpn.encode("ascii"))
            seen = SEEN.get()
            if seen is not None and seen.sni:  # as the client sent it (handshakes: latin-1)
                tlvs += proxyproto.tlv(proxyproto.AUTHORITY, seen.sni.encode("latin-1", "replace"))
            full = mode == "tls-full"
            ident = self.admitted.identity
            cipher = sslobj.cipher()
            der = ident.der if full and ident is not None and ident.der else None
            if der is not None and len(der) > MAX_LEAF_TLV:
                # A leaf this big does not fit a TLV (65535) or HAProxy's 16 KiB buffer: the
                # header goes without it (the CN still says who), and the log says so.
                logger.warning("client certificate left out of the PROXY v2 header",
                               extra={"bytes": len(der)})  # fmt: skip
                der = None
            tlvs += proxyproto.ssl_tlv(
                sslobj.version() or "TLSv1.3",
                ident.cn[0] if full and ident is not None and ident.cn else None,
                der,
                cipher[0] if full and cipher else None,
                ident is not None and not self.admitted.resumed,
                ident is not None,
            )
        return proxyproto.header(src, dst, tlvs)

    def _record(self) -> None:
        plane = self.plane
        duration = time.monotonic() - self.start
        status = self.status or 499
        plane.metrics.request(self.decision, status, duration, "tcp")
        if plane.access_log is not None:
            plane.access_log.request(
                self.log_fields,
                "-",
                "-",
                status,
                0,
                self.decision,
                self.rule,
                int(duration * 1e6) / 1000,
                self.bytes_in,
                self.bytes_out,
                self.aborting,
                self.reason,
                "-",
                None,
                "tcp",
            )


class _Upstream(asyncio.Protocol):
    """The upstream connection of one TcpRelay."""

    __slots__ = ("relay",)

    def __init__(self, relay: TcpRelay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay._from_upstream(data)

    def eof_received(self) -> bool:
        self.relay._upstream_eof()
        return True

    def pause_writing(self) -> None:
        """The upstream reads slowly: stop reading the client (rule 4)."""
        self.relay.pause_client("upstream")

    def resume_writing(self) -> None:
        self.relay.resume_client("upstream")

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._upstream_lost(exc)
