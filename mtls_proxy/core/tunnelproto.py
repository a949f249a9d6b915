"""PURE. The two ways `client` reaches its target through an egress proxy: HTTP CONNECT
(RFC 9110 9.3.6) and SOCKS5 (RFC 1928, no authentication). Sans-I/O: the shell writes what
`Tunnel` says to write and feeds it what the proxy sends, until it says the tunnel is open.

Rules:
1. The proxy's answer is bounded (MAX_REPLY): a proxy that talks forever is refused, not read
   forever.
2. Anything but success is a TunnelError naming the proxy's reason (status line or SOCKS reply
   code), so the log says why the target was not reached.
3. Bytes after the proxy's answer belong to the tunnel (the TLS handshake's): `leftover`.
4. SOCKS5 sends the target's name as given (address type 3), so the proxy resolves it, as
   curl's socks5h does: names of internal services often resolve only there.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, Literal

MAX_REPLY: Final = 16 * 1024
_SOCKS_ERRORS: Final = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class TunnelError(Exception):
    """The proxy did not open the tunnel; the message says why (rule 2)."""


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Tunnel:
    """One tunnel's negotiation: `first` to write, then `feed` until `open` (rules 1-3)."""

    def __init__(self, kind: Literal["connect", "socks5"], host: str, port: int) -> None:
        if not host or any(c in host for c in "\r\n\x00 /@") or not 0 < port < 65536:
            raise TunnelError(f"not a target a proxy can be asked for: {host!r}:{port}")
        self.kind, self.host, self.port = kind, host, port
        self.open = False
        self.leftover = b""
        self._buf = b""
        self._step = 0  # socks5: 0 awaiting the method choice, 1 awaiting the reply

    def first(self) -> bytes:
        """What to send the proxy first."""
        if self.kind == "connect":
            a = _authority(self.host, self.port)
            return f"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n".encode("ascii")
        return b"\x05\x01\x00"  # version 5, one method: no authentication

    def feed(self, data: bytes) -> bytes:
        """Take the proxy's bytes; returns what to send it next (often nothing)."""
        self._buf += data
        if len(self._buf) > MAX_REPLY:
            raise TunnelError(f"the proxy's answer is over {MAX_REPLY} bytes")
        if self.kind == "connect":
            self._connect_reply()
            return b""
        return self._socks_step()

    def _connect_reply(self) -> None:
        head, sep, rest = self._buf.partition(b"\r\n\r\n")
        if not sep:
            return
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise TunnelError(f"not an HTTP answer to CONNECT: {status_line[:80]!r}")
        code = int(parts[1])
        if not 200 <= code < 300:
            reason = parts[2].decode("latin-1", "replace")[:80] if len(parts) > 2 else ""
            raise TunnelError(f"the proxy refused CONNECT: {code} {reason}".rstrip())
        self.open, self.leftover = True, rest

    def _socks_step(self) -> bytes:
        if self._step == 0:
            if len(self._buf) < 2:
                return b""
            if self._buf[0] != 5:
                raise TunnelError(f"not a SOCKS5 proxy (version byte {self._buf[0]})")
            if self._buf[1] != 0:
                raise TunnelError("the SOCKS5 proxy requires authentication (not supported)")
            self._buf, self._step = self._buf[2:], 1
            return self._socks_request()
        return self._socks_reply()

    def _socks_request(self) -> bytes:
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            try:
                name = self.host.encode("idna")
            except UnicodeError:  # a label over 63 characters, an empty label
                raise TunnelError(f"not a host name: {self.host[:80]!r}") from None
            if len(name) > 255:
                raise TunnelError("the target's name is too long for SOCKS5") from None
            addr = b"\x03" + bytes([len(name)]) + name  # rule 4
        else:
            addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        return b"\x05\x01\x00" + addr + struct.pack("!H", self.port)

    def _socks_reply(self) -> bytes:
        b = self._buf
        if len(b) < 5:
            return b""
        if b[0] != 5:
            raise TunnelError(f"not a SOCKS5 reply (version byte {b[0]})")
        if b[1] != 0:
            raise TunnelError(
                "the SOCKS5 proxy refused: " + _SOCKS_ERRORS.get(b[1], f"reply code {b[1]}")
            )
        size = {1: 4, 4: 16, 3: 1 + b[4]}.get(b[3])
        if size is None:
            raise TunnelError(f"unknown SOCKS5 address type {b[3]}")
        end = 4 + size + 2
        if len(b) < end:
            return b""
        self.open, self.leftover = True, b[end:]
        return b""
