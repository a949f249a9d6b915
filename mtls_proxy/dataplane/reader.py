"""Reading HTTP/1.1 requests from a byte stream: llhttp (httptools) in strict mode, with the
proxy's limits, turned into a few calls on a `RequestSink`.

The reader knows heads, bodies and limits; what a request means (an exchange, its queue, its
answer) is the sink's (connection.py). Every way parsing stops becomes one call: a request head
(`on_request`), body pieces, the end, an error to answer (`on_error`), an upgrade
(`on_upgrade`), or the end of what may be read at all (`on_final`).

Rules:
1. Limits are checked as the bytes arrive, before a head is complete: the request line
   (--max-line-bytes, 414), a header line and the whole head (--max-header-bytes, 431), the
   header count (--max-headers, 431). A head split across reads counts every read.
2. After a request whose answer closes the connection, the next request is never parsed: its
   first byte stops the parser (RFC 9112 section 9.6; INT-010).
3. Trailers are dropped (HDR-009): only headers before the body are collected.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import httptools

from mtls_proxy.core.errors import BadRequest, HeaderTooLarge, ProxyError, URITooLong

if TYPE_CHECKING:
    from mtls_proxy.core.config import Config

logger = logging.getLogger("mtls_proxy.proxy")  # a stable name: log filters outlive module paths


class Stop(Exception):
    """Raised inside a parser callback (also by the sink) to stop with an error answer."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


class _Final(Exception):
    """A request starts after one whose answer closes the connection (rule 2)."""


class RequestSink(Protocol):
    """What the reader tells its connection."""

    def is_final(self) -> bool:
        """No further request may be read (rule 2)."""

    def on_request(
        self,
        method: bytes,
        url: bytes,
        version: str,
        raw: list[tuple[bytes, bytes]],
        upgrade: bool,
        keep_alive: bool,
    ) -> None:
        """A complete request head."""

    def on_request_body(self, body: bytes) -> None:
        """A piece of the request body (may raise Stop)."""

    def on_request_end(self) -> None:
        """The request is complete."""

    def on_partial_head(self) -> None:
        """A head is arriving in pieces (its deadline starts)."""

    def on_error(self, error: ProxyError) -> None:
        """Parsing stopped: answer *error*, then close."""

    def on_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after a request asking for a protocol switch; *rest* follows it."""

    def on_final(self) -> None:
        """Parsing stopped for good (rule 2): read nothing more."""


class RequestReader:
    """One connection's request parser and the head being collected."""

    __slots__ = ("_cfg", "_parser", "_raw", "_sink", "head_bytes", "in_head", "in_message", "url")

    def __init__(self, sink: RequestSink, cfg: Config) -> None:
        self._sink, self._cfg = sink, cfg
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.url = b""  # the request target of the head being read (or last read)
        self._raw: list[tuple[bytes, bytes]] = []
        self.in_head = False  # a head has started and is not complete
        self.in_message = False  # a request has started and its body is not complete
        self.head_bytes = 0

    def trim(self) -> None:
        """Between requests, drop the parser and the last head's fields: an idle keep-alive
        connection then holds neither (about 1 KB each); `feed` makes a new parser when bytes
        come. Never inside a message: the parser's state is the body's framing (a new parser
        there would read the rest of a body as a request)."""
        if not self.in_message:
            self._parser = None
            self._raw = []
            self.url = b""

    def restart(self) -> None:
        """Parse what follows as a new stream (after an upgrade the upstream declined, or an
        upgrade that went upstream as a plain request: SMG-058)."""
        self._parser = httptools.HttpRequestParser(self)
        self.in_message = False

    def feed(self, data: bytes) -> None:
        """Parse *data*; every outcome is a call on the sink."""
        sink = self._sink
        parser = self._parser
        if parser is None:  # trimmed while idle
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            sink.on_upgrade(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Final):
                sink.on_final()
                return
            if not isinstance(ctx, Stop):
                logger.error("parser callback failed", exc_info=ctx)
            sink.on_error(ctx.error if isinstance(ctx, Stop) else BadRequest())
            return
        except httptools.HttpParserError:
            sink.on_error(BadRequest())
            return
        if self.in_head:
            # A head split across reads: bound its size (rule 1) and the time it may take.
            self.head_bytes += len(data)
            if self.head_bytes > self._cfg.max_header_bytes:
                sink.on_error(HeaderTooLarge())
            else:
                sink.on_partial_head()

    # -- llhttp's callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        """A new request starts, unless the one before it closes the connection (rule 2)."""
        if self._sink.is_final():
            raise _Final
        self.url, self._raw, self.in_head, self.head_bytes = b"", [], True, 0
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        """Collect the request target."""
        self.url += url
        self.head_bytes += len(url)
        if len(self.url) > self._cfg.max_line_bytes:
            raise Stop(URITooLong())

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header; trailers (after the head) are dropped (rule 3)."""
        if self.in_head:
            raw = self._raw
            raw.append((name, value))
            line = len(name) + len(value) + 4
            self.head_bytes += line
            cfg = self._cfg
            if (
                self.head_bytes > cfg.max_header_bytes
                or line > cfg.max_line_bytes
                or len(raw) > cfg.max_headers
            ):
                raise Stop(HeaderTooLarge())

    def on_headers_complete(self) -> None:
        """The head is complete."""
        self.in_head = False
        p = self._parser
        assert p is not None  # noqa: S101 -- this callback comes from it
        self._sink.on_request(
            p.get_method(),
            self.url,
            p.get_http_version(),
            self._raw,
            p.should_upgrade(),
            p.should_keep_alive(),
        )

    def on_body(self, body: bytes) -> None:
        """A body piece."""
        self._sink.on_request_body(body)

    def on_message_complete(self) -> None:
        """The request (with its body) is complete."""
        self.in_message = False
        self._sink.on_request_end()
