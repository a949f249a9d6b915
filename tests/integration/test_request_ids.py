"""A client's X-Request-Id, end to end: what the upstream gets and what the access record says
(real proxy, real TLS client, the recording upstream)."""

from __future__ import annotations

import time

from tests.helpers import Pki, Upstream, client_ctx, connect, read_response, run_proxy


def _ids(tp: Pki, upstream: Upstream, loop: str, *blocks: str) -> list[tuple[str, object]]:
    """For each header block in *blocks*, one request on one connection: (the X-Request-Id the
    upstream got, the access record's request_id)."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        with connect(p.port, client_ctx(tp, "good")) as s:
            buf = bytearray()
            for headers in blocks:
                s.sendall(f"GET /r HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode())
                assert read_response(s, buf)[0] == 200
        deadline = time.monotonic() + 5
        while len(recs := [r for r in p.records() if r.get("msg") == "access"]) < len(blocks):
            assert time.monotonic() < deadline, p.logs
            time.sleep(0.02)
    sent = [seen.one("x-request-id") for seen in upstream.seen]
    return list(zip(sent, [r["request_id"] for r in recs], strict=True))


def _ours(rid: str) -> bool:
    """The proxy's own id: 16 hex digits."""
    return len(rid) == 16 and int(rid, 16) >= 0


def test_an_x_request_id_the_client_names_in_connection_is_hop_by_hop_not_honoured(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    ids = _ids(
        tp,
        upstream,
        loop,
        "Connection: X-Request-Id\r\nX-Request-Id: hop-1\r\n",
        "Connection: keep-alive, x_request_id\r\nX-Request-Id: hop-2\r\n",
        "X-Request-Id: end-3\r\n",  # not nominated: the client's
    )
    (up1, log1), (up2, log2), (up3, log3) = ids
    assert _ours(up1) and _ours(up2) and up1 != up2, ids
    assert (up1, up2) == (log1, log2)
    assert up3 == log3 == "end-3"


def test_a_valid_x_request_id_with_surrounding_whitespace_is_honoured_trimmed(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    ids = _ids(
        tp,
        upstream,
        loop,
        "X-Request-Id:   abc-123  \r\n",
        "X-Request-Id:\tdef.456\t \r\n",
        "X-Request-Id:  a b  \r\n",  # invalid once trimmed: the proxy's own
    )
    assert ids[0] == ("abc-123", "abc-123") and ids[1] == ("def.456", "def.456"), ids
    assert _ours(ids[2][0]) and ids[2][0] == ids[2][1]
