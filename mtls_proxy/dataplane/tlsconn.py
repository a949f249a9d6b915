"""Our own TLS record layer: ``ssl.SSLObject`` over memory BIOs on a plain TCP transport.

Why not the event loop's SSL transport: when a handshake fails (unknown CA, expired or revoked
certificate, no certificate), OpenSSL writes the TLS alert that names the reason into its
outgoing buffer, and asyncio's and uvloop's SSL protocols close the socket without sending it.
The client then sees "Empty reply from server" or "connection reset" instead of
``unknown_ca``/``certificate_expired``. Here the alert is written before the close, as nginx,
HAProxy, Envoy and Go servers do.

It also costs less per idle connection: no 256 KiB read buffer per connection (uvloop's SSL
protocol keeps one); the bytes the kernel gives us are fed straight into OpenSSL.

Rules:
1. One object is both the TCP transport's protocol and the application protocol's transport
   (the methods asyncio gives each side do not overlap), so a record costs one call, not two.
2. After every operation that can make OpenSSL write (handshake, read: key updates and
   tickets, write, shutdown), whatever it wrote is flushed to the socket: nothing waits.
3. The application protocol is made by ``admit`` only after a successful handshake, and sees
   ``connection_made`` at once; a failed handshake, or a client ``admit`` refuses
   (`RefusedAfterHandshake`), settles ``handshake`` (a future) with the exception, and no
   application protocol is made.
4. ``pause_reading`` stops delivering at once, even in the middle of what was already
   decrypted; ``resume_reading`` delivers the rest before reading the socket again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, Final

# One TLS record carries at most 16 KiB of plaintext; a larger read returns one record anyway.
_READ: Final = 256 * 1024
_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# After a failed handshake the alert is sent, our side shut down, and the client's last bytes
# read and dropped for up to this long: closing with unread data would make the kernel send a
# reset, which can overtake the alert (nginx's lingering close, for the same reason).
LINGER: Final = 1.0
LINGER_MAX: Final = 60.0  # a response still being written is given this long in all


def keep_session(sslobj: ssl.SSLObject) -> None:
    """Keep this connection's session resumable although the client closed without a TLS
    close_notify (most HTTP clients just close the socket).

    OpenSSL drops a cached session when its connection is freed before *we* sent close_notify
    (ssl_clear_bad_session, an SSL 3.0 rule that TLS 1.1 and later no longer require), so
    every such client would pay a full handshake next time. Shutting down here marks it sent;
    the alert goes nowhere, the transport is already closed. Never called for a connection we
    refused or cut: its session must go.
    """
    # SSLWantReadError is the usual outcome: the client's close_notify will never come.
    with contextlib.suppress(ssl.SSLError, OSError, ValueError):
        sslobj.unwrap()


class RefusedAfterHandshake(Exception):
    """Raised by the admit callback: the handshake succeeded, yet the client is refused; it
    gets *answer* (an HTTP response naming the reason: no alert can, the handshake is over)."""

    answer: bytes


_NO_APP: Final = asyncio.Protocol()  # until the handshake has made the app


def _admitted(sslobj: ssl.SSLObject) -> asyncio.Protocol:
    """In place of the admit callback once it has run (a handshake completes once)."""
    raise RuntimeError("this connection's handshake already completed")


class TLSServerLayer(asyncio.Protocol, asyncio.Transport):
    """Server side TLS on a plain stream transport (see the module docstring)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        admit: Callable[[ssl.SSLObject], asyncio.Protocol],
        patience: float = LINGER_MAX,
    ) -> None:
        super().__init__()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject = context.wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        self._admit = admit  # makes the app after the handshake (rule 3)
        self._app: asyncio.Protocol = _NO_APP
        self._raw: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open = False  # the handshake succeeded and the app was told
        self._closing = False
        self._paused = False  # the app asked us to stop delivering
        self._scheduled = False  # a delivery of buffered plaintext is due (resume_reading)
        self._lingering = False  # our side is shut down: input is dropped (_linger)
        self._timer: asyncio.TimerHandle | None = None
        self._waited = 0.0
        # A closing socket whose client takes no byte for this long is cut (--send-timeout):
        # its last bytes would otherwise hold it, and its --max-connections slot, for ever.
        self._patience = patience
        self._stalled = 0.0
        self._left = 0  # bytes still in the socket's buffer at the last linger tick
        self._on_lost: Callable[[], None] | None = None  # a failed handshake's (when_lost)
        self._peer_eof = False  # the client's FIN arrived

    # -- the TCP transport's protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._incoming.write(data)
        if not self._open:
            self._do_handshake()
            if not self._open:
                return
        if not self._paused:
            self._deliver()

    def eof_received(self) -> bool | None:
        if self._lingering:
            return None  # the client read the alert and left: close now
        # A TCP FIN, with or without close_notify before it: a half-close. The app hears of it
        # once it has read everything before it (_deliver reaches the end: _peer_closed) and
        # decides whether to answer what it got (a truncation attack cannot matter here: every
        # request is framed by HTTP, and an incomplete one is dropped).
        # The FIN is not written into OpenSSL's input: it would call it an unexpected EOF and
        # refuse to write the answer.
        self._peer_eof = True
        if self._open and not self._closing:
            if not self._paused:
                self._deliver()
            return True  # closed by the app, or by _peer_closed when it does not keep it
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(exc or EOFError("the client closed during the handshake"))
        if self._on_lost is not None:
            self._on_lost()
            self._on_lost = None
        if self._open:
            self._open = False
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._open:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self._app.resume_writing()

    # -- TLS ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except _AGAIN:
            self._flush()
            return
        except ssl.SSLError as exc:
            # Rule 2: the alert naming the reason goes out before the socket closes.
            self._flush()
            self._closing = True
            self._linger()
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            return
        self._flush()  # the server's Finished or session ticket
        admit, self._admit = self._admit, _admitted  # once: its closure is not kept
        try:
            app = admit(self._ssl)
        except RefusedAfterHandshake as exc:
            self.refuse(exc.answer)
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            return
        self._app, self._open = app, True
        if not self.handshake.done():
            self.handshake.set_result(None)
        app.connection_made(self)

    def _linger(self) -> None:
        """Shut down our side after what is queued, and read and drop what the client still
        sends until it closes (or LINGER seconds): closing a socket with unread input makes the
        kernel reset the connection and drop our unsent last bytes (the alert, the response)."""
        raw = self._raw
        if raw is None:
            return
        self._waited = self._stalled = 0.0
        self._left = raw.get_write_buffer_size()
        if self._peer_eof or not raw.can_write_eof():  # nothing more can come from the client
            raw.close()  # once the buffer has drained; _linger_end cuts a client that stalls
        else:
            self._lingering = True
            raw.write_eof()
            # Input is dropped from now on: read it even if the app had paused reading, or the
            # client's FIN is never seen and its unread bytes make the final close a reset.
            raw.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER, self._linger_end)

    def _linger_end(self) -> None:
        """LINGER seconds after our last byte left user space (a slow reader still drains the
        response, up to LINGER_MAX, unless it takes nothing for `patience`), then close
        whatever the client does."""
        raw = self._raw
        if raw is None:
            return
        self._waited += LINGER
        left = raw.get_write_buffer_size()
        self._stalled = 0.0 if left < self._left else self._stalled + LINGER
        self._left = left
        if left and self._waited < LINGER_MAX and self._stalled < self._patience:
            self._timer = asyncio.get_running_loop().call_later(LINGER, self._linger_end)
            return
        raw.abort()

    def _deliver(self) -> None:
        """Hand decrypted data to the app until OpenSSL has none or the app pauses (rule 4)."""
        sslobj = self._ssl
        app = self._app
        drained = False  # everything the client sent so far has been handed over
        try:
            while not self._paused and not self._closing:
                chunk = sslobj.read(_READ)
                if not chunk:  # close_notify (suppress_ragged_eofs)
                    self._peer_closed()
                    break
                app.data_received(chunk)
                # Most reads end a record exactly: no exception to tell us there is no more.
                if not self._incoming.pending and not sslobj.pending():
                    drained = not self._paused
                    break
        except _AGAIN:
            drained = True
        except ssl.SSLZeroReturnError:  # close_notify
            self._peer_closed()
        except ssl.SSLError:
            # A corrupt record: nothing more can be read or written on this session.
            self._closing = True
            if self._raw is not None:
                self._flush()
                self._raw.close()
            return
        self._flush()  # e.g. a KeyUpdate answer
        if drained and self._peer_eof:  # a FIN without close_notify, and nothing left to read
            self._peer_closed()

    def _peer_closed(self) -> None:
        if self._closing:
            return
        if not self._app.eof_received():
            self.close()

    def _resume(self) -> None:
        self._scheduled = False
        if not self._paused and self._open and not self._closing:
            self._deliver()

    # -- the application's transport ---------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing or self._raw is None:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            # The session is broken (a fatal alert read in the same turn): nothing more can go
            # out; the caller (often the upstream's side) must not see a TLS error.
            self.abort()
            return
        self._raw.write(self._outgoing.read())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._raw is not None:
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._raw is not None and not self._closing:
                self._raw.resume_reading()
                # Rule 4: plaintext decrypted before the pause is delivered first.
                if not self._scheduled:
                    self._scheduled = True
                    asyncio.get_running_loop().call_soon(self._resume)

    def is_reading(self) -> bool:
        return not self._paused

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call *callback* once the socket is closed (now if it is): a refused client's socket
        lingers after its handshake failed, and still counts against --max-connections."""
        if self._raw is None:
            callback()
        else:
            self._on_lost = callback

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def close(self) -> None:
        """Send close_notify, then close once what is written has gone (_linger)."""
        if self._closing:
            return
        self._closing = True
        if self._open:
            # SSLWantReadError is the usual outcome: the client's close_notify is not awaited.
            # Shutting down also keeps the session resumable (keep_session).
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()
            self._flush()
        self._linger()

    def refuse(self, answer: bytes) -> None:
        """Refuse the client after the handshake: send *answer* (an HTTP response) and close
        without close_notify, so that OpenSSL drops the cached session when the connection is
        freed (after the linger; a ticket-mode session is not dropped). A client that resumes
        meanwhile is checked again by admit and refused the same way."""
        if self._closing:
            return
        self.write(answer)
        self._closing = True
        self._linger()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._ssl.context
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits() if self._raw is not None else (0, 0)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app
