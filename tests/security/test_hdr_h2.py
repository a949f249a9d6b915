"""docs/security.md, HDR over HTTP/2 (docs/http2.md): the identity-header cases of test_hdr.py
that apply to an HTTP/2 client, against the same recording HTTP/1.1 upstream. Where HTTP/1.1
tolerates a form (upper-case names, Connection), HTTP/2 calls it malformed: the stream is
refused (400) and nothing reaches the upstream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.h2client import h2_client, h2_exchange
from tests.helpers import Pki, Seen, Upstream, client_ctx, run_proxy, run_upstream
from tests.security.conftest import assert_canon

SUBJECT = "CN=client-good,O=Example Corp"
Headers = list[tuple[bytes, bytes]]


class H2Rig:
    def __init__(self, tp: Pki, port: int, upstream: Upstream) -> None:
        self.tp, self.port, self.upstream = tp, port, upstream

    def send(
        self, streams: dict[int, tuple[Headers, bytes | None]]
    ) -> tuple[dict[int, dict[str, object]], list[Seen]]:
        before = len(self.upstream.seen)
        s, conn = h2_client(self.port, client_ctx(self.tp, "good"))
        with s:
            res = h2_exchange(s, conn, streams)
        return res, self.upstream.seen[before:]

    def get(self, *extra: tuple[bytes, bytes]) -> Seen:
        res, seen = self.send({1: (_req(b"GET", *extra), None)})
        assert res[1]["headers"][b":status"] == b"200", res  # type: ignore[index]
        assert len(seen) == 1
        assert_canon(seen[0])
        return seen[0]

    def refused(self, *extra: tuple[bytes, bytes]) -> None:
        """A stream error (400, RST_STREAM) or a connection error (GOAWAY: h2's own check for some
        forms); either way nothing reaches the upstream."""
        res, seen = self.send({1: (_req(b"GET", *extra), None)})
        status = res[1].get("headers", {}).get(b":status")  # type: ignore[attr-defined]
        assert status == b"400" or "reset" in res[1] or 0 in res, res
        assert seen == []


def _req(method: bytes, *extra: tuple[bytes, bytes], path: bytes = b"/") -> Headers:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"a"),
        (b":path", path),
        *extra,
    ]


@pytest.fixture(scope="module")
def h2rig(tp: Pki) -> Iterator[H2Rig]:
    with (
        run_upstream() as up,
        run_proxy(tp, f"http://127.0.0.1:{up.port}", "--allow-all", "--http2", "on") as p,
    ):
        yield H2Rig(tp, p.port, up)


def test_hdr001_002_003_spoofs_are_replaced(h2rig: H2Rig) -> None:
    seen = h2rig.get(
        (b"x-client-subject", b"CN=admin"),
        (b"x-client-subject", b"CN=root"),
        (b"x-forwarded-client-cert", b"Hash=1"),
        (b"x-forwarded-client-cert", b"By=evil;Hash=2"),
        (b"x-client-verified", b"SUCCESS"),
    )
    assert seen.get("x-client-subject") == [SUBJECT]
    xfcc = seen.one("x-forwarded-client-cert")
    assert "By=evil" not in xfcc and "Hash=1;" not in xfcc and "Hash=2" not in xfcc
    assert xfcc.count("Hash=") == 1


@pytest.mark.parametrize("name", [b"X-Client-Subject", b"X-Forwarded-Client-Cert", b"Host"])
def test_hdr003_upper_case_names_are_malformed(h2rig: H2Rig, name: bytes) -> None:
    h2rig.refused((name, b"CN=admin"))


def test_hdr004_underscore_spellings_are_dropped(h2rig: H2Rig) -> None:
    seen = h2rig.get(
        (b"x_client_subject", b"CN=admin"),
        (b"x_forwarded_client_cert", b"Hash=00"),
        (b"x-client_subject", b"CN=admin"),
    )
    assert not [k for k, _ in seen.headers if "_" in k]
    assert seen.get("x-client-subject") == [SUBJECT]


@pytest.mark.parametrize(
    "field",
    [
        (b"connection", b"x-client-subject"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"te", b"gzip"),
    ],
)
def test_hdr007_008_connection_specific_fields_are_malformed(
    h2rig: H2Rig, field: tuple[bytes, bytes]
) -> None:
    h2rig.refused(field)


def test_hdr009_identity_in_request_trailers_never_reaches_the_upstream(h2rig: H2Rig) -> None:
    """HTTP/2 request trailers (a HEADERS frame after DATA) are not forwarded to HTTP/1.1."""
    s, conn = h2_client(h2rig.port, client_ctx(h2rig.tp, "good"))
    before = len(h2rig.upstream.seen)
    with s:
        conn.send_headers(1, _req(b"POST"))
        conn.send_data(1, b"hello")
        conn.send_headers(
            1, [(b"x-client-subject", b"CN=admin"), (b"x-forwarded-client-cert", b"Hash=00")],
            end_stream=True,
        )  # fmt: skip
        s.sendall(conn.data_to_send())
        res = _read_until_ended(s, conn, 1)
    seen = h2rig.upstream.seen[before:]
    assert res == b"200"
    assert len(seen) == 1 and seen[0].body_len == 5
    assert seen[0].get("x-client-subject") == [SUBJECT]
    assert_canon(seen[0])


def _read_until_ended(s: object, conn: object, sid: int) -> bytes | None:
    import h2.events

    status = None
    while True:
        data = s.recv(65536)  # type: ignore[attr-defined]
        if not data:
            return status
        for ev in conn.receive_data(data):  # type: ignore[attr-defined]
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                status = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset) and (
                ev.stream_id == sid
            ):
                return status
        s.sendall(conn.data_to_send())  # type: ignore[attr-defined]


def test_hdr021_every_stream_gets_one_fresh_set(h2rig: H2Rig) -> None:
    spoof = (b"x-client-subject", b"CN=admin")
    streams = {sid: (_req(b"GET", spoof, path=b"/s%d" % sid), None) for sid in range(1, 13, 2)}
    res, seen = h2rig.send(streams)
    assert all(r["headers"][b":status"] == b"200" for r in res.values())  # type: ignore[index]
    assert len(seen) == 6
    for one in seen:
        assert one.get("x-client-subject") == [SUBJECT]
        assert_canon(one)


def test_hdr022_forwarding_headers_are_the_proxys(h2rig: H2Rig) -> None:
    seen = h2rig.get(
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"forwarded", b"for=1.2.3.4;proto=http"),
        (b"x-real-ip", b"1.2.3.4"),
    )
    assert seen.get("x-forwarded-proto") == ["https"]
    assert seen.get("x-forwarded-for") == ["127.0.0.1"]
    assert seen.get("forwarded") == [] and seen.get("x-real-ip") == []


def test_hdr023_no_identity_or_hop_by_hop_in_responses(h2rig: H2Rig) -> None:
    h2rig.upstream.raw_response = (
        b"HTTP/1.1 200 OK\r\nConnection: X-Foo\r\nX-Foo: 1\r\nKeep-Alive: timeout=1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    try:
        res, _ = h2rig.send({1: (_req(b"GET", path=b"/raw"), None)})
    finally:
        h2rig.upstream.raw_response = b""
    headers = res[1]["headers"]
    assert headers[b":status"] == b"200" and res[1]["data"] == b"ok"  # type: ignore[index]
    names = set(headers)  # type: ignore[arg-type]
    assert not names & {b"x-foo", b"keep-alive", b"connection", b"transfer-encoding"}


def test_hdr_identity_headers_arrive_lower_case_and_once(h2rig: H2Rig) -> None:
    """What an HTTP/1.1 upstream sees from an HTTP/2 client is the HTTP/1.1 client's set."""
    seen = h2rig.get()
    echo_names = [k for k, _ in seen.headers]
    for name in ("x-forwarded-client-cert", "x-client-subject", "x-client-verified"):
        assert echo_names.count(name) == 1
