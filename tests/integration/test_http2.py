"""HTTP/2 downstream (--http2 on): curl --http2 and a raw h2 client over real mTLS, a real
HTTP/1.1 upstream behind (tests.helpers: h11)."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import time

import pytest
from hpack import Encoder
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from tests.h2client import h2_client, h2_exchange
from tests.helpers import Pki, Upstream, client_ctx, curl, run_proxy


def _get(path: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path),
        *extra,
    ]


def test_curl_http2_gets_identity_and_the_upstream_speaks_http1(
    tp: Pki, upstream: Upstream
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on") as p:
        url = f"https://localhost:{p.port}/h2?x=1"
        ok = curl(
            tp,
            "good",
            url,
            "--http2",
            "-H",
            "X-Client-Subject: CN=admin",
            "-d",
            "hello",
            "-w",
            "\n%{http_version}",
        )
        denied = curl(
            tp, "other", url, "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"
        )
        deadline = time.monotonic() + 5  # access records leave in batches
        while len(access := [r for r in p.records() if r.get("msg") == "access"]) < 2:
            assert time.monotonic() < deadline, p.records()
            time.sleep(0.02)
        h2_allowed = p.metric(
            'mtls_proxy_requests_total{code="2xx",decision="allow",protocol="h2"}'
        )
    assert h2_allowed == 1
    assert ok.returncode == 0, ok.stderr
    body, version = ok.stdout.rsplit("\n", 1)
    assert version == "2"
    echo = json.loads(body)
    assert echo["target"] == "/h2?x=1" and echo["body_len"] == 5
    assert ["x-client-subject", "CN=client-good,O=Example Corp"] in echo["headers"]
    assert ["x-client-subject", "CN=admin"] not in echo["headers"]
    assert denied.stdout == "403 2"
    assert sorted(r.get("status") for r in access) == [200, 403]
    assert {r.get("protocol") for r in access} == {"h2"}


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp: .ci/run installs it")
def test_nghttp_concurrent_streams_on_one_connection(tp: Pki, upstream: Upstream) -> None:
    """nghttp (nghttp2's client) fetches two URIs as two streams of one connection."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on") as p:
        base = f"https://localhost:{p.port}"
        out = subprocess.run(
            [
                "nghttp",
                "-y",
                "--cert",
                tp.crt("good"),
                "--key",
                tp.key("good"),
                "-H",
                "x-forwarded-client-cert: By=forged",
                f"{base}/one",
                f"{base}/two",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    echoes, text, dec = [], out.stdout.strip(), json.JSONDecoder()
    while text:  # the two bodies, back to back
        echo, end = dec.raw_decode(text)
        echoes.append(echo)
        text = text[end:].lstrip()
    assert sorted(e["target"] for e in echoes) == ["/one", "/two"]
    for echo in echoes:
        xfcc = [v for k, v in echo["headers"] if k == "x-forwarded-client-cert"]
        assert len(xfcc) == 1 and "forged" not in xfcc[0]


def test_http1_still_default_and_alpn_offers_h2_only_when_on(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        out = curl(
            tp,
            "good",
            f"https://localhost:{p.port}/x",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
        )
    assert out.stdout == "1.1"


def test_streams_multiplexed_and_spoofed_identity_stripped(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on") as p:
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        with s:
            post = [(b":method", b"POST"), *_get(b"/post")[1:]]
            res = h2_exchange(
                s,
                conn,
                {
                    1: (_get(b"/one", (b"x-forwarded-client-cert", b"Hash=forged")), None),
                    3: (_get(b"/two", (b"x-client_verified", b"SUCCESS")), None),
                    5: (post, b"x" * 100_000),  # beyond the 64 KiB default window: flow control
                },
            )
    assert all(r["headers"][b":status"] == b"200" for r in res.values()), res  # type: ignore[index]
    echoes = {json.loads(r["data"])["target"]: json.loads(r["data"]) for r in res.values()}  # type: ignore[arg-type]
    assert set(echoes) == {"/one", "/two", "/post"}
    assert echoes["/post"]["body_len"] == 100_000
    for echo in echoes.values():
        xfcc = [v for k, v in echo["headers"] if k == "x-forwarded-client-cert"]
        assert len(xfcc) == 1 and "forged" not in xfcc[0]
        assert not [k for k, _ in echo["headers"] if "_" in k]


def test_malformed_and_denied_streams(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on") as p:
        s, conn = h2_client(p.port, client_ctx(tp, "other"))
        with s:
            res = h2_exchange(
                s,
                conn,
                {
                    1: ([*_get(b"/x")[:2], (b":authority", b"a b"), (b":path", b"/x")], None),
                    3: (_get(b"/denied"), None),  # "other" is not allowed: 403
                    5: (
                        [
                            (b":method", b"POST"),
                            *_get(b"/pkg.Svc/Call")[1:],
                            (b"content-type", b"application/grpc"),
                            (b"te", b"trailers"),
                        ],
                        b"\x00\x00\x00\x00\x00",
                    ),
                    7: (  # a malformed gRPC call: INTERNAL, trailers-only
                        [
                            (b":method", b"POST"),
                            (b":scheme", b"https"),
                            (b":authority", b"user@svc"),
                            (b":path", b"/pkg.Svc/Call"),
                            (b"content-type", b"application/grpc+proto"),
                        ],
                        None,
                    ),
                },
            )
    assert res[1]["headers"][b":status"] == b"400"  # type: ignore[index]
    assert res[3]["headers"][b":status"] == b"403"  # type: ignore[index]
    assert json.loads(res[3]["data"])["error"] == "forbidden"  # type: ignore[arg-type]
    grpc_headers = res[5]["headers"]  # trailers-only: PERMISSION_DENIED
    assert grpc_headers[b":status"] == b"200" and grpc_headers[b"grpc-status"] == b"7"  # type: ignore[index]
    malformed = res[7]["headers"]
    assert malformed[b":status"] == b"200" and malformed[b"grpc-status"] == b"13"  # type: ignore[index]
    assert upstream.seen == []


def test_connection_max_streams_ends_with_goaway_and_refuses_later_streams(
    tp: Pki, upstream: Upstream
) -> None:
    """The third stream is the last: GOAWAY(NO_ERROR) names it; a stream sent after it is
    refused (REFUSED_STREAM: never processed, safe to retry); the open ones finish."""
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on",
        "--h2-connection-max-streams", "3",
    ) as p:  # fmt: skip
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        for sid, path in ((1, b"/a"), (3, b"/a"), (5, b"/slow?s=1")):
            conn.send_headers(sid, _get(path), end_stream=True)
        s.sendall(conn.data_to_send())
        frames = _raw_frames(s, until=GoAwayFrame)
        late = HeadersFrame(7, Encoder().encode(_get(b"/late")))
        late.flags.add("END_HEADERS")
        late.flags.add("END_STREAM")
        s.sendall(late.serialize())
        frames += _raw_frames(s, until=None)
        s.close()
        goaways = p.metric('mtls_proxy_h2_goaways_total{reason="max_streams"}')
    goaway = next(f for f in frames if isinstance(f, GoAwayFrame))
    assert (goaway.error_code, goaway.last_stream_id) == (0, 5)
    refused = [f for f in frames if isinstance(f, RstStreamFrame) and f.stream_id == 7]
    assert refused and refused[0].error_code == 0x7
    ended = {f.stream_id for f in frames if "END_STREAM" in f.flags}
    assert {1, 3, 5} <= ended  # the open streams were answered
    assert sorted(s.target for s in upstream.seen) == ["/a", "/a", "/slow?s=1"]
    assert goaways == 1


def _raw_frames(s: ssl.SSLSocket, until: type[Frame] | None) -> list[Frame]:
    """Frames as they come, until one of type *until* or the end of the connection."""
    out: list[Frame] = []
    buf = b""
    while True:
        try:
            data = s.recv(65536)
        except (ssl.SSLError, OSError):
            return out
        if not data:
            return out
        buf += data
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = 9 + int.from_bytes(buf[:3], "big")
            frame, _ = Frame.parse_frame_header(memoryview(buf[:9]))
            frame.parse_body(memoryview(buf[9:n]))
            buf = buf[n:]
            out.append(frame)
            if until is not None and isinstance(frame, until):
                return out


def test_shutdown_drain_answers_the_open_streams(tp: Pki, upstream: Upstream) -> None:
    """SIGTERM: GOAWAY(NO_ERROR) at once, and the stream in flight still gets its answer."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on") as p:
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        conn.send_headers(1, _get(b"/slow?s=1"), end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        while not upstream.seen:  # the request is at the upstream: now drain
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p.proc.send_signal(signal.SIGTERM)
        frames = _raw_frames(s, until=None)
        s.close()
    goaway = next(f for f in frames if isinstance(f, GoAwayFrame))
    assert (goaway.error_code, goaway.last_stream_id) == (0, 1)
    heads = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == 1]
    assert heads, [type(f).__name__ for f in frames]
    assert any("END_STREAM" in f.flags for f in frames if f.stream_id == 1)


def test_client_goaway_still_gets_its_open_streams_answered(tp: Pki, upstream: Upstream) -> None:
    """A client's GOAWAY says it opens no more streams; the one in flight is still answered
    (h2 alone would be CLOSED and fail the response's frames), and nothing is logged as an
    error."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on") as p:
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        conn.send_headers(1, _get(b"/slow?s=0.5"), end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        while not upstream.seen:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.sendall(GoAwayFrame(0).serialize())  # last-stream-id 0: we push nothing
        frames = _raw_frames(s, until=None)
        s.close()
        logs = list(p.logs)
    assert any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in frames), frames
    assert any("END_STREAM" in f.flags for f in frames if f.stream_id == 1)
    assert not [line for line in logs if "Traceback" in line or '"level": "error"' in line]
