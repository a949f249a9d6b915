"""PURE. How a value from a certificate, a client or a secret is written to each output channel.

Logs and terminal reports are read by people and split into records by tools, line by line. A
value holding a line break forges a record (or a ``decision:`` line), an ESC sequence rewrites
the terminal, a bidi control (U+202E) reorders what a reader sees. So no such value leaves raw:
every print or log site passes it through the function of its channel, here.

Rules:
1. Printable ASCII (U+0020..U+007E) is kept, except the backslash, written ``\\\\``: a value
   can never spell an escape that this module did not write.
2. Every other character is written as in a Python string literal: ``\\xNN`` below U+0100,
   ``\\uNNNN`` below U+10000, else ``\\UNNNNNNNN``. That covers the C0 and C1 controls and DEL
   (LF, CR, ESC, NUL), the bidi controls (U+202A..U+202E, U+2066..U+2069), zero-width and other
   format characters, line/paragraph separators, lone surrogates, and every non-ASCII letter
   (a homoglyph shows as its code point: U+0430 is not an ``a``).
3. Text log fields (``key=value``, logfmt): a value that is empty or holds a space, ``"`` or
   ``=`` is double-quoted, with ``\\"`` for a quote, so it cannot add a field of its own.
4. A text log field has the value of the JSON record's field: null is ``-`` (nginx's empty
   variable), and the text ``-`` is quoted (``"-"``) so the two never read alike; booleans are
   ``true``/``false``; a list or mapping is its JSON text (then rules 1-3).
5. The JSON log needs nothing from here: ``json.dumps(..., ensure_ascii=True)`` and
   ``encode_basestring_ascii`` already write rules 1-2 in JSON's syntax.
"""

from __future__ import annotations

import json
import re
from typing import Final

# Anything but printable ASCII, and the backslash (rules 1-2).
_UNSAFE: Final = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
# Values that need quotes in a key=value field (rule 3).
_NEEDS_QUOTES: Final = re.compile(r'[ "=]')


def _escape_one(match: re.Match[str]) -> str:
    n = ord(match.group())
    if n == 0x5C:
        return "\\\\"
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _escape(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    # The common case (plain ASCII, nothing to do) stays cheap: the access log is a hot path.
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return _UNSAFE.sub(_escape_one, text)


def for_text_log(value: object) -> str:
    """*value* for a text log record's message (rules 1-2): one line, printable ASCII."""
    return _escape(value)


def text_log_field(value: object) -> str:
    """*value* for a text log ``key=value`` field (rules 1-4)."""
    if value is None:
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        value = json.dumps(value, default=str, ensure_ascii=False)
    text = _escape(value)
    if text and text != "-" and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + text.replace('"', '\\"') + '"'


def for_terminal(value: object) -> str:
    """*value* for a line printed on a terminal (explain, check): rules 1-2, so it never
    carries ESC, CR, LF or a bidi control, and cannot start a line of its own."""
    return _escape(value)
