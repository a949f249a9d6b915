"""core/proxyproto.py: PROXY v2 headers, decoded by an independent parser (the `proxy-protocol`
PyPI package) and checked byte for byte where the layout is fixed."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proxyprotocol.v2 import ProxyProtocolV2

from mtls_proxy.core import proxyproto as pp


def _decode(data: bytes):  # type: ignore[no-untyped-def]
    return ProxyProtocolV2().unpack(data)


def test_ipv4_with_tls_full_tlvs() -> None:
    leaf = b"\x30\x82\x01\x00" + b"d" * 256
    tlvs = pp.tlv(pp.ALPN, b"h2") + pp.tlv(pp.AUTHORITY, b"db.svc")
    tlvs += pp.ssl_tlv("TLSv1.3", "client-a", leaf, "TLS_AES_128_GCM_SHA256", True, True)
    data = pp.header(("10.0.0.7", 5555), ("127.0.0.1", 8443), tlvs)
    assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and data[12:14] == b"\x21\x11"
    assert struct.unpack("!H", data[14:16])[0] == len(data) - 16
    r = _decode(data)
    assert r.source == (ipaddress.IPv4Address("10.0.0.7"), 5555)
    assert r.dest == (ipaddress.IPv4Address("127.0.0.1"), 8443)
    assert (r.tlv.alpn, r.tlv.authority) == (b"h2", "db.svc")
    ssl = r.tlv.ssl
    assert (ssl.has_ssl, ssl.has_cert_conn, ssl.has_cert_sess, ssl.verified) == (True,) * 4
    assert ssl.client == 0x07  # as HAProxy's send-proxy-v2-ssl sets them on a full handshake
    assert (ssl.version, ssl.cn, ssl.cipher) == ("TLSv1.3", "client-a", "TLS_AES_128_GCM_SHA256")
    assert ssl.get(pp.SSL_CLIENT_CERT) == leaf


def test_tls_mode_without_certificate_fields() -> None:
    data = pp.header(
        ("10.0.0.7", 1), ("10.0.0.8", 2), pp.ssl_tlv("TLSv1.2", None, None, None, False, False)
    )
    ssl = _decode(data).tlv.ssl
    assert (ssl.has_ssl, ssl.has_cert_conn, ssl.version, ssl.cn) == (True, False, "TLSv1.2", None)


def test_ipv6_and_mixed_families_are_mapped() -> None:
    r = _decode(pp.header(("2001:db8::1", 40000), ("::1", 8443)))
    assert r.source == (ipaddress.IPv6Address("2001:db8::1"), 40000)
    mixed = pp.header(("10.0.0.7", 1), ("::1", 2))
    assert mixed[13] == pp.TCP6
    assert _decode(mixed).source == (ipaddress.IPv6Address("::ffff:10.0.0.7"), 1)


def test_no_client_address_is_unspec() -> None:
    data = pp.header(None, ("127.0.0.1", 1), pp.tlv(pp.AUTHORITY, b"x"))
    assert data[13] == pp.UNSPEC and data[16:] == b"\x02\x00\x01x"


def test_oversized_values_are_refused_not_cut() -> None:
    with pytest.raises(ValueError, match="TLV 0x28"):
        pp.ssl_tlv("TLSv1.3", "c", b"x" * 70000, None, True, True)
    with pytest.raises(ValueError, match="header is"):
        pp.header(("10.0.0.1", 1), ("10.0.0.2", 2), pp.tlv(pp.ALPN, b"a" * 65530))


@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=300),
    st.text(max_size=40) | st.none(),
)
def test_round_trip(src, dst, sport, dport, authority, cn) -> None:  # type: ignore[no-untyped-def]
    tlvs = pp.tlv(pp.AUTHORITY, authority)
    tlvs += pp.ssl_tlv("TLSv1.3", cn, b"\x30\x00", None, False, True)  # a resumed session
    r = _decode(pp.header((str(src), sport), (str(dst), dport), tlvs))
    want_v6 = src.version == 6 or dst.version == 6
    assert (r.source[1], r.dest[1]) == (sport, dport)
    if not want_v6:
        assert (r.source[0], r.dest[0]) == (src, dst)
    else:
        mapped = [a if a.version == 6 else ipaddress.IPv6Address(f"::ffff:{a}") for a in (src, dst)]
        assert [r.source[0], r.dest[0]] == mapped
    assert r.tlv.get(pp.AUTHORITY) == authority
    assert r.tlv.ssl.cn == cn
