"""`client`'s way out: reach the target (directly, or through a CONNECT or SOCKS5 proxy), run
the TLS client handshake with our certificate, verify the remote (core/egress.py rule 2), and
hand an application protocol a transport that speaks plaintext.

Rules:
1. Our own TLS record layer (``ssl.SSLObject`` over memory BIOs, as tlsconn.py on the server
   side), so that `write_eof` is a real half-close: close_notify, then a TCP FIN, and the
   remote may still answer (TLS 1.3 closes one direction at a time; ghostunnel's CloseWrite).
2. The application protocol is made and connected only after the handshake succeeded and the
   remote passed every check: nothing of the local app's reaches a remote that was refused.
3. Everything before that is bounded by --connect-timeout: the proxy, TCP and the handshake.
4. The last TLS session is kept and offered on the next dial (handshakes amortised); a new
   context (a reload) starts without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from mtls_proxy.core.identity import identity_from_der
from mtls_proxy.core.tunnelproto import Tunnel, TunnelError
from mtls_proxy.material.egress import spki_sha256

if TYPE_CHECKING:
    from mtls_proxy.core.egress import ClientConfig

_READ: Final = 256 * 1024
_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_EXPIRED: Final = frozenset({9, 10})
_UNKNOWN_CA: Final = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_MISMATCH: Final = 62  # X509_V_ERR_HOSTNAME_MISMATCH (62) / IP_ADDRESS_MISMATCH (64)


class DialError(Exception):
    """The target was not reached: *stage* (connect, proxy, tls, timeout), and for a refused
    certificate the *reason* label (telemetry/egress.py VERIFY_REASONS)."""

    def __init__(self, stage: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.stage, self.reason = stage, reason


def verify_reason(exc: ssl.SSLCertVerificationError) -> str:
    """The metrics label for OpenSSL's refusal of the remote's certificate."""
    code = exc.verify_code
    if code in _EXPIRED:
        return "expired"
    if code in _UNKNOWN_CA:
        return "unknown_ca"
    if code in (_HOSTNAME_MISMATCH, 64):
        return "hostname"
    return "bad_certificate"


class Dialer:
    """Dials the target with the current context (rule 4)."""

    def __init__(self, cfg: ClientConfig, context: ssl.SSLContext) -> None:
        self.cfg = cfg
        self.session: ssl.SSLSession | None = None
        self._context = context

    @property
    def context(self) -> ssl.SSLContext:
        """The context new dials use."""
        return self._context

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._context, self.session = ctx, None  # a session belongs to its context

    def refuse(self, sslobj: ssl.SSLObject) -> tuple[str, str] | None:
        """(reason label, message) when the remote fails --verify-*/--verify-spki-pin."""
        der = sslobj.getpeercert(binary_form=True)
        if der is None:  # cannot happen with CERT_REQUIRED; fail closed all the same
            return "bad_certificate", "the target sent no certificate"
        why = self.cfg.verify.refuse(identity_from_der(der), spki_sha256(der))
        if why is None:
            return None
        return ("pin" if why.startswith("public key pin") else "verify_rule"), why

    async def dial(self, app: Callable[[], asyncio.Protocol]) -> RemoteTLS:
        """Reach the target and connect *app*'s protocol to it (rules 2, 3)."""
        cfg, loop = self.cfg, asyncio.get_running_loop()
        proxy = cfg.proxy
        tunnel = Tunnel(proxy.kind, cfg.target.host, cfg.target.port) if proxy else None
        hop = cfg.first_hop
        layer = RemoteTLS(self, tunnel, app)
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                try:
                    await loop.create_connection(lambda: layer, hop.host, hop.port)
                except OSError as exc:
                    where = f"the proxy {proxy.url}" if proxy else str(hop)
                    raise DialError("connect", f"cannot connect to {where}: {exc}") from None
                await layer.ready
        except TimeoutError:
            layer.abort()
            raise DialError(
                "timeout", f"the target was not reached within {cfg.connect_timeout:g} s"
            ) from None
        except BaseException:
            # Cancelled (the app left mid-dial) or refused: the half-made connection goes too,
            # else it stays open to the target with nobody behind it, outside --max-connections.
            layer.abort()
            raise
        return layer


class RemoteTLS(asyncio.Protocol, asyncio.Transport):
    """The TLS client on a TCP transport; the app's transport once open (rule 1)."""

    def __init__(
        self, dialer: Dialer, tunnel: Tunnel | None, app: Callable[[], asyncio.Protocol]
    ) -> None:
        super().__init__()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.resumed = False
        self._dialer, self._tunnel, self._make_app = dialer, tunnel, app
        self._raw: asyncio.Transport | None = None
        self._ssl: ssl.SSLObject | None = None
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._app: asyncio.Protocol | None = None
        self._closing = self._eof_told = self._paused = self._session_kept = False
        self._peer_eof = False  # the remote's FIN came

    # -- the TCP transport's protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]  # a stream transport
        if self._tunnel is not None:
            transport.write(self._tunnel.first())  # type: ignore[attr-defined]
        else:
            self._start_tls(b"")

    def data_received(self, data: bytes) -> None:
        if self._ssl is None:
            self._from_proxy(data)
            return
        self._in.write(data)
        if self._app is None:
            self._handshake()
        elif not self._paused:
            self._deliver()

    def eof_received(self) -> bool | None:
        if self._app is None:
            self._fail("proxy" if self._ssl is None else "tls", "the remote closed the connection")
            return None
        # A FIN, after close_notify or not: what came before it is delivered, then the end,
        # also when the app paused reading with records still in OpenSSL (_deliver tells it
        # once it has handed everything over; telling it now would truncate the stream).
        self._peer_eof = True
        self._deliver()
        return True  # our side may still write (rule 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._closing = True
        if self._app is None:
            self._fail("connect", f"connection lost: {exc or 'closed'}")
            return
        self._keep_session()
        app, self._app = self._app, None
        app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- proxy and TLS -----------------------------------------------------------------------
    def _from_proxy(self, data: bytes) -> None:
        if self._tunnel is None or self._raw is None:  # connection_made set both
            return
        try:
            reply = self._tunnel.feed(data)
        except TunnelError as exc:
            self._fail("proxy", str(exc))
            return
        if reply:
            self._raw.write(reply)
        if self._tunnel.open:
            self._start_tls(self._tunnel.leftover)

    def _start_tls(self, leftover: bytes) -> None:
        d = self._dialer
        self._ssl = d.context.wrap_bio(
            self._in, self._out, server_side=False, server_hostname=d.cfg.server_name,
            session=d.session,
        )  # fmt: skip
        if leftover:
            self._in.write(leftover)
        self._handshake()

    def _handshake(self) -> None:
        if self._ssl is None:  # _start_tls made it
            return
        try:
            self._ssl.do_handshake()
        except _AGAIN:
            self._flush()
            return
        except ssl.SSLCertVerificationError as exc:
            self._flush()  # the alert naming the reason goes to the remote
            self._fail("tls", f"the target's certificate: {exc.verify_message}", verify_reason(exc))
            return
        except ssl.SSLError as exc:
            self._flush()
            self._fail("tls", f"TLS handshake with the target failed: {exc.reason or exc}")
            return
        self._flush()
        refused = self._dialer.refuse(self._ssl)
        if refused is not None:
            self._fail("tls", refused[1], refused[0])
            return
        self.resumed = self._ssl.session_reused
        self._app = self._make_app()
        self.ready.set_result(None)
        self._app.connection_made(self)
        if self._in.pending:
            self._deliver()  # a server that speaks first, in the same packet

    def _fail(self, stage: str, message: str, reason: str | None = None) -> None:
        if not self.ready.done():
            self.ready.set_exception(DialError(stage, message, reason))
        self._closing = True
        if self._raw is not None:
            self._raw.close()

    def _flush(self) -> None:
        if self._out.pending and self._raw is not None:
            self._raw.write(self._out.read())

    def _deliver(self) -> None:
        if self._ssl is None:
            return
        closed = drained = False
        while self._app is not None and not self._paused:
            try:
                data = self._ssl.read(_READ)
            except _AGAIN:
                drained = True
                break
            except ssl.SSLZeroReturnError:  # close_notify: the remote's end of its direction
                closed = True
                break
            except ssl.SSLError:
                self.abort()
                return
            if not data:  # close_notify while ours is not sent: Python returns b""
                closed = True
                break
            if not self._session_kept:  # the ticket comes before the first bytes of data
                self._keep_session()
            self._app.data_received(data)
        self._flush()  # key updates, and the ticket's acknowledgement
        if closed or (drained and self._peer_eof):
            self._tell_eof()

    def _tell_eof(self) -> None:
        if self._eof_told or self._app is None:
            return
        self._eof_told = True
        if not self._app.eof_received():
            self.close()

    def _keep_session(self) -> None:
        """Rule 4, once per connection: reading ``SSLObject.session`` copies the session (its
        certificates decoded again, most of a dial's CPU when done three times), and a resumed
        session is the one already kept."""
        s = self._ssl
        if self._session_kept or s is None or self._app is None:
            return
        # Only a session of the current context: one made before a reload would be refused
        # ("Session refers to a different SSLContext") and fail every later dial, and would
        # carry the old trust's verdict (red team E1).
        if s.context is not self._dialer.context:
            self._session_kept = True
            return
        if s.session_reused and self._dialer.session is not None:
            self._session_kept = True
            return
        session = s.session
        if session is not None and session.has_ticket:  # TLS 1.3: once the ticket came
            self._session_kept = True
            self._dialer.session = session

    # -- the application's transport ---------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing or self._raw is None or self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then a FIN: our direction ends, the remote's stays open (rule 1)."""
        if self._closing or self._raw is None or self._ssl is None:
            return
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._ssl.unwrap()  # SSLWantReadError: the remote's close_notify is not awaited
        self._flush()
        try:
            self._raw.write_eof()
        except OSError:  # the target is already gone: its loss, not the local app's error
            self.abort()

    def pause_reading(self) -> None:
        self._paused = True
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._raw is not None and not self._closing:
            self._raw.resume_reading()
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if not self._paused and self._app is not None and self._ssl is not None:
            self._deliver()

    def is_reading(self) -> bool:
        return not self._paused

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._ssl is not None and self._app is not None:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert" and self._ssl is not None:
            return self._ssl.getpeercert()
        if name == "cipher" and self._ssl is not None:
            return self._ssl.cipher()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._raw is None else self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]  # a stream protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app if self._app is not None else self
