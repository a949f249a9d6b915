"""PURE. Request paths as route rules see them, and as the upstream then receives them.

Only used when the policy has routes: a path rule is worthless if the upstream reads the path
differently from the proxy (``/public/../admin``, ``//admin``, ``/%61dmin`` reach ``/admin`` in
most servers). So, like Envoy's ``normalize_path`` + ``merge_slashes``, the proxy decides on a
normalized path and forwards that same path, never the original.

Rules:
1. Percent-encoded unreserved characters (RFC 3986 section 2.3) are decoded; other escapes keep
   their bytes (hex upper-cased).
2. Empty segments are merged; ``.`` and ``..`` segments are removed (RFC 3986 section 5.2.4); a
   ``..`` above the root is refused.
3. Paths that servers disagree on are refused with 400 rather than guessed: an encoded ``/``
   or ``\\``, a raw ``\\``, an encoded NUL, or a malformed escape; an encoded dot segment
   (``%2e%2e``, ``.%2e``); a dot or empty segment carrying ``;parameters`` (``..;/``, ``.;x``,
   ``/;/``, ``..%3b``). Tomcat, Jetty and Spring strip the parameters and then resolve ``..``,
   so ``/public/..;/admin`` is ``/admin`` to them; a proxy that kept ``..;`` as a name would
   check one path and forward another (INT-020; Spring's StrictHttpFirewall refuses the same).
4. For *matching* only, each segment's ``;parameters`` are ignored, as Tomcat and Spring do
   (``/admin;jsessionid=x`` is ``/admin``); the forwarded path keeps them.
"""

from __future__ import annotations

import re
from typing import Final

_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_REFUSED_ESCAPES: Final = frozenset({0x2F, 0x5C, 0x00})  # / \ NUL
_ESCAPE: Final = re.compile(rb"%(.{0,2})", re.DOTALL)
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_PARAMS: Final = re.compile(rb";|%3[bB]")
_DOTS: Final = (b"", b".", b"..")


class AmbiguousPath(ValueError):
    """A path the proxy will not guess about (rule 3)."""


def _decode_unreserved(path: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        hx = m.group(1)
        if len(hx) != 2 or not all(c in _HEX for c in hx):
            raise AmbiguousPath("malformed percent-escape")
        value = int(hx, 16)
        if value in _REFUSED_ESCAPES:
            raise AmbiguousPath("encoded slash, backslash or NUL")
        return bytes((value,)) if value in _UNRESERVED else b"%" + hx.upper()

    return _ESCAPE.sub(one, path)


def _check_segment(seg: bytes) -> None:
    """Refuse a raw segment that is a dot segment in disguise (rule 3)."""
    m = _PARAMS.search(seg)
    name = seg if m is None else seg[: m.start()]
    if m is not None and name in _DOTS:
        raise AmbiguousPath("path parameters on an empty or dot segment")
    if b"%" in name and name.replace(b"%2e", b".").replace(b"%2E", b".") in _DOTS:
        raise AmbiguousPath("encoded dot segment")


def normalize_target(target: bytes) -> bytes:
    """The origin-form target with its path normalized (rules 1-3); the query is kept as is."""
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    if not path.startswith(b"/"):
        return target  # "*" (OPTIONS): no path to route on
    if b"\\" in path:
        raise AmbiguousPath("backslash in path")
    if b";" in path or b"%" in path:
        for seg in path.split(b"/"):
            _check_segment(seg)
    segments: list[bytes] = []
    parts = _decode_unreserved(path).split(b"/")[1:]
    for i, seg in enumerate(parts):
        last = i == len(parts) - 1
        if seg == b"..":
            if not segments:
                raise AmbiguousPath("'..' above the root")
            segments.pop()
            if last:
                segments.append(b"")  # "/a/b/.." is the directory "/a/"
        elif seg == b".":
            if last:
                segments.append(b"")
        elif seg or last:
            segments.append(seg)
    return b"/" + b"/".join(segments) + query


def match_path(target: bytes) -> str:
    """The path that route prefixes are compared with: no query, no ``;params`` (rule 4)."""
    q = target.find(b"?")
    path = target if q < 0 else target[:q]
    if b";" in path:
        path = b"/".join(seg.split(b";", 1)[0] for seg in path.split(b"/"))
    return path.decode("latin-1")


def prefix_matches(prefix: str, path: str) -> bool:
    """Whole-segment prefix match: ``/admin`` matches ``/admin`` and ``/admin/x`` only."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")
