"""request.py rule 3: exactly one X-Request-Id upstream, the client's only if it is valid."""

from __future__ import annotations

import pytest

from mtls_proxy.core.headers import protected, split_request_headers
from mtls_proxy.http1.request import prepare
from tests.unit.test_request_response import BLOCK

OURS = b"a1b2c3d4e5f60001"


def _forward(*headers: tuple[bytes, bytes]) -> tuple[bytes, list[bytes]]:
    p = prepare(
        b"GET",
        b"/",
        "1.1",
        [(b"Host", b"svc"), *headers],
        upgrade=False,
        client_ip=b"10.0.0.9",
        block=BLOCK,
        default_host=b"up",
        request_id=OURS,
    )
    lines = [line for line in p.head.split(b"\r\n") if line.lower().startswith(b"x-request-id")]
    return p.request_id, lines


def test_without_one_the_proxy_s_id_is_forwarded() -> None:
    assert _forward() == (OURS, [b"X-Request-Id: " + OURS])


@pytest.mark.parametrize(
    "value", [b"abc", b"A-Z_a.z-0_9", b"x" * 128, b"0123456789abcdef0123456789abcdef"]
)
def test_a_valid_client_id_replaces_ours(value: bytes) -> None:
    for name in (b"X-Request-Id", b"x-request-id", b"X-REQUEST-ID"):
        assert _forward((name, value)) == (value, [b"X-Request-Id: " + value])


@pytest.mark.parametrize(
    "value", [b"", b"x" * 129, b"a b", b"a,b", b"a;b", b"\xc3\xa9", b"a/b", b"a\x01", b"a=b"]
)
def test_an_invalid_client_id_is_dropped_and_ours_forwarded(value: bytes) -> None:
    assert _forward((b"X-Request-Id", value)) == (OURS, [b"X-Request-Id: " + OURS])


def test_two_client_ids_are_both_dropped() -> None:
    pair = ((b"X-Request-Id", b"one"), (b"X-Request-Id", b"two"))
    assert _forward(*pair) == (OURS, [b"X-Request-Id: " + OURS])


def test_an_underscore_spelling_never_reaches_the_upstream() -> None:
    rid, lines = _forward((b"X_Request_Id", b"forged"))
    assert rid == OURS and lines == [b"X-Request-Id: " + OURS]
    assert protected(b"x-request-id")
    rh = split_request_headers([(b"X_Request_Id", b"forged")])
    assert rh.request_id is None and rh.underscored == [b"X_Request_Id"]


def test_the_default_id() -> None:
    p = prepare(
        b"GET",
        b"/",
        "1.1",
        [(b"Host", b"s")],
        upgrade=False,
        client_ip=b"1",
        block=BLOCK,
        default_host=b"up",
    )
    assert p.request_id == b"-" and b"\r\nX-Request-Id: -\r\n" in p.head


@pytest.mark.parametrize(
    "connection",
    [b"X-Request-Id", b"keep-alive, x-request-id", b"X_REQUEST_ID", b"close,x-Request-ID"],
)
def test_a_client_id_its_connection_header_nominates_is_not_honoured(connection: bytes) -> None:
    """Hop-by-hop by the client's own declaration (headers.py rule 1): the proxy's id instead."""
    pair = ((b"Connection", connection), (b"X-Request-Id", b"abc"))
    assert _forward(*pair) == (OURS, [b"X-Request-Id: " + OURS])
    assert _forward(*reversed(pair)) == (OURS, [b"X-Request-Id: " + OURS])


def test_another_nomination_leaves_the_client_id_honoured() -> None:
    assert _forward((b"Connection", b"x-other"), (b"X-Request-Id", b"abc"))[0] == b"abc"


@pytest.mark.parametrize(
    ("value", "honoured"),
    [
        (b"abc-123  ", b"abc-123"),  # llhttp strips the leading OWS only
        (b"  abc-123  ", b"abc-123"),
        (b"\tdef.456\t ", b"def.456"),
        (b" x", b"x"),
    ],
)
def test_a_valid_client_id_with_ows_around_it_is_honoured_trimmed(
    value: bytes, honoured: bytes
) -> None:
    """RFC 9110 section 5.5: whitespace around a field value is not part of it."""
    assert _forward((b"X-Request-Id", value)) == (honoured, [b"X-Request-Id: " + honoured])


@pytest.mark.parametrize("value", [b"  ", b"\t", b" a b ", b" a\x0b "])
def test_a_value_invalid_once_trimmed_is_dropped(value: bytes) -> None:
    assert _forward((b"X-Request-Id", value)) == (OURS, [b"X-Request-Id: " + OURS])
