"""PURE. The PROXY protocol version 2 header (HAProxy's proxy-protocol.txt, section 2.2) that
`serve --mode tcp --proxy-protocol conn|tls|tls-full` writes first on each upstream connection,
so a TCP service behind the proxy learns who the client is.

Rules:
1. The header is the 12-byte signature, version 2 with the PROXY command (0x21), the family
   (TCP over IPv4 0x11, TCP over IPv6 0x21, or UNSPEC 0x00 when the client has no IP address,
   as over a unix socket listener), the length of what follows, the addresses and the TLVs.
2. Addresses are the client's (source) and the listener's (destination). When one is IPv6, an
   IPv4 one is written IPv4-mapped, so the pair is one family.
3. TLVs: ALPN (0x01), AUTHORITY (0x02, the SNI), and SSL (0x20): client flags (SSL; a
   certificate on this connection, i.e. a full handshake; a certificate in this TLS session,
   also when resumed: HAProxy sets both on a full handshake), verify 0 (the chain was verified:
   the proxy refuses others before this point), then the sub-TLVs VERSION (0x21, "TLSv1.3" as
   HAProxy writes it), and with tls-full CN (0x22), CIPHER (0x23) and the leaf certificate in
   DER (0x28).
4. A TLV or a header longer than 65,535 bytes cannot be written: ValueError (never a cut).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2: Final = 0x21
TCP4, TCP6, UNSPEC = 0x11, 0x21, 0x00
ALPN, AUTHORITY, SSL = 0x01, 0x02, 0x20
SSL_VERSION, SSL_CN, SSL_CIPHER, SSL_CLIENT_CERT = 0x21, 0x22, 0x23, 0x28
CLIENT_SSL, CLIENT_CERT_CONN, CLIENT_CERT_SESS = 0x01, 0x02, 0x04
MODES: Final = ("off", "conn", "tls", "tls-full")


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value (rule 4)."""
    if len(value) > 0xFFFF:
        raise ValueError(f"PROXY v2 TLV 0x{kind:02x} is {len(value)} bytes, over 65535")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(
    version: str,
    cn: str | None,
    leaf_der: bytes | None,
    cipher: str | None,
    cert_conn: bool,
    cert_sess: bool,
) -> bytes:
    """The PP2_TYPE_SSL TLV with its sub-TLVs (rule 3)."""
    flags = (
        CLIENT_SSL | (CLIENT_CERT_CONN if cert_conn else 0) | (CLIENT_CERT_SESS if cert_sess else 0)
    )
    subs = tlv(SSL_VERSION, version.encode("ascii"))
    if cn is not None:
        subs += tlv(SSL_CN, cn.encode("utf-8"))
    if cipher is not None:
        subs += tlv(SSL_CIPHER, cipher.encode("ascii"))
    if leaf_der is not None:
        subs += tlv(SSL_CLIENT_CERT, leaf_der)
    return tlv(SSL, struct.pack("!BI", flags, 0) + subs)


def header(src: tuple[str, int] | None, dst: tuple[str, int] | None, tlvs: bytes = b"") -> bytes:
    """The v2 header for a connection from *src* to *dst* (host, port), with *tlvs* (rules 1-2,
    4). Either address None: UNSPEC, no addresses."""
    if src is None or dst is None:
        family, addresses = UNSPEC, b""
    else:
        s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
        if s.version == d.version == 4:
            family = TCP4
        else:
            family = TCP6
            s, d = _v6(s), _v6(d)
        addresses = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    body = addresses + tlvs
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header is {len(body)} bytes, over 65535")
    return SIGNATURE + struct.pack("!BBH", PROXY_V2, family, len(body)) + body


def _v6(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):
        return addr
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + addr.packed)
