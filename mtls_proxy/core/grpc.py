"""PURE. What the proxy must know of gRPC to answer a gRPC client itself (SPEC section 10).

A gRPC client reads the outcome of a call from its trailers, not from the HTTP status: a refusal
the proxy answers with a JSON 403 is, to grpcio, an opaque "UNKNOWN" or "UNIMPLEMENTED" error.
So a gRPC request the proxy refuses gets a trailers-only answer, as Envoy's RBAC filter sends:
`:status 200`, `content-type: application/grpc`, a `grpc-status` derived from the HTTP status
the refusal would have had, and the reason as a percent-encoded `grpc-message`.

Rules:
1. gRPC is recognised by `content-type` alone: `application/grpc`, optionally followed by `+`
   (a codec: `+proto`, `+json`) or `;` (parameters), case-insensitive (gRPC over HTTP/2 spec).
2. The HTTP-to-gRPC status mapping is the one of gRPC's "HTTP to gRPC Status Code Mapping" plus
   403 -> PERMISSION_DENIED and 400 -> INTERNAL, as the SPEC fixes them; anything else is UNKNOWN.
3. `grpc-message` is percent-encoded UTF-8: every byte outside printable ASCII (0x20-0x7E), and
   `%` itself, becomes `%XX` (upper-case hex); the result is always a valid header value.
4. `grpc-timeout` is 1 to 8 ASCII digits and one unit (H, M, S, m, u, n); anything else is
   invalid (None), never guessed.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
UNKNOWN: Final = 2
INTERNAL: Final = 13
UNIMPLEMENTED: Final = 12
PERMISSION_DENIED: Final = 7
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

_BY_HTTP: Final = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}
_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_PLAIN: Final = frozenset(range(0x20, 0x7F)) - {ord("%")}


def is_grpc(content_type: bytes | None) -> bool:
    """Whether a request with this content-type is a gRPC call (rule 1)."""
    if content_type is None:
        return False
    ct = content_type.lower()
    if not ct.startswith(b"application/grpc"):
        return False
    rest = ct[16:]
    return not rest or rest[0] in b"+;"


def status_for_http(status: int) -> int:
    """The grpc-status a client gets for a refusal the proxy would answer with HTTP *status*."""
    return _BY_HTTP.get(status, UNKNOWN)


def encode_message(text: str) -> bytes:
    """*text* as a grpc-message value (rule 3)."""
    return b"".join(
        bytes((b,)) if b in _PLAIN else b"%%%02X" % b for b in text.encode("utf-8", "replace")
    )


def trailers_only(http_status: int, reason: str) -> list[tuple[bytes, bytes]]:
    """The single HEADERS block (END_STREAM) that answers a refused gRPC call."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status_for_http(http_status)),
        (b"grpc-message", encode_message(reason)),
    ]


def parse_timeout(value: bytes) -> float | None:
    """A grpc-timeout value in seconds, or None when it is not valid (rule 4)."""
    if not 2 <= len(value) <= 9:
        return None
    digits, unit = value[:-1], value[-1]
    if not digits.isdigit() or not digits.isascii() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]
