"""core/grpc.py: recognising gRPC, the status mapping, grpc-message and grpc-timeout."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtls_proxy.core import grpc


@pytest.mark.parametrize(
    ("ct", "expected"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc+json", True),
        (b"Application/GRPC", True),
        (b"application/grpc;charset=utf-8", True),
        (b"application/grpc-web", False),  # grpc-web is another protocol (a browser's)
        (b"application/grpcx", False),
        (b"application/json", False),
        (b"", False),
        (None, False),
    ],
)
def test_is_grpc(ct: bytes | None, expected: bool) -> None:
    assert grpc.is_grpc(ct) is expected


@pytest.mark.parametrize(
    ("http", "code"),
    [
        (403, 7),
        (401, 16),
        (400, 13),
        (404, 12),
        (429, 14),
        (502, 14),
        (503, 14),
        (504, 14),
        (500, 2),
        (413, 2),
    ],
)
def test_status_mapping_is_the_specs(http: int, code: int) -> None:
    assert grpc.status_for_http(http) == code


def test_message_encoding() -> None:
    assert grpc.encode_message("no rule allows CN=a") == b"no rule allows CN=a"
    assert grpc.encode_message("100% denied") == b"100%25 denied"
    assert grpc.encode_message("line\r\nx") == b"line%0D%0Ax"
    assert grpc.encode_message("caf\u00e9") == b"caf%C3%A9"
    assert grpc.encode_message("\x7f") == b"%7F"


@given(st.text())
def test_message_is_a_safe_header_value_that_decodes_back(text: str) -> None:
    enc = grpc.encode_message(text)
    assert all(0x20 <= b < 0x7F for b in enc)  # never CR, LF, NUL or obs-text
    expected = text.encode("utf-8", "replace").decode("utf-8")
    assert urllib.parse.unquote(enc.decode("ascii"), errors="strict") == expected


def test_trailers_only_denial() -> None:
    assert grpc.trailers_only(403, "denied: no rule") == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"7"),
        (b"grpc-message", b"denied: no rule"),
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0),
        (b"2H", 7200.0),
        (b"3M", 180.0),
        (b"250m", 0.25),
        (b"99999999u", 99.999999),
        (b"5n", 5e-9),
        (b"0S", 0.0),
    ],
)
def test_timeout_valid(value: bytes, seconds: float) -> None:
    assert grpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"S",
        b"1",
        b"123456789S",
        b"1s",
        b"1x",
        b"-1S",
        b"+1S",
        b" 1S",
        b"1.5S",
        "\u0661S".encode(),
    ],
)
def test_timeout_invalid(value: bytes) -> None:
    assert grpc.parse_timeout(value) is None
