"""Refusing to run on pure-Python HTTP parsers (docs/security.md, DEP-02)."""

from __future__ import annotations


def c_parsers_problem(*, aiohttp: bool) -> str | None:
    """The pure-Python HTTP parsers give different, weaker verdicts (most historical aiohttp
    smuggling CVEs were there). The data plane and the admin port parse with httptools
    (llhttp, C); `client --http` also with aiohttp (*aiohttp*), which must be its C parser."""
    try:
        import httptools.parser.parser  # noqa: F401  # the compiled llhttp binding
    except ImportError:
        return "httptools' C parser (llhttp) is not installed"
    if not aiohttp:
        return None
    import aiohttp.http_parser as hp

    try:
        from aiohttp import _http_parser
    except ImportError:
        return "aiohttp's C HTTP parser is not installed (a pure-Python build of aiohttp)"
    if hp.HttpRequestParser is not getattr(_http_parser, "HttpRequestParser", None):
        return "aiohttp's pure-Python HTTP parser is in use (AIOHTTP_NO_EXTENSIONS is set?)"
    return None
