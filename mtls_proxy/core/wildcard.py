"""PURE. Matchers for allow-list values: URI patterns with ``*``/``**`` and DNS names with ``*.``.

Rules:
1. Matching is byte-exact and case-sensitive for URIs (SPIFFE IDs compare as strings); no
   normalisation (no ``..`` resolution, no percent-decoding) happens before matching.
2. ``*`` matches exactly one non-empty path segment; ``**`` matches one or more segments and may
   only be the last segment (ghostunnel's wildcard semantics).
3. DNS names compare case-insensitively (RFC 4343); ``*.`` matches exactly one leftmost label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_SCHEME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DNS_LABEL: Final = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class PatternError(ValueError):
    """An allow-list pattern that cannot be compiled."""


@dataclass(frozen=True, slots=True)
class UriPattern:
    """A compiled ``--allow-uri`` pattern."""

    source: str
    regex: re.Pattern[str]

    def matches(self, value: str) -> bool:
        """True when *value* matches the whole pattern."""
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class DnsPattern:
    """A compiled ``--allow-dns`` pattern."""

    source: str
    wildcard: bool
    suffix: str  # lower case; for wildcards, the part after '*.'

    def matches(self, value: str) -> bool:
        """True when *value* (a DNS SAN) matches."""
        v = value.lower()
        if not self.wildcard:
            return v == self.suffix
        head, dot, rest = v.partition(".")
        # Exactly one label: 'a.example.com' matches '*.example.com', 'example.com' and
        # 'a.b.example.com' do not (RFC 6125 §6.4.3 style).
        return bool(dot) and rest == self.suffix and _DNS_LABEL.match(head) is not None


def compile_uri(pattern: str) -> UriPattern:
    """Compile a URI pattern; raise PatternError with the reason."""
    m = _SCHEME.match(pattern)
    if m is None:
        raise PatternError(f"{pattern!r} is not a URI pattern (expected scheme://...)")
    if any(c in pattern for c in "\x00\r\n \t"):
        raise PatternError(f"{pattern!r} contains whitespace or control characters")
    prefix, path = pattern[: m.end()], pattern[m.end() :]
    segments = path.split("/")
    parts = [re.escape(prefix)]
    for i, seg in enumerate(segments):
        if i:
            parts.append("/")
        if seg == "*":
            if i == 0:
                raise PatternError(f"{pattern!r}: '*' is not allowed in the authority")
            parts.append("[^/]+")
        elif seg == "**":
            if i != len(segments) - 1 or i == 0:
                raise PatternError(f"{pattern!r}: '**' is only allowed as the last path segment")
            parts.append(".+")
        elif "*" in seg:
            raise PatternError(f"{pattern!r}: '*' must be a whole path segment")
        else:
            parts.append(re.escape(seg))
    return UriPattern(pattern, re.compile("".join(parts), re.DOTALL))


def compile_dns(pattern: str) -> DnsPattern:
    """Compile a DNS pattern; raise PatternError with the reason."""
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern
    labels = name.split(".")
    if not name or not all(_DNS_LABEL.match(label) for label in labels):
        raise PatternError(
            f"{pattern!r} is not a DNS name (only a leading '*.' label may be a wildcard)"
        )
    return DnsPattern(pattern, wildcard, name.lower())
