"""PURE. WebSocket upgrades (RFC 6455 section 4): the only protocol switch the proxy tunnels.

Rules:
1. A request is a WebSocket upgrade only when it is exactly one: ``GET``, HTTP/1.1, no body,
   ``Upgrade: websocket`` (one token), ``Connection`` naming ``upgrade``, one
   ``Sec-WebSocket-Key`` that is 16 bytes in base64, and ``Sec-WebSocket-Version: 13``. Any
   other ``Upgrade`` (h2c, ...) is stripped and the request forwarded as a plain one.
2. The policy has been applied and the identity headers injected before the upgrade request is
   forwarded; the tunnel starts only after the upstream's ``101`` carries ``Upgrade: websocket``,
   ``Connection: upgrade`` and the ``Sec-WebSocket-Accept`` computed from the key. Any other
   ``101`` is a 502 (docs/security.md, SMG-059, UPS-008).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING, Final

from mtls_proxy.http1.response import MalformedResponse

if TYPE_CHECKING:
    from mtls_proxy.core.headers import RequestHeaders
    from mtls_proxy.http1.response import ResponseHead

GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
UPGRADE_LINES: Final = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


def websocket_key(method: bytes, http10: bool, has_body: bool, rh: RequestHeaders) -> bytes | None:
    """The Sec-WebSocket-Key of a valid WebSocket upgrade request (rule 1), else None."""
    if method != b"GET" or http10 or has_body or b"upgrade" not in rh.connection_tokens:
        return None
    if [v.strip().lower() for v in rh.upgrade_values] != [b"websocket"]:
        return None
    keys = [v for lname, _, v in rh.kept if lname == b"sec-websocket-key"]
    versions = [v.strip() for lname, _, v in rh.kept if lname == b"sec-websocket-version"]
    if len(keys) != 1 or versions != [b"13"]:
        return None
    key = keys[0].strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return key


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value the upstream must answer *key* with."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 -- RFC 6455


def _values(raw_head: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in raw_head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            out.append(v.strip())
    return out


def check_switch(raw_head: bytes, key: bytes) -> None:
    """Raise MalformedResponse unless the upstream's 101 accepts *key* (rule 2)."""
    upgrade = [v.lower() for v in _values(raw_head, b"upgrade")]
    tokens = {t.strip().lower() for v in _values(raw_head, b"connection") for t in v.split(b",")}
    if upgrade != [b"websocket"] or b"upgrade" not in tokens:
        raise MalformedResponse("101 without Upgrade: websocket and Connection: upgrade")
    if _values(raw_head, b"sec-websocket-accept") != [accept_for(key)]:
        raise MalformedResponse("101 with a wrong Sec-WebSocket-Accept")


def client_switch(head: ResponseHead) -> bytes:
    """The 101 the client gets: the upstream's end-to-end fields plus the upgrade pair."""
    return b"".join((b"HTTP/1.1 101 Switching Protocols\r\n", *head.lines, UPGRADE_LINES, b"\r\n"))
