"""The data plane's state machines without sockets: Http1Connection, Exchange, UpstreamConnection
and Tunnel driven through fake transports and a fake clock (the integration tests drive the same
code over real TLS; these pin each transition on its own and run in milliseconds)."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from mtls_proxy.cli import pki
from mtls_proxy.core.config import load_config
from mtls_proxy.dataplane.admission import admit
from mtls_proxy.dataplane.connection import Http1Connection
from mtls_proxy.dataplane.plane import DataPlane
from mtls_proxy.dataplane.tunnel import Tunnel
from mtls_proxy.dataplane.upstream import UpstreamConnection, UpstreamPool
from mtls_proxy.http1.websocket import accept_for
from mtls_proxy.material.generation import build
from mtls_proxy.material.tls import Material
from mtls_proxy.telemetry.logs import AccessLog
from mtls_proxy.telemetry.metrics import Metrics

ROOT = pki.make_ca("dataplane root")
SERVER = pki.issue(ROOT, "server", "proxy", dns=["localhost"])
CLIENT = pki.issue(ROOT, "client", "client-a", o="tests")
CLIENT_DER = CLIENT.cert.public_bytes(serialization.Encoding.DER)
GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Wire(asyncio.Transport):
    """A transport that records what is written and how it is driven."""

    def __init__(self, extra: dict[str, object] | None = None) -> None:
        super().__init__()
        self.extra = extra or {}
        self.out = bytearray()
        self.reading = True
        self.closing = self.aborted = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: Any) -> None:
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class FakeSSL:
    """What admission reads from a server-side SSLObject after a full handshake."""

    session_reused = False

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return CLIENT_DER

    def get_verified_chain(self) -> list[object]:
        return []

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    def unwrap(self) -> None:  # tlsconn.keep_session at the close
        raise ssl.SSLWantReadError


class Kit:
    """One listener's data plane with a fake clock and one pooled fake upstream connection."""

    def __init__(self, **flags: object) -> None:
        cfg = load_config(
            flags={
                "upstream": "http://127.0.0.1:9",
                "cert": "x",
                "key": "y",
                "cacert": "z",
                "allow-cn": ["client-a"],
                **flags,
            }
        )
        material = Material("x", SERVER.key, (SERVER.cert,), "z", (ROOT.cert,))
        self.now = 1000.0
        self.log = io.StringIO()
        self.pool = UpstreamPool(cfg.upstream, 1.0)
        self.plane = DataPlane(
            cfg,
            build(cfg, material, cfg.policy),
            Metrics(),
            self.pool,
            lambda: self.now,
            AccessLog("json", self.log),
        )
        self.up = UpstreamConnection(self.pool)
        self.up_wire = Wire()
        self.up.connection_made(self.up_wire)
        self.pool.idle.append(self.up)
        self.released = 0

    def client(self) -> tuple[Http1Connection, Wire]:
        """An admitted client connection, as the TLS layer makes it after the handshake."""

        def release() -> None:
            self.released += 1

        gen = self.plane.gen
        conn = Http1Connection(self.plane, admit(self.plane, gen, FakeSSL()), release)  # type: ignore[arg-type]
        wire = Wire({"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8443)})
        conn.connection_made(wire)
        return conn, wire

    def records(self) -> list[dict[str, Any]]:
        """The access records so far."""
        assert self.plane.access_log is not None
        self.plane.access_log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def sweep(self, advance: float) -> None:
        """Let *advance* seconds pass, then run the listener's deadline sweep."""
        self.now += advance
        for conn in list(self.plane.connections):
            conn.check_deadlines(self.now)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh loop (call_soon and create_task need one)."""

    def sync() -> None:
        asyncio.run(test())

    sync.__name__ = test.__name__
    return sync


async def turn() -> None:
    """Let callbacks scheduled with call_soon run."""
    for _ in range(3):
        await asyncio.sleep(0)


@run
async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(GET + GET.replace(b"/a", b"/b"))
    sent = kit.up_wire.take()
    assert sent.startswith(b"GET /a HTTP/1.1\r\n")
    assert b"GET /b" not in sent  # the second waits for the first answer
    assert not wire.reading  # and nothing more is read meanwhile (bounded queue)
    kit.up.data_received(OK)
    assert wire.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    await turn()
    assert kit.up_wire.take().startswith(b"GET /b HTTP/1.1\r\n")  # the pooled connection again
    kit.up.data_received(OK.replace(b"ok", b"OK"))
    assert wire.take().endswith(b"\r\n\r\nOK")
    assert wire.reading
    assert [r["path"] for r in kit.records()] == ["/a", "/b"]
    assert kit.pool.idle == [kit.up]


@run
async def test_a_slow_upstream_reader_pauses_the_client_and_resumes_it() -> None:
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nab")
    kit.up.pause_writing()
    assert not wire.reading
    kit.up.resume_writing()
    assert wire.reading
    conn.data_received(b"cd")
    assert kit.up_wire.take().endswith(b"\r\n\r\nabcd")


@run
async def test_a_client_that_stops_reading_pauses_the_upstream_then_is_cut() -> None:
    kit = Kit(**{"send-timeout": 5})
    conn, wire = kit.client()
    conn.data_received(GET)
    conn.pause_writing()
    assert not kit.up_wire.reading
    kit.sweep(4.9)
    assert not wire.aborted
    conn.resume_writing()  # it took a byte: the gap starts again
    assert kit.up_wire.reading
    conn.pause_writing()
    kit.sweep(4.9)
    assert not wire.aborted
    kit.sweep(0.2)
    assert wire.aborted and kit.up_wire.closing is False  # the client first
    conn.connection_lost(None)
    assert kit.up_wire.closing  # the response in flight cannot be reused
    (record,) = kit.records()
    assert record["aborted"] is True and record["status"] == 499
    assert record["reason"].startswith("send timeout")
    assert kit.released == 1 and not kit.plane.connections


@run
async def test_an_early_answer_retires_the_upstream_connection_and_closes_the_client() -> None:
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabcde")
    kit.up.data_received(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert wire.take().startswith(b"HTTP/1.1 413 ")
    assert wire.closing  # the rest of the body is never read
    assert kit.up_wire.closing and kit.pool.idle == []  # SMG-057: never reused


@run
async def test_no_first_upstream_byte_in_time_is_a_504() -> None:
    kit = Kit(**{"upstream-timeout": 3})
    conn, wire = kit.client()
    conn.data_received(GET)
    kit.sweep(2.9)
    assert wire.out == b""
    kit.sweep(0.2)
    assert wire.take().startswith(b"HTTP/1.1 504 ")
    assert kit.up_wire.closing
    assert kit.records()[0]["status"] == 504
    assert not wire.closing  # the client connection is still usable


@run
async def test_a_head_that_stops_arriving_gets_408_and_an_idle_connection_closes() -> None:
    kit = Kit(**{"header-timeout": 2, "idle-timeout": 30})
    conn, wire = kit.client()
    conn.data_received(b"GET / HTTP/1.1\r\nHo")
    kit.sweep(2.1)
    assert wire.take().startswith(b"HTTP/1.1 408 ")
    assert wire.closing
    _, idle_wire = kit.client()
    kit.sweep(29)
    assert not idle_wire.closing
    kit.sweep(1.1)
    assert idle_wire.closing and idle_wire.out == b""


@run
async def test_a_websocket_becomes_a_tunnel_protocol_both_ways() -> None:
    kit = Kit()
    conn, wire = kit.client()
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    conn.data_received(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\nearly"
    )
    assert not wire.reading  # bytes after the upgrade wait for the upstream's answer
    assert b"early" not in kit.up_wire.take()
    kit.up.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\nfrom-up"
    )
    switched = wire.take()
    assert switched.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert switched.endswith(b"\r\n\r\nfrom-up")  # frames that came with the 101
    tunnel = wire.protocol
    assert isinstance(tunnel, Tunnel)
    assert kit.up_wire.take() == b"early"  # held bytes went through once accepted
    assert wire.reading
    tunnel.data_received(b"\x81\x02hi")
    assert kit.up_wire.take() == b"\x81\x02hi"
    kit.up.data_received(b"\x81\x02yo")
    assert wire.take() == b"\x81\x02yo"
    kit.sweep(3600)  # a WebSocket may be quiet for hours
    assert not wire.closing
    tunnel.connection_lost(None)
    assert kit.up_wire.closing
    (record,) = kit.records()
    assert record["status"] == 101 and record["bytes_in"] == 9 and record["bytes_out"] == 11
    assert kit.released == 1


@run
async def test_a_half_closed_client_gets_its_answer_then_the_close() -> None:
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(GET)
    assert conn.eof_received() is True  # keep the transport open for the answer
    kit.up.data_received(OK)
    answer = wire.take()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in answer
    assert wire.closing
    idle, _ = kit.client()
    assert idle.eof_received() is False  # nothing to answer: close now


@run
async def test_a_denied_request_is_answered_by_the_proxy_and_never_forwarded() -> None:
    kit = Kit(**{"allow-cn": ["someone-else"]})
    conn, wire = kit.client()
    conn.data_received(GET)
    assert wire.take().startswith(b"HTTP/1.1 403 ")
    assert kit.up_wire.out == b""
    assert kit.records()[0]["decision"] == "deny"


def test_loggers_keep_their_documented_names() -> None:
    """docs/logs.md: log filters select on these names, wherever the code that logs lives."""
    import importlib
    import logging
    import pkgutil

    import mtls_proxy

    documented = {
        "mtls_proxy",
        "mtls_proxy.proxy",
        "mtls_proxy.server",
        "mtls_proxy.workers",
        "mtls_proxy.client",
    }
    seen = set()
    for info in pkgutil.walk_packages(mtls_proxy.__path__, "mtls_proxy."):
        if info.name == "mtls_proxy.__main__":
            continue
        logger = getattr(importlib.import_module(info.name), "logger", None)
        if isinstance(logger, logging.Logger):
            assert logger.name in documented, (info.name, logger.name)
            seen.add(logger.name)
    assert seen == documented
    doc = (Path(__file__).parents[2] / "docs" / "logs.md").read_text()
    assert all(f"`{n}`" in doc for n in documented)


@run
async def test_a_client_that_stops_reading_starts_no_further_pipelined_response() -> None:
    """Red team F1: the client's buffer filled at the end of one response, and the next
    pipelined response was read from an upstream nobody paused, without bound."""
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(GET + GET.replace(b"/a", b"/b") + GET.replace(b"/a", b"/c"))
    assert wire.reading is False  # a third request waits too
    kit.up_wire.take()
    kit.up.data_received(OK)
    conn.pause_writing()  # the last bytes of /a filled the client's buffer
    await turn()
    assert kit.up_wire.out == b""  # /b is not asked for while the client takes nothing
    conn.resume_writing()
    await turn()
    assert kit.up_wire.take().startswith(b"GET /b HTTP/1.1\r\n")


@run
async def test_every_complete_pipelined_request_before_a_half_close_is_answered() -> None:
    """Red team F3: after a FIN only two of five pipelined requests were answered."""
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(b"".join(GET.replace(b"/a", b"/p%d" % i) for i in range(5)))
    assert conn.eof_received() is True
    for i in range(5):
        await turn()
        assert kit.up_wire.take().startswith(b"GET /p%d HTTP/1.1\r\n" % i)
        assert not wire.closing
        kit.up.data_received(OK)
        answer = wire.take()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert (b"Connection: close" in answer) == (i == 4)  # only the last one says close
    assert wire.closing
    assert [r["path"] for r in kit.records()] == [f"/p{i}" for i in range(5)]


@run
async def test_a_half_close_after_an_incomplete_request_still_answers_the_complete_ones() -> None:
    """Red team F3: a partial head (or body) after complete requests made the FIN close the
    connection at once: the upstream acted on the complete ones, the client got nothing."""
    for tail in (
        b"GET /partial HTTP/1.1\r\nHo",
        b"POST /body HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabc",
    ):
        kit = Kit()
        conn, wire = kit.client()
        conn.data_received(GET + GET.replace(b"/a", b"/b") + tail)
        assert conn.eof_received() is True
        for path in (b"/a", b"/b"):
            await turn()
            assert kit.up_wire.take().startswith(b"GET %s HTTP/1.1\r\n" % path)
            kit.up.data_received(OK)
            assert wire.take().startswith(b"HTTP/1.1 200 OK\r\n")
        await turn()
        assert wire.closing
        assert kit.up_wire.out == b""  # the incomplete request never went upstream
        assert [r["path"] for r in kit.records()] == ["/a", "/b"]


@run
async def test_a_websocket_cut_by_the_send_timeout_is_recorded_as_aborted() -> None:
    """Red team F4: the cut tunnel's record read as a normal end."""
    kit = Kit(**{"send-timeout": 2})
    conn, wire = kit.client()
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    conn.data_received(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    kit.up.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
    )
    tunnel = wire.protocol
    assert isinstance(tunnel, Tunnel)
    tunnel.pause_writing()
    kit.sweep(2.1)
    assert wire.aborted
    tunnel.connection_lost(None)
    (record,) = kit.records()
    assert record["status"] == 101 and record["aborted"] is True
    assert record["reason"].startswith("send timeout")


class Buffering(Wire):
    """Like the TLS layer: bytes that arrived while reading was paused are delivered, from the
    loop, when reading resumes."""

    def __init__(self, extra: dict[str, object] | None = None) -> None:
        super().__init__(extra)
        self.held = b""

    def resume_reading(self) -> None:
        super().resume_reading()
        if self.held and isinstance(self.protocol, asyncio.Protocol):
            held, self.held = self.held, b""
            asyncio.get_running_loop().call_soon(self.protocol.data_received, held)


@run
async def test_a_declined_upgrade_keeps_the_order_of_what_followed_it() -> None:
    """Red team (second pass) F1: the bytes held behind a declined WebSocket upgrade were parsed
    after the bytes that arrived behind them: requests reordered, or a split one refused."""
    kit = Kit()
    conn = Http1Connection(kit.plane, admit(kit.plane, kit.plane.gen, FakeSSL()), lambda: None)  # type: ignore[arg-type]
    wire = Buffering({"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8443)})
    wire.protocol = conn
    conn.connection_made(wire)
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    conn.data_received(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        b"GET /first HTTP/1.1\r\nHo"
    )
    wire.held = b"st: svc\r\n\r\nGET /second HTTP/1.1\r\nHost: svc\r\n\r\n"  # arrived meanwhile
    kit.up_wire.take()
    kit.up.data_received(OK)  # declined: a plain 200
    for path in (b"/first", b"/second"):
        for _ in range(5):
            await turn()
        assert kit.up_wire.take().startswith(b"GET %s HTTP/1.1\r\n" % path)
        kit.up.data_received(OK)
    assert [r["path"] for r in kit.records()] == ["/ws", "/first", "/second"]


@run
async def test_an_idle_connection_keeps_no_parser_nor_last_exchange_and_serves_the_next() -> None:
    """Issue 18 (memory per idle connection): between requests the sweeper drops the parser
    and the answered exchange; the next request gets a new parser and is served as before."""
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(GET)
    kit.up.data_received(OK)
    assert wire.take().endswith(b"ok")
    kit.sweep(0.25)
    assert conn.reader._parser is None and conn._last is None
    conn.data_received(GET.replace(b"/a", b"/b"))
    kit.up.data_received(OK)
    assert wire.take().endswith(b"ok")
    assert kit.up_wire.take().count(b"GET /") == 2
    assert [r["path"] for r in kit.records()] == ["/a", "/b"]


@run
async def test_a_body_in_progress_is_never_trimmed() -> None:
    """The parser's state inside a body is its framing: dropping it there would read the rest of
    the body as a new request (smuggling). trim() is a no-op until the message is complete."""
    kit = Kit()
    conn, wire = kit.client()
    conn.data_received(b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabcde")
    conn.reader.trim()  # as if the sweeper came now
    kit.sweep(0.25)
    assert conn.reader._parser is not None
    conn.data_received(b"GET /")  # the last 5 bytes of the body, not a request
    kit.up.data_received(OK)
    sent = kit.up_wire.take()
    assert sent.endswith(b"\r\n\r\nabcdeGET /") and sent.count(b"HTTP/1.1\r\n") == 1
    assert wire.take().endswith(b"ok")
    assert [r["path"] for r in kit.records()] == ["/a"]
