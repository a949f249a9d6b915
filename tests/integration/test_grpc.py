"""gRPC through the proxy: a real grpcio client over mTLS (ALPN h2) -> mtls-proxy -> a real grpcio
server over h2c (--upstream-protocol auto). Generic handlers with raw-bytes messages: no
generated code, the wire is the same."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers import ALLOWED_URI, Pki, run_proxy

MAX = 16 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)]


class Service:
    """test.Echo: one method per call kind, and the server-side facts the tests check."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.metadata: list[tuple[str, str | bytes]] = []

    def who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = [(k, v if isinstance(v, str) else v.hex()) for k, v in context.invocation_metadata()]
        return json.dumps(md).encode()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("detail-bin", b"\x00\xffraw"), ("x-why", "because")))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: ünïcode")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(2)
        return b"late"

    def hang(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.add_callback(self.cancelled.set)
        self.cancelled.wait(10)
        return b"never seen"

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    def total(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"%d" % sum(len(r) for r in requests)

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield r.upper()


@pytest.fixture
def grpc_server() -> Iterator[tuple[int, Service]]:
    svc = Service()
    unary = {n: getattr(svc, n) for n in ("who", "echo", "fail", "slow", "hang")}
    handlers: dict[str, Any] = {
        n.capitalize(): grpc.unary_unary_rpc_method_handler(f) for n, f in unary.items()
    }
    handlers["Count"] = grpc.unary_stream_rpc_method_handler(svc.count)
    handlers["Total"] = grpc.stream_unary_rpc_method_handler(svc.total)
    handlers["Chat"] = grpc.stream_stream_rpc_method_handler(svc.chat)
    server = grpc.server(futures.ThreadPoolExecutor(8), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, svc
    finally:
        server.stop(None)


def _channel(tp: Pki, port: int, name: str = "good") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        Path(tp.ca).read_bytes(), Path(tp.key(name)).read_bytes(), Path(tp.crt(name)).read_bytes()
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}",
        creds,
        options=[*OPTIONS, ("grpc.ssl_target_name_override", "localhost")],
    )


def _proxy(tp: Pki, port: int, *extra: str) -> Any:
    return run_proxy(
        tp, f"http://127.0.0.1:{port}", "--http2", "on", "--upstream-protocol", "auto", *extra
    )


@pytest.mark.parametrize("library", ["h2", "jh2"])
def test_all_four_call_kinds_and_identity(
    tp: Pki, grpc_server: tuple[int, Service], library: str
) -> None:
    port, _ = grpc_server
    with _proxy(tp, port, "--h2-library", library) as p, _channel(tp, p.port) as ch:
        md = (("x-forwarded-client-cert", "By=forged"), ("x-client-verified", "SUCCESS"))
        seen = json.loads(ch.unary_unary("/test.Echo/Who")(b"", metadata=md, timeout=10))
        xfcc = [v for k, v in seen if k == "x-forwarded-client-cert"]
        assert len(xfcc) == 1 and "forged" not in xfcc[0] and ALLOWED_URI in xfcc[0]
        assert [v for k, v in seen if k == "x-client-verified"] == ["SUCCESS"]  # ours, once
        assert list(ch.unary_stream("/test.Echo/Count")(b"5", timeout=10)) == [
            b"0", b"1", b"2", b"3", b"4"
        ]  # fmt: skip
        total = ch.stream_unary("/test.Echo/Total")(iter([b"ab", b"cde", b""]), timeout=10)
        assert total == b"5"
        chat = ch.stream_stream("/test.Echo/Chat")(iter([b"a", b"b", b"c"]), timeout=10)
        assert list(chat) == [b"A", b"B", b"C"]
        # The access log is written once per loop turn, after the response went out: the last
        # call's record may come a moment after the client has its answer.
        deadline = time.monotonic() + 10
        while True:
            records = [r for r in p.records() if r.get("path", "").startswith("/test.Echo/")]
            if len(records) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    methods = {r["path"] for r in records}
    assert methods == {f"/test.Echo/{m}" for m in ("Who", "Count", "Total", "Chat")}
    assert [r["status"] for r in records] == [200] * 4, records
    assert {r["grpc_status"] for r in records} == {0}  # OK, from the upstream's trailers


def test_large_message_both_ways(tp: Pki, grpc_server: tuple[int, Service]) -> None:
    """5 MiB each way: far beyond every window (64 KiB per stream downstream): flow control."""
    port, _ = grpc_server
    big = bytes(range(256)) * (5 * 4096)
    with _proxy(tp, port) as p, _channel(tp, p.port) as ch:
        assert ch.unary_unary("/test.Echo/Echo")(big, timeout=30) == big


def test_error_trailers_pass_through(tp: Pki, grpc_server: tuple[int, Service]) -> None:
    port, _ = grpc_server
    with (
        _proxy(tp, port) as p,
        _channel(tp, p.port) as ch,
        pytest.raises(grpc.RpcError) as info,
    ):
        ch.unary_unary("/test.Echo/Fail")(b"", timeout=10)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such thing: ünïcode"
    trailing = dict(err.trailing_metadata())
    assert trailing["detail-bin"] == b"\x00\xffraw" and trailing["x-why"] == "because"


def test_deadline_and_cancel_cross_the_proxy(tp: Pki, grpc_server: tuple[int, Service]) -> None:
    port, svc = grpc_server
    with _proxy(tp, port) as p, _channel(tp, p.port) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/test.Echo/Slow")(b"", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        call = ch.unary_unary("/test.Echo/Hang").future(b"", timeout=30)
        time.sleep(0.5)
        call.cancel()
        # RST_STREAM(CANCEL) from the client reached the server through the proxy.
        assert svc.cancelled.wait(5)
        assert ch.unary_unary("/test.Echo/Echo")(b"still fine", timeout=10) == b"still fine"


def test_denial_is_permission_denied(tp: Pki, grpc_server: tuple[int, Service]) -> None:
    port, _ = grpc_server
    with _proxy(tp, port) as p, _channel(tp, p.port, "other") as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/test.Echo/Echo")(b"x", timeout=10)
        err: Any = info.value
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == "no allow rule matches the client certificate"
        for _ in range(50):  # the access record follows the answer by a moment
            if any(r.get("decision") == "deny" for r in p.records()):
                break
            time.sleep(0.05)
        denied = [r for r in p.records() if r.get("decision") == "deny"]
    assert [(r["path"], r["status"]) for r in denied] == [("/test.Echo/Echo", 403)]
    assert (denied[0]["protocol"], denied[0]["grpc_status"]) == ("h2", 7)


def test_per_method_policy(tp: Pki, grpc_server: tuple[int, Service], tmp_path: Path) -> None:
    """A route on /test.Echo/Fail: only an identity nobody has; Echo stays allowed."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "policy:\n  allow:\n    - uri: " + ALLOWED_URI + "\n  routes:\n"
        "    - path_prefix: /test.Echo/Fail\n      allow:\n        - cn: nobody\n"
    )
    port, _ = grpc_server
    with _proxy(tp, port, "--config", str(cfg)) as p, _channel(tp, p.port) as ch:
        assert ch.unary_unary("/test.Echo/Echo")(b"ok", timeout=10) == b"ok"
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/test.Echo/Fail")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_grpc_with_http1_upstream_is_unavailable(tp: Pki, grpc_server: tuple[int, Service]) -> None:
    port, _ = grpc_server
    with (
        run_proxy(tp, f"http://127.0.0.1:{port}", "--http2", "on") as p,
        _channel(tp, p.port) as ch,
        pytest.raises(grpc.RpcError) as info,
    ):
        ch.unary_unary("/test.Echo/Echo")(b"x", timeout=10)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "upstream-protocol" in err.details()


def test_upstream_down_is_unavailable(tp: Pki) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    with (
        _proxy(tp, dead) as p,
        _channel(tp, p.port) as ch,
        pytest.raises(grpc.RpcError) as info,
    ):
        ch.unary_unary("/test.Echo/Echo")(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_upstream_graceful_stop_lets_the_call_in_flight_finish(tp: Pki) -> None:
    """The grpcio server stops with a grace period while a call is in flight: its GOAWAY must
    not cut the call (h2 alone would refuse the call's frames after the GOAWAY)."""
    svc = Service()
    server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(svc.slow)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Slow": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with _proxy(tp, port) as p, _channel(tp, p.port) as ch:
            call = ch.unary_unary("/test.Echo/Slow").future(b"", timeout=20)
            time.sleep(0.5)  # the call is at the server
            stopped = server.stop(grace=10)
            assert call.result() == b"late"
            stopped.wait(10)
    finally:
        server.stop(None)
