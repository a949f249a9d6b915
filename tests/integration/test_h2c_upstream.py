"""--upstream-protocol h2c for plain HTTP/2 (not gRPC): curl --http2 and a raw h2 client over
mTLS -> the proxy -> a real h2c server (tests/h2server.py) on one multiplexed connection."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.h2client import h2_client, h2_exchange
from tests.h2server import H2Upstream, run_h2_upstream
from tests.helpers import Pki, Proxy, client_ctx, connect, curl, read_response, run_proxy

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"svc")]


@pytest.fixture
def h2up() -> Iterator[H2Upstream]:
    with run_h2_upstream() as up:
        yield up


@pytest.fixture
def proxy(tp: Pki, h2up: H2Upstream) -> Iterator[Proxy]:
    with run_proxy(
        tp, f"http://127.0.0.1:{h2up.port}", "--http2", "on", "--upstream-protocol", "h2c"
    ) as p:
        yield p


def test_curl_through_to_an_h2c_upstream(tp: Pki, proxy: Proxy, h2up: H2Upstream) -> None:
    url = f"https://localhost:{proxy.port}/hello?q=1"
    out = curl(tp, "good", url, "--http2", "-H", "x-forwarded-client-cert: By=forged", "-d", "abc")
    assert out.returncode == 0, out.stderr
    echo = json.loads(out.stdout)
    assert echo["method"] == "POST" and echo["path"] == "/hello?q=1" and echo["body_len"] == 3
    assert echo["scheme"] == "http" and echo["authority"] == f"localhost:{proxy.port}"
    names = [k for k, _ in echo["headers"]]
    assert names[:4] == [":method", ":scheme", ":authority", ":path"]
    xfcc = [v for k, v in echo["headers"] if k == "x-forwarded-client-cert"]
    assert len(xfcc) == 1 and "forged" not in xfcc[0]
    assert names.count("x-client-verified") == 1 and "host" not in names
    assert not {"connection", "transfer-encoding", "keep-alive"} & set(names)


def test_streams_share_one_upstream_connection_and_flow_control_holds(
    tp: Pki, proxy: Proxy, h2up: H2Upstream
) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: 16 stream windows each way
    streams: dict[int, tuple[list[tuple[bytes, bytes]], bytes | None]] = {
        sid: ([*GET, (b":path", b"/s%d" % sid)], None) for sid in range(1, 20, 2)
    }
    streams[21] = ([(b":method", b"POST"), *GET[1:], (b":path", b"/big")], big)
    streams[23] = ([(b":method", b"HEAD"), *GET[1:], (b":path", b"/head")], None)
    s, conn = h2_client(proxy.port, client_ctx(tp, "good"))
    with s:
        res = h2_exchange(s, conn, streams)
    assert all(r["headers"][b":status"] == b"200" for r in res.values())  # type: ignore[index]
    assert res[21]["data"] == big
    assert res[23]["data"] == b"" and res[23]["headers"][b"content-length"] != b"0"  # type: ignore[index]
    paths = sorted(str(r["path"]) for r in h2up.seen)
    assert len(paths) == 12 and "/big" in paths
    assert h2up.connections == 1


def test_upstream_reset_and_absence_are_502(tp: Pki, proxy: Proxy) -> None:
    s, conn = h2_client(proxy.port, client_ctx(tp, "good"))
    with s:
        res = h2_exchange(s, conn, {1: ([*GET, (b":path", b"/reset")], None)})
    assert res[1]["headers"][b":status"] == b"502"  # type: ignore[index]
    assert json.loads(res[1]["data"])["error"]  # type: ignore[arg-type]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with run_proxy(
        tp, f"http://127.0.0.1:{port}", "--http2", "on", "--upstream-protocol", "h2c"
    ) as p:
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        with s:
            res = h2_exchange(s, conn, {1: ([*GET, (b":path", b"/x")], None)})
    assert res[1]["headers"][b":status"] == b"502"  # type: ignore[index]


def test_https_upstream_with_h2c_is_a_config_error(tp: Pki) -> None:
    import subprocess

    from tests.helpers import proxy_cmd

    out = subprocess.run(
        proxy_cmd(
            "check",
            "--upstream",
            "https://127.0.0.1:9",
            "--upstream-protocol",
            "h2c",
            "--allow-all",
            *tp.material(),
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "--upstream-protocol: h2c is cleartext HTTP/2" in out.stderr


def test_http1_clients_reach_an_h2c_upstream(tp: Pki, proxy: Proxy, h2up: H2Upstream) -> None:
    """--upstream-protocol h2c: an HTTP/1.1 client's requests go as HTTP/2 streams too (the
    upstream may speak nothing else); the response comes back as HTTP/1.1, trailers dropped."""
    base = f"https://localhost:{proxy.port}"
    out = curl(
        tp, "good", f"{base}/one", f"{base}/two", "--http1.1", "-H",
        "X-Forwarded-Client-Cert: By=forged", "-w", "\n%{http_version} %{http_code} %{url}\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().split("\n")
    echoes = [json.loads(line) for line in lines[0::2]]
    for echo, written in zip(echoes, lines[1::2], strict=True):  # each answer is its request's
        assert written == f"1.1 200 {base}{echo['path']}"
    assert sorted(e["path"] for e in echoes) == ["/one", "/two"]
    for echo in echoes:
        xfcc = [v for k, v in echo["headers"] if k == "x-forwarded-client-cert"]
        assert len(xfcc) == 1 and "forged" not in xfcc[0]
    big = b"q" * 1_000_000
    s = connect(proxy.port, client_ctx(tp, "good"))
    with s:
        s.sendall(
            b"POST /big HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        )
        status, headers, body = read_response(s, bytearray())
        assert (status, body) == (200, big)
        assert headers.get("transfer-encoding") == "chunked" and "x-trailer" not in headers
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, headers, body = read_response(s, bytearray(), head_only=True)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        s.sendall(b"GET /reset HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        assert read_response(s, bytearray())[0] == 502
    assert h2up.connections == 1  # every request, from both clients, on one h2c connection
