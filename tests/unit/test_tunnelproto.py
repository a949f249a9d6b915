"""core/tunnelproto.py: CONNECT and SOCKS5 negotiation, byte by byte and all at once."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtls_proxy.core.tunnelproto import MAX_REPLY, Tunnel, TunnelError


def _feed_split(t: Tunnel, data: bytes, cut: int) -> bytes:
    out = t.feed(data[:cut])
    return out + t.feed(data[cut:])


def test_connect_request_and_success_with_leftover() -> None:
    t = Tunnel("connect", "api.example", 8443)
    assert t.first() == b"CONNECT api.example:8443 HTTP/1.1\r\nHost: api.example:8443\r\n\r\n"
    assert t.feed(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n") == b""
    assert not t.open
    t.feed(b"\r\n\x16\x03\x03")
    assert t.open and t.leftover == b"\x16\x03\x03"
    assert Tunnel("connect", "::1", 443).first().startswith(b"CONNECT [::1]:443 HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", "the proxy refused CONNECT: 403 Forbidden"),
        (b"HTTP/1.0 407\r\n\r\n", "the proxy refused CONNECT: 407"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer to CONNECT"),
        (b"HTTP/1.1 abc x\r\n\r\n", "not an HTTP answer to CONNECT"),
    ],
)
def test_connect_refusals_name_the_reason(reply: bytes, message: str) -> None:
    with pytest.raises(TunnelError, match=message):
        Tunnel("connect", "h", 1).feed(reply)


def test_an_endless_answer_is_refused() -> None:
    t = Tunnel("connect", "h", 1)
    with pytest.raises(TunnelError, match="over"):
        t.feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_REPLY // 6))


@pytest.mark.parametrize(
    ("host", "port"), [("", 1), ("a b", 1), ("a\r\nb", 1), ("h", 0), ("h", 65536)]
)
def test_targets_no_proxy_can_be_asked_for(host: str, port: int) -> None:
    with pytest.raises(TunnelError, match="not a target"):
        Tunnel("socks5", host, port)


def _negotiate(t: Tunnel, first: bytes, reply: bytes) -> None:
    t.feed(first)
    t.feed(reply)


def _socks_reply(atyp: int, addr: bytes, code: int = 0) -> bytes:
    return bytes([5, code, 0, atyp]) + addr + struct.pack("!H", 1080)


@pytest.mark.parametrize(
    ("host", "request_addr"),
    [
        ("10.0.0.1", b"\x01\x0a\x00\x00\x01"),
        ("::1", b"\x04" + b"\x00" * 15 + b"\x01"),
        ("db.internal", b"\x03\x0bdb.internal"),
    ],
)
@pytest.mark.parametrize("cut", [0, 1, 3, 7])
def test_socks5_by_address_type(host: str, request_addr: bytes, cut: int) -> None:
    t = Tunnel("socks5", host, 5432)
    assert t.first() == b"\x05\x01\x00"
    request = _feed_split(t, b"\x05\x00", min(cut, 2))
    assert request == b"\x05\x01\x00" + request_addr + struct.pack("!H", 5432)
    for atyp, addr in ((1, b"\x7f\x00\x00\x01"), (4, b"\x00" * 16), (3, b"\x04name")):
        t2 = Tunnel("socks5", host, 5432)
        t2.feed(b"\x05\x00")
        _feed_split(t2, _socks_reply(atyp, addr) + b"TLS", cut)
        assert t2.open and t2.leftover == b"TLS"


@pytest.mark.parametrize(
    ("first", "reply", "message"),
    [
        (b"\x04\x00", b"", "not a SOCKS5 proxy"),
        (b"\x05\x02", b"", "requires authentication"),
        (b"\x05\x00", b"\x04\x00\x00\x01" + b"\x00" * 6, "not a SOCKS5 reply"),
        (b"\x05\x00", _socks_reply(1, b"\x00" * 4, code=5), "connection refused"),
        (b"\x05\x00", _socks_reply(1, b"\x00" * 4, code=2), "not allowed by ruleset"),
        (b"\x05\x00", _socks_reply(1, b"\x00" * 4, code=99), "reply code 99"),
        (b"\x05\x00", b"\x05\x00\x00\x09\x00\x00\x00", "unknown SOCKS5 address type 9"),
    ],
)
def test_socks5_refusals_name_the_reason(first: bytes, reply: bytes, message: str) -> None:
    t = Tunnel("socks5", "db", 5432)
    with pytest.raises(TunnelError, match=message):
        _negotiate(t, first, reply)


def test_a_name_too_long_for_socks5() -> None:
    t = Tunnel("socks5", ".".join(["a" * 60] * 5), 1)
    with pytest.raises(TunnelError, match="too long"):
        t.feed(b"\x05\x00")


def test_socks5_waits_for_the_whole_reply() -> None:
    t = Tunnel("socks5", "db", 1)
    t.feed(b"\x05")
    assert not t.open
    t.feed(b"\x00")
    assert t.feed(b"\x05\x00\x00") == b"" and not t.open
    t.feed(b"\x03\x05abcd")  # a domain reply, one byte short of its name, then the port
    assert not t.open
    t.feed(b"e\x00\x01")
    assert t.open and t.leftover == b""


@given(st.binary(max_size=64), st.integers(0, 64))
def test_any_proxy_answer_opens_or_says_why_and_never_crashes(data: bytes, cut: int) -> None:
    for kind in ("connect", "socks5"):
        t = Tunnel(kind, "svc", 443)  # type: ignore[arg-type]
        message = "open"
        try:
            _feed_split(t, data, cut)
        except TunnelError as exc:
            message = str(exc)
        assert message
        if t.open:
            assert len(t.leftover) <= len(data)


def test_a_label_too_long_is_not_a_host_name() -> None:
    t = Tunnel("socks5", "a" * 64, 1)
    with pytest.raises(TunnelError, match="not a host name"):
        t.feed(b"\x05\x00")
