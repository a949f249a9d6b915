"""WebSocket upgrade recognition and the 101 check (RFC 6455 section 4)."""

from __future__ import annotations

import pytest

from mtls_proxy.core.headers import split_request_headers
from mtls_proxy.http1.response import MalformedResponse, parse_head
from mtls_proxy.http1.websocket import accept_for, check_switch, client_switch, websocket_key

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GOOD = [
    (b"Host", b"a"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]


def test_rfc6455_example_accept() -> None:
    assert accept_for(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [h for h in GOOD if h[0] != name]


@pytest.mark.parametrize(
    ("method", "http10", "body", "headers", "key"),
    [
        (b"GET", False, False, GOOD, KEY),
        (b"POST", False, False, GOOD, None),
        (b"GET", True, False, GOOD, None),
        (b"GET", False, True, GOOD, None),
        (b"GET", False, False, _without(b"Connection"), None),
        (b"GET", False, False, [*_without(b"Upgrade"), (b"Upgrade", b"h2c")], None),
        (b"GET", False, False, [*GOOD, (b"Sec-WebSocket-Key", KEY)], None),
        (b"GET", False, False, _without(b"Sec-WebSocket-Version"), None),
        (
            b"GET",
            False,
            False,
            [*_without(b"Sec-WebSocket-Key"), (b"Sec-WebSocket-Key", b"!!")],
            None,
        ),
        (
            b"GET",
            False,
            False,
            [*_without(b"Sec-WebSocket-Key"), (b"Sec-WebSocket-Key", b"YWJj")],
            None,
        ),
    ],
)
def test_websocket_key(
    method: bytes, http10: bool, body: bool, headers: list[tuple[bytes, bytes]], key: bytes | None
) -> None:
    assert websocket_key(method, http10, body, split_request_headers(headers)) == key


ACCEPT = b"Sec-WebSocket-Accept: " + accept_for(KEY)


@pytest.mark.parametrize(
    ("head", "ok"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + ACCEPT,
            True,
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n" + ACCEPT,
            False,
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" + ACCEPT, False),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x",
            False,
        ),
    ],
)
def test_check_switch(head: bytes, ok: bool) -> None:
    if ok:
        check_switch(head, KEY)
    else:
        with pytest.raises(MalformedResponse):
            check_switch(head, KEY)


def test_client_switch_keeps_end_to_end_fields_and_adds_the_upgrade_pair() -> None:
    head = parse_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + ACCEPT
        + b"\r\nSec-WebSocket-Protocol: chat"
    )
    out = client_switch(head)
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and out.endswith(b"\r\n\r\n")
    assert ACCEPT in out and b"Sec-WebSocket-Protocol: chat" in out
    assert out.count(b"Upgrade: websocket") == 1
