"""Red team, round 2: the HTTP/2 + gRPC path attacked from outside, as a hostile client would.

Each finding (F1-F11) was a strict xfail asserting the correct behaviour; all are fixed and the
tests are regressions now. The other tests are attacks that were refused from the start.

The raw client writes frames with hyperframe/hpack (no client-side library checks) and reads
every frame the proxy sends, answering SETTINGS.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Proxy,
    Upstream,
    client_ctx,
    request,
    run_proxy,
    serve_raw,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
CANCEL = 0x8
INITIAL_WINDOW_SIZE = 0x4
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
MAX = 16 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)]
FORGED = b"FORGED-by-client"


# -- a raw HTTP/2 client -------------------------------------------------------------------------
class Raw:
    """One TLS connection speaking raw HTTP/2 frames; `read` collects what the proxy sends."""

    def __init__(self, tp: Pki, port: int, settings: dict[int, int] | None = None) -> None:
        ctx = client_ctx(tp, "good")
        ctx.set_alpn_protocols(["h2"])
        self.s = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10),
            server_hostname="localhost",
        )
        assert self.s.selected_alpn_protocol() == "h2"
        self.enc, self.dec = Encoder(), Decoder()
        self.dec.max_header_list_size = 1 << 24
        self.buf = b""
        self.frames: list[Frame] = []
        self.decoded: dict[int, list[dict[bytes, bytes]]] = collections.defaultdict(list)
        self.closed = False
        self.lock = threading.Lock()
        self.s.sendall(PREFACE + SettingsFrame(0, settings or {}).serialize())

    def send(self, *frames: Frame | bytes) -> None:
        data = b"".join(f.serialize() if isinstance(f, Frame) else f for f in frames)
        with contextlib.suppress(ssl.SSLError, OSError):  # the proxy may close first
            self.s.sendall(data)

    def headers(
        self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool = True
    ) -> HeadersFrame:
        f = HeadersFrame(sid, self.enc.encode(fields))
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    @staticmethod
    def data(sid: int, payload: bytes, end_stream: bool = False) -> DataFrame:
        f = DataFrame(sid, payload)
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    def read(self, until: Callable[[Raw], bool], timeout: float = 10) -> bool:
        """Read frames until *until* holds, the connection ends or *timeout* passes."""
        self.s.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed:
            if until(self):
                return True
            try:
                data = self.s.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed = True
                break
            self._parse(data)
        return until(self)

    def _parse(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            f, _ = Frame.parse_frame_header(memoryview(self.buf[:9]))
            f.parse_body(memoryview(self.buf[9 : 9 + n]))
            self.buf = self.buf[9 + n :]
            if isinstance(f, HeadersFrame):
                self.decoded[f.stream_id].append(dict(self.dec.decode(f.data, raw=True)))
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                self.send(SettingsFrame(0, flags=["ACK"]))
            self.frames.append(f)

    def stream(self, sid: int) -> list[Frame]:
        return [f for f in self.frames if f.stream_id == sid]

    def done(self, sid: int) -> bool:
        return any(
            "END_STREAM" in f.flags or isinstance(f, RstStreamFrame) for f in self.stream(sid)
        )

    def status(self, sid: int) -> bytes | None:
        blocks = self.decoded.get(sid) or [{}]
        return blocks[0].get(b":status")

    def body(self, sid: int) -> bytes:
        return b"".join(f.data for f in self.stream(sid) if isinstance(f, DataFrame))

    def goaway(self) -> int | None:
        g = next((f for f in self.frames if isinstance(f, GoAwayFrame)), None)
        return None if g is None else int(g.error_code)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.s.close()


def req(
    path: bytes = b"/x", method: bytes = b"GET", extra: tuple[tuple[bytes, bytes], ...] = ()
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path),
        *extra,
    ]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def no_tracebacks(p: Proxy) -> None:
    bad = [line for line in p.logs if "Traceback" in line or "exception" in line.lower()]
    assert not bad, bad[:3]


# -- upstreams -----------------------------------------------------------------------------------
class Eager:
    """An HTTP/1.1 upstream that answers as soon as it has a request head, then discards the
    Content-Length body to keep the connection (what Go net/http and Node do for a handler that
    does not read the body). Records every request head it parses, in order."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.srv = serve_raw(self._handle)
        self.port = self.srv.getsockname()[1]

    def _handle(self, sock: socket.socket, _n: int) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]


class Svc:
    """test.Echo over grpcio: the server-side facts the tests check."""

    def __init__(self) -> None:
        self.produced = 0

    def who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = [(k, v if isinstance(v, str) else v.hex()) for k, v in context.invocation_metadata()]
        return json.dumps(md).encode()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def ticks(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        time.sleep(3)
        yield b"second"

    def flood(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = map(int, request.split(b","))
        for _ in range(count):
            if not context.is_active():
                return
            self.produced += 1
            yield b"f" * size

    def total(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"%d" % sum(len(r) for r in requests)


@pytest.fixture
def grpc_server() -> Iterator[tuple[int, Svc]]:
    svc = Svc()
    handlers: dict[str, Any] = {
        "Who": grpc.unary_unary_rpc_method_handler(svc.who),
        "Echo": grpc.unary_unary_rpc_method_handler(svc.echo),
        "Ticks": grpc.unary_stream_rpc_method_handler(svc.ticks),
        "Flood": grpc.unary_stream_rpc_method_handler(svc.flood),
        "Total": grpc.stream_unary_rpc_method_handler(svc.total),
    }
    server = grpc.server(futures.ThreadPoolExecutor(64), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, svc
    finally:
        server.stop(None)


def _channel(tp: Pki, port: int) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        Path(tp.ca).read_bytes(),
        Path(tp.key("good")).read_bytes(),
        Path(tp.crt("good")).read_bytes(),
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}",
        creds,
        options=[*OPTIONS, ("grpc.ssl_target_name_override", "localhost")],
    )


def _grpc_proxy(tp: Pki, port: int, *extra: str) -> Any:
    return run_proxy(
        tp, f"http://127.0.0.1:{port}", "--http2", "on", "--upstream-protocol", "auto", *extra
    )


def _h1_proxy(tp: Pki, port: int, *extra: str) -> Any:
    return run_proxy(tp, f"http://127.0.0.1:{port}", "--http2", "on", *extra)


# == findings ====================================================================================
def test_f1_trailers_cut_body_short_smuggles_to_http1_upstream(tp: Pki) -> None:
    """HEADERS(content-length: N) then a trailers HEADERS(END_STREAM) with no DATA: h2 checks
    the length only on DATA frames, so the stream ends 'complete'. The proxy forwards
    `Content-Length: N` and no body; an upstream that answers before reading the body keeps
    the connection and discards the next N bytes, which are the NEXT request's head. That
    request's body is then read as a request of the client's own making."""
    up = Eager()
    smuggled = (
        b"GET /smuggled HTTP/1.1\r\nHost: x\r\n"
        b"X-Forwarded-Client-Cert: By=" + FORGED + b"\r\nContent-Length: 0\r\n\r\n"
    )
    try:
        with _h1_proxy(tp, up.port, "--upstream-timeout", "3") as p:
            c = Raw(tp, p.port)
            cl = (b"content-length", b"%d" % len(smuggled))
            # Calibrate: the length of the head the proxy writes for POST /b with this body.
            c.send(
                c.headers(1, req(b"/b", b"POST", (cl,)), end_stream=False),
                c.data(1, smuggled, end_stream=True),
            )
            assert c.read(lambda c: c.done(1))
            n = len(up.heads[-1]) + 4
            # The attack: a body of n announced, none sent, the stream ended by trailers.
            c.send(
                c.headers(3, req(b"/a", b"POST", ((b"content-length", b"%d" % n),)), False),
                c.headers(3, [(b"x-trailer", b"1")], end_stream=True),
            )
            c.read(lambda c: c.done(3))
            c.send(
                c.headers(5, req(b"/b", b"POST", (cl,)), end_stream=False),
                c.data(5, smuggled, end_stream=True),
            )
            c.read(lambda c: c.done(5), timeout=5)
            time.sleep(0.3)
            c.close()
    finally:
        up.srv.close()
    assert not any(h.startswith(b"GET /smuggled") for h in up.heads), up.heads
    assert not any(FORGED in h for h in up.heads)


def test_f2_made_you_reset_via_h2_stream_errors_hits_the_budget(
    tp: Pki, upstream: Upstream
) -> None:
    """HEADERS(END_STREAM) then DATA on the same stream: h2 answers RST_STREAM(STREAM_CLOSED)
    and emits StreamReset(remote_reset=False); the proxy abandons the upstream request it
    already started, and counts the reset as the client's (metrics) but not in the budget."""
    with _h1_proxy(tp, upstream.port, "--h2-reset-budget", "50") as p:
        c = Raw(tp, p.port)
        sid = 1
        for _ in range(40):
            frames: list[Frame] = []
            for _ in range(25):
                frames += [c.headers(sid, req(b"/x")), c.data(sid, b"x")]
                sid += 2
            c.send(*frames)
            time.sleep(0.01)
        c.read(lambda c: c.goaway() is not None or c.closed, timeout=5)
        code = c.goaway()
        c.close()
    assert code == ENHANCE_YOUR_CALM  # 1000 resets in ~0.5 s on a budget of 50 a second


def test_f3_grpc_server_stream_messages_are_delivered_as_they_come(
    tp: Pki, grpc_server: tuple[int, Svc]
) -> None:
    port, _ = grpc_server
    with _grpc_proxy(tp, port) as p, _channel(tp, p.port) as ch:
        start = time.monotonic()
        stream = ch.unary_stream("/test.Echo/Ticks")(b"", timeout=10)
        assert next(stream) == b"first"
        first_at = time.monotonic() - start
        assert list(stream) == [b"second"]
    assert first_at < 1.5, f"the first message came after {first_at:.2f} s"


def test_f3_grpc_large_server_stream_completes(tp: Pki, grpc_server: tuple[int, Svc]) -> None:
    port, _ = grpc_server
    with _grpc_proxy(tp, port) as p, _channel(tp, p.port) as ch:
        got = sum(len(m) for m in ch.unary_stream("/test.Echo/Flood")(b"1000,16384", timeout=20))
    assert got == 1000 * 16384


def test_f4_stalled_client_does_not_stall_other_clients_grpc(
    tp: Pki, grpc_server: tuple[int, Svc]
) -> None:
    port, svc = grpc_server
    with _grpc_proxy(tp, port) as p:
        with _channel(tp, p.port) as ch:  # the shared upstream connection is up
            assert ch.unary_unary("/test.Echo/Echo")(b"warm", timeout=5) == b"warm"
        attacker = Raw(tp, p.port, settings={INITIAL_WINDOW_SIZE: 0})
        frames: list[Frame] = []
        for sid in range(1, 41, 2):
            frames += [
                attacker.headers(sid, req(b"/test.Echo/Flood", b"POST", tuple(GRPC)), False),
                attacker.data(sid, grpc_message(b"400,65536"), end_stream=True),
            ]
        attacker.send(*frames)
        stop = threading.Event()
        reader = threading.Thread(
            target=attacker.read, args=(lambda _c: stop.is_set(), 30), daemon=True
        )
        reader.start()  # the attacker reads everything: it is never "slow to read"
        time.sleep(3)
        try:
            with _channel(tp, p.port) as ch:
                victim = ch.unary_unary("/test.Echo/Echo")(b"victim", timeout=5)
        finally:
            stop.set()
            reader.join(5)
            attacker.close()
    assert svc.produced > 0
    assert victim == b"victim"


def test_f5_zero_window_client_is_cut(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port, "--send-timeout", "1", "--upstream-timeout", "30") as p:
        rss0 = p.rss_kb()
        c = Raw(tp, p.port, settings={INITIAL_WINDOW_SIZE: 0})
        c.send(*[c.headers(sid, req(b"/download?bytes=5000000")) for sid in range(1, 81, 2)])
        c.read(lambda c: c.closed or c.goaway() is not None, timeout=6)
        held_kb = p.rss_kb() - rss0
        cut = (
            c.closed
            or c.goaway() is not None
            or len({f.stream_id for f in c.frames if isinstance(f, RstStreamFrame)}) == 40
        )
        c.close()
    assert cut, f"still open after 6 s with every stream stalled; RSS +{held_kb} KiB"


def test_f6_lowercase_method_does_not_bypass_method_route(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "policy:\n  allow:\n    - uri: " + ALLOWED_URI + "\n  routes:\n"
        "    - path_prefix: /admin\n      methods: [DELETE]\n      allow:\n        - cn: nobody\n"
    )
    with _h1_proxy(tp, upstream.port, "--config", str(cfg)) as p:
        ctx = client_ctx(tp, "good")
        assert request(p.port, ctx, b"DELETE /admin HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 403
        assert request(p.port, ctx, b"delete /admin HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 400
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(b"/admin", b"DELETE")), c.headers(3, req(b"/admin", b"delete")))
        c.read(lambda c: c.done(1) and c.done(3))
        c.close()
    assert c.status(1) == b"403"
    assert not [s for s in upstream.seen if s.target.startswith("/admin")], upstream.seen
    assert c.status(3) in (b"400", b"403", b"405")


def test_f7_one_access_record_per_stream(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port) as p:
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(b"/download?bytes=200000")))  # > the 65,535 default window
        time.sleep(1)  # the upstream is done; 135 KB wait for window in the proxy
        c.send(RstStreamFrame(1, CANCEL))
        time.sleep(0.5)
        c.close()
        time.sleep(0.3)
        records = [r for r in p.records() if r.get("msg") == "access"]
        requests = p.metric("mtls_proxy_requests_total")
    assert len(records) == 1, [(r["status"], r.get("aborted")) for r in records]
    assert requests == 1


def test_f8_reset_budget_holds_across_a_second_boundary(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port, "--h2-reset-budget", "50") as p:
        c = Raw(tp, p.port)
        c.read(lambda _c: False, timeout=0.3)

        def burst(first: int) -> None:
            c.send(
                *[
                    f
                    for sid in range(first, first + 100, 2)  # 50 streams, 50 RST_STREAM
                    for f in (c.headers(sid, req(b"/x"), False), RstStreamFrame(sid, CANCEL))
                ]
            )

        # The proxy's clock is the event loop's: CLOCK_MONOTONIC, as time.monotonic() here.
        now = time.monotonic()
        time.sleep((int(now) + 1 - 0.08 - now) % 1)
        burst(1)  # 50 resets at x.92
        time.sleep(0.13)
        burst(101)  # 50 more at (x+1).05: 100 within 130 ms
        c.read(lambda c: c.goaway() is not None or c.closed, timeout=3)
        code = c.goaway()
        c.close()
    assert code == ENHANCE_YOUR_CALM


def test_f9_malformed_header_is_a_stream_error(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port) as p:
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(b"/slow?s=1")))
        time.sleep(0.2)
        c.send(c.headers(3, req(b"/x", extra=((b"X-Upper", b"1"),))))
        c.read(lambda c: c.done(1) and c.done(3), timeout=5)
        c.close()
    assert c.goaway() is None
    assert c.status(3) == b"400"
    assert c.status(1) == b"200"


def test_f10_settings_window_increase_resumes_streams(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port) as p:
        c = Raw(tp, p.port, settings={INITIAL_WINDOW_SIZE: 0})
        c.send(WindowUpdateFrame(0, 1 << 24))
        c.send(c.headers(1, req(b"/download?bytes=50000")))
        c.read(lambda c: c.status(1) is not None)
        time.sleep(0.3)
        c.send(SettingsFrame(0, {INITIAL_WINDOW_SIZE: 65535}))  # RFC 9113 6.9.2
        c.read(lambda c: c.done(1), timeout=5)
        c.close()
    assert len(c.body(1)) == 50000


@pytest.mark.parametrize("path", [b"/a#b", b"/denied"])
def test_f11_reset_of_a_stream_answered_at_once(
    tp: Pki, upstream: Upstream, tmp_path: Path, path: bytes
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "policy:\n  allow:\n    - uri: " + ALLOWED_URI + "\n  routes:\n"
        "    - path_prefix: /denied\n      allow:\n        - cn: nobody\n"
    )
    with _h1_proxy(tp, upstream.port, "--config", str(cfg)) as p:
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(b"/slow?s=1")))
        time.sleep(0.2)
        c.send(c.headers(3, req(path)), RstStreamFrame(3, CANCEL))
        c.read(lambda c: c.done(1) or c.closed, timeout=5)
        c.close()
        time.sleep(0.2)
        logs = list(p.logs)
    assert not [line for line in logs if "StreamClosedError" in line]
    assert c.status(1) == b"200"  # the other stream of the connection is answered


# == attacks that held ===========================================================================
IDENTITY_NAMES = [
    b"x-forwarded-client-cert",
    b"x-client-verified",
    b"x-client-subject",
    b"x-client-spiffe-id",
    b"x-client-cert-sha256",
    b"x-client-dns",
    b"client-cert",
    b"client-cert-chain",
    b"ssl-client-cert",
    b"ssl_client_cert",
    b"x_forwarded_client_cert",
    b"x-forwarded-tls-client-cert",
    b"x-forwarded-tls-client-cert-info",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x_forwarded_for",
    b"forwarded",
    b"x-real-ip",
    b"x-ssl-client-cert",
    b"x-envoy-peer-metadata",
]
BAD_NAMES = [
    b"X-Forwarded-Client-Cert",
    b"x-forwarded-client-cert ",
    b"x-forwarded-client-cert:",
    b"x-forwarded-client-cert\x00",
    b"x-forwarded-client-cert\t",
]


def _identity_fields() -> tuple[tuple[bytes, bytes], ...]:
    fields = [(n, FORGED) for n in IDENTITY_NAMES]
    fields += [(b"x-forwarded-client-cert", b"By=" + FORGED + b"\xff\x80")]  # obs-text
    fields += [(b"cookie", b"a=1"), (b"cookie", b"x-forwarded-client-cert=" + FORGED)]
    return tuple(fields)


def test_identity_headers_never_reach_http1_upstream(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port, "--identity-headers", "xfcc,simple,rfc9440,tomcat") as p:
        c = Raw(tp, p.port)
        # Also in trailers (HEADERS after DATA): never forwarded.
        trailers = [(n, FORGED) for n in IDENTITY_NAMES]
        c.send(
            c.headers(1, req(b"/x", b"POST", _identity_fields()), end_stream=False),
            c.data(1, b"body"),
            c.headers(1, trailers, end_stream=True),
        )
        # HPACK: the forged field indexed on stream 1 is referenced again on stream 3.
        c.send(c.headers(3, req(b"/y", extra=_identity_fields())))
        assert c.read(lambda c: c.done(1) and c.done(3))
        c.close()
    assert (c.status(1), c.status(3)) == (b"200", b"200")
    for seen in upstream.seen:
        assert not [h for h in seen.headers if "FORGED" in h[1] and h[0] != "cookie"]
        (xfcc,) = seen.get("x-forwarded-client-cert")
        assert ALLOWED_URI in xfcc
        assert seen.get("x-client-verified") == ["SUCCESS"]
    raw = b"".join(upstream.raw.values())
    assert raw.count(b"x-forwarded-client-cert: ") == 2  # ours, once per request


@pytest.mark.parametrize("name", BAD_NAMES)
def test_malformed_identity_names_are_not_forwarded(
    tp: Pki, upstream: Upstream, name: bytes
) -> None:
    with _h1_proxy(tp, upstream.port) as p:
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(b"/x", extra=((name, FORGED),))))
        c.read(lambda c: c.done(1) or c.goaway() is not None or c.closed)
        c.close()
    assert c.status(1) in (None, b"400")
    assert not upstream.seen


def test_identity_headers_never_reach_grpc_upstream(tp: Pki, grpc_server: tuple[int, Svc]) -> None:
    port, _ = grpc_server
    with _grpc_proxy(tp, port, "--identity-headers", "xfcc,simple,rfc9440,tomcat") as p:
        c = Raw(tp, p.port)
        c.send(
            c.headers(1, req(b"/test.Echo/Who", b"POST", (*GRPC, *_identity_fields())), False),
            c.data(1, grpc_message(b"")),
            c.headers(1, [(n, FORGED) for n in IDENTITY_NAMES], end_stream=True),
        )
        assert c.read(lambda c: c.done(1))
        c.close()
    blocks = c.decoded[1]
    assert blocks[-1].get(b"grpc-status") == b"0", blocks
    md = json.loads(c.body(1)[5:])
    assert not [kv for kv in md if "FORGED" in kv[1] and kv[0] != "cookie"], md
    xfcc = [v for k, v in md if k == "x-forwarded-client-cert"]
    assert len(xfcc) == 1
    assert ALLOWED_URI in xfcc[0]


def test_data_beyond_content_length_is_not_smuggled(tp: Pki) -> None:
    """More DATA than content-length: h2 ends the connection; the extra bytes (a request)
    never reach the upstream, and its connection is not reused."""
    up = Eager()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    try:
        with _h1_proxy(tp, up.port) as p:
            c = Raw(tp, p.port)
            c.send(
                c.headers(1, req(b"/a", b"POST", ((b"content-length", b"2"),)), False),
                c.data(1, b"ok" + smuggled, end_stream=True),
            )
            c.read(lambda c: c.closed or c.goaway() is not None, timeout=5)
            c.close()
            c2 = Raw(tp, p.port)
            c2.send(c2.headers(1, req(b"/after")))
            c2.read(lambda c: c.done(1))
            c2.close()
            time.sleep(0.3)
    finally:
        up.srv.close()
    assert not any(h.startswith(b"GET /smuggled") for h in up.heads), up.heads
    assert c2.status(1) == b"200"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"DELETE", b"/x/../admin"),
        (b"DELETE", b"//admin"),
        (b"DELETE", b"/%61dmin"),
        (b"DELETE", b"/admin;jsessionid=1"),
        (b"DELETE", b"/x/%2e%2e/admin"),
        (b"DELETE", b"/x/..;/admin"),
        (b"DELETE", b"/admin%2f"),
        (b"DELETE", b"/./admin"),
    ],
)
def test_path_tricks_do_not_bypass_routes(
    tp: Pki, upstream: Upstream, tmp_path: Path, method: bytes, path: bytes
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "policy:\n  allow:\n    - uri: " + ALLOWED_URI + "\n  routes:\n"
        "    - path_prefix: /admin\n      allow:\n        - cn: nobody\n"
    )
    with _h1_proxy(tp, upstream.port, "--config", str(cfg)) as p:
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(path, method)))
        c.read(lambda c: c.done(1))
        c.close()
    assert c.status(1) in (b"400", b"403")
    assert not upstream.seen


@pytest.mark.parametrize(
    "field",
    [
        (b"transfer-encoding", b"chunked"),
        (b"te", b"gzip"),
        (b"connection", b"close"),
        (b"upgrade", b"websocket"),
        (b"content-length", b"+5"),
    ],
)
def test_framing_fields_are_refused(
    tp: Pki, upstream: Upstream, field: tuple[bytes, bytes]
) -> None:
    with _h1_proxy(tp, upstream.port) as p:
        c = Raw(tp, p.port)
        c.send(c.headers(1, req(b"/x", b"POST", (field,)), False), c.data(1, b"hello", True))
        c.read(lambda c: c.done(1) or c.goaway() is not None or c.closed)
        c.close()
    assert c.status(1) in (None, b"400")
    assert not upstream.seen


def test_resets_at_every_point_leave_no_trace(tp: Pki, upstream: Upstream) -> None:
    """RST_STREAM before the body, mid body, after the response head, after the end, and on
    a refused stream; SETTINGS_INITIAL_WINDOW_SIZE to 0 and back mid-stream; PRIORITY-less
    WINDOW_UPDATE games: no exception in the proxy, and it still serves."""
    with _h1_proxy(tp, upstream.port, "--h2-reset-budget", "200") as p:
        c = Raw(tp, p.port)
        c.send(WindowUpdateFrame(0, 1 << 24))
        post = req(b"/x", b"POST", ((b"content-length", b"10"),))
        c.send(c.headers(1, post, False), RstStreamFrame(1, CANCEL))  # before the body
        c.send(c.headers(3, post, False), c.data(3, b"hello"), RstStreamFrame(3, CANCEL))
        c.send(c.headers(5, req(b"/download?bytes=300000")))
        c.read(lambda c: c.status(5) is not None)
        c.send(RstStreamFrame(5, CANCEL))  # after the response head
        c.send(c.headers(7, req(b"/x")))
        c.read(lambda c: c.done(7))
        c.send(RstStreamFrame(7, CANCEL))  # after the end
        c.send(c.headers(9, req(b"/a#b")))  # refused stream (F11: not in the same write)
        c.read(lambda c: c.done(9))
        c.send(RstStreamFrame(9, CANCEL))
        c.send(SettingsFrame(0, {INITIAL_WINDOW_SIZE: 0}))
        c.send(c.headers(11, req(b"/download?bytes=100000")))
        time.sleep(0.5)
        c.send(SettingsFrame(0, {INITIAL_WINDOW_SIZE: 65535}))
        c.send(WindowUpdateFrame(11, 1 << 20))  # F10: SETTINGS alone does not resume it
        c.read(lambda c: c.done(11))
        assert len(c.body(11)) == 100000
        c.send(c.headers(13, req(b"/x")))
        assert c.read(lambda c: c.done(13))
        assert c.status(13) == b"200"
        c.close()
        time.sleep(0.3)
        no_tracebacks(p)


def test_ping_just_under_budget_is_not_a_flood(tp: Pki, upstream: Upstream) -> None:
    with _h1_proxy(tp, upstream.port) as p:
        c = Raw(tp, p.port)
        c.read(lambda _c: False, timeout=0.2)
        c.send(*[PingFrame(0, b"%08d" % i) for i in range(900)])
        c.send(c.headers(1, req(b"/x")))
        assert c.read(lambda c: c.done(1))
        c.close()
    assert c.goaway() is None
    assert c.status(1) == b"200"


def test_busy_grpcio_client_is_not_taken_for_a_flood(tp: Pki, grpc_server: tuple[int, Svc]) -> None:
    """A 160 MB client stream (BDP pings, many WINDOW_UPDATEs) and 2,000 concurrent unary
    calls from one grpcio channel: no budget trips."""
    port, _ = grpc_server
    with _grpc_proxy(tp, port) as p, _channel(tp, p.port) as ch:
        upload = ch.stream_unary("/test.Echo/Total")(iter([b"u" * 16384] * 10000), timeout=60)
        assert upload == b"%d" % (16384 * 10000)
        calls = [ch.unary_unary("/test.Echo/Echo").future(b"x", timeout=30) for _ in range(2000)]
        assert all(f.result() == b"x" for f in calls)
        assert p.metric("mtls_proxy_h2_goaways_total") == 0
        no_tracebacks(p)
