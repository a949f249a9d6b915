"""What a client showed in a handshake that failed: its SNI, TLS version and leaf certificate.

After a failed verification OpenSSL keeps no peer certificate (``getpeercert()`` and the
unverified chain are empty), so the handshake messages are read as they pass: OpenSSL's message
callback sees the ClientHello and the client's Certificate message in plaintext (TLS 1.3's too).

Rules:
1. The callback runs for every TLS record of every connection: it returns at its first test for
   anything but a handshake message read during a watched handshake.
2. What it keeps is bounded (the SNI, one DER of at most 64 KiB; a larger leaf is hashed as it
   passes and only its hash kept) and it never raises (an exception there would surface as an
   error of the connection's read).
3. The capture is per handshake: ``server._handshake`` sets a ``Seen`` in its task's context,
   which the transport's callbacks inherit; with no ``Seen`` set, nothing is captured.
4. The record always names the leaf by its SHA-256, whatever its size; its subject and issuer are
   cut to 1024 characters, a cut value ending in ``...`` (a client chooses their length, the log
   line must stay readable and bounded).
5. The SNI is kept as the client sent it, one character per byte (latin-1: a byte outside ASCII
   is U+0080..U+00FF), never escaped here: each log format escapes it once (escape.py, JSON),
   so the byte 0xff (``\\xff`` in text, ``\\u00ff`` in JSON) never reads as the typed text
   ``\\xff`` (``\\\\xff``, ``"\\\\xff"``).
"""

from __future__ import annotations

import contextvars
import hashlib
import ssl
from typing import Final

from cryptography import x509

from mtls_proxy.core.identity import rfc2253

_HANDSHAKE: Final = 22  # the TLS content type of handshake messages
_CLIENT_HELLO: Final = 1
_CERTIFICATE: Final = 11
_TLS13: Final = 0x0304
_VERSIONS: Final = {0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
_MAX_LEAF: Final = 64 * 1024  # the largest leaf kept for its names (rule 2)
_MAX_NAME: Final = 1024  # peer and peer_issuer are cut beyond this (rule 4)
CUT: Final = "..."


class Seen:
    """What one handshake showed so far."""

    __slots__ = ("done", "leaf", "leaf_sha256", "sni", "version")

    def __init__(self) -> None:
        self.sni: str | None = None
        self.version = 0
        self.leaf: bytes | None = None
        self.leaf_sha256: str | None = None  # set instead of leaf for one too large to keep
        self.done = False

    def fields(self) -> dict[str, object]:
        """The log fields: sni, tls_version and, if the client sent a leaf, its identity."""
        out: dict[str, object] = {
            "sni": self.sni,
            "tls_version": _VERSIONS.get(self.version, f"0x{self.version:04x}")
            if self.version
            else None,
        }
        if self.leaf:
            out.update(leaf_fields(self.leaf))
        elif self.leaf_sha256 is not None:  # rule 4: named by its hash alone
            out.update(peer_sha256=self.leaf_sha256, peer=None, peer_issuer=None)
        return out


SEEN: Final[contextvars.ContextVar[Seen | None]] = contextvars.ContextVar(
    "mtls_proxy_handshake", default=None
)


def _on_message(
    conn: object, direction: str, version: int, content_type: int, msg_type: int, data: bytes
) -> None:
    if content_type != _HANDSHAKE or direction != "read":
        return  # rule 1: record headers and everything written
    seen = SEEN.get()
    if seen is None or seen.done:
        return
    try:
        if msg_type == _CLIENT_HELLO:
            seen.sni = client_hello_sni(data)
        elif msg_type == _CERTIFICATE:
            seen.version = version
            leaf = certificate_leaf(data, version == _TLS13)
            if leaf is not None and len(leaf) > _MAX_LEAF:
                # Rule 2: not kept, but hashed now (the common leaf is hashed only if its
                # handshake fails: hashing every one would cost each handshake for nothing).
                seen.leaf, seen.leaf_sha256 = None, hashlib.sha256(leaf).hexdigest()
            else:
                seen.leaf, seen.leaf_sha256 = leaf, None
        else:
            seen.version = version
    except Exception:  # noqa: BLE001, S110 -- rule 2: a log detail never fails a connection
        pass


def watch(ctx: ssl.SSLContext) -> None:
    """Capture the handshake messages of *ctx*'s connections (once per context)."""
    if ctx.__dict__.get("_mtls_watched"):
        return
    ctx.__dict__["_mtls_watched"] = True
    # The C attribute, not ssl.SSLContext's property: that wraps the callback in one that turns
    # each number into an enum, several microseconds per TLS record (rule 1).
    ssl._ssl._SSLContext._msg_callback.__set__(ctx, _on_message)  # type: ignore[attr-defined]


def _u(data: bytes, at: int, n: int) -> int:
    if at + n > len(data):
        raise ValueError("truncated")
    return int.from_bytes(data[at : at + n], "big")


def client_hello_sni(msg: bytes) -> str | None:
    """The host_name of a ClientHello's server_name extension (RFC 6066), None without one.
    *msg* is the whole handshake message, its 4-byte header first. ValueError if malformed."""
    at = 4 + 2 + 32  # header, legacy_version, random
    at += 1 + _u(msg, at, 1)  # legacy_session_id
    at += 2 + _u(msg, at, 2)  # cipher_suites
    at += 1 + _u(msg, at, 1)  # legacy_compression_methods
    end = at + 2 + _u(msg, at, 2)
    at += 2
    while at + 4 <= end:
        kind, size = _u(msg, at, 2), _u(msg, at + 2, 2)
        at += 4
        if kind == 0:  # server_name: a list of (name_type, name); host_name is type 0
            if _u(msg, at + 2, 1) == 0:
                name = msg[at + 5 : at + 5 + _u(msg, at + 3, 2)]
                # One character per byte (rule 5): escaping here ("backslashreplace") made the
                # byte 0xff and the typed text "\xff" the same string.
                return name[:255].decode("latin-1")
            return None
        at += size
    return None


def certificate_leaf(msg: bytes, tls13: bool) -> bytes | None:
    """The first certificate (DER) of a Certificate message (RFC 8446 4.4.2, RFC 5246 7.4.2),
    None when the list is empty. *msg* starts with the 4-byte header. ValueError if malformed."""
    at = 4
    if tls13:
        at += 1 + _u(msg, at, 1)  # certificate_request_context
    if _u(msg, at, 3) == 0:
        return None
    size = _u(msg, at + 3, 3)
    if at + 6 + size > len(msg):
        raise ValueError("bad certificate entry")
    return msg[at + 6 : at + 6 + size]


def cut(name: str) -> str:
    """*name* cut to 1024 characters, then ``...`` (rule 4): a cut value is longer than any
    uncut one, so a subject that really ends in ``...`` is not mistaken for a cut one."""
    return name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + CUT


def leaf_fields(der: bytes) -> dict[str, object]:
    """peer_sha256, peer (subject) and peer_issuer of a leaf, the names cut (rule 4); the hash
    alone if it does not parse. Names only, never the certificate itself."""
    out: dict[str, object] = {"peer_sha256": hashlib.sha256(der).hexdigest()}
    try:
        cert = x509.load_der_x509_certificate(der)
        out["peer"] = cut(rfc2253(cert.subject))  # as in the access record, up to its length
        out["peer_issuer"] = cut(rfc2253(cert.issuer))
    except ValueError:
        out["peer"] = out["peer_issuer"] = None
    return out
