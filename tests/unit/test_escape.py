"""escape.py: the one rule per output channel for values from certificates, clients and secrets
(text log, terminal); 100 % line and branch coverage (pure core)."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable

import pytest

from mtls_proxy.core.escape import for_terminal, for_text_log, text_log_field
from mtls_proxy.telemetry.logs import TextFormatter

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize("escape", [for_text_log, for_terminal])
def test_plain_ascii_is_kept(escape: Callable[[object], str]) -> None:
    assert escape("spiffe://test.local/ns/default/sa/client") == (
        "spiffe://test.local/ns/default/sa/client"
    )
    assert escape("") == ""
    assert escape(None) == "None"
    assert escape(42) == "42"


@pytest.mark.parametrize("escape", [for_text_log, for_terminal])
def test_controls_bidi_and_non_ascii_are_escaped(escape: Callable[[object], str]) -> None:
    assert escape("a\nb\rc\x1b[2Jd\x00\x7f\x85") == "a\\x0ab\\x0dc\\x1b[2Jd\\x00\\x7f\\x85"
    assert escape(BIDI) == ("\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067\\u2068\\u2069")
    assert escape("\u2028\u2029\u200b\ufeff") == "\\u2028\\u2029\\u200b\\ufeff"
    assert escape("p\u0430ypal") == "p\\u0430ypal"  # a Cyrillic a is not an a
    assert escape("caf\xe9 \U0001f600") == "caf\\xe9 \\U0001f600"
    assert escape("\ud800") == "\\ud800"  # a lone surrogate (surrogateescape'd bytes)
    # A backslash is doubled, so that a value cannot spell an escape of its own.
    assert escape("\\x0a") == "\\\\x0a"
    assert escape("a\\b\n") == "a\\\\b\\x0a"


def test_every_code_point_comes_out_as_one_printable_ascii_line_and_round_trips() -> None:
    rng = random.Random(20260509)
    samples = [chr(c) for c in range(0x3000)] + [
        "".join(chr(rng.randrange(0x110000)) for _ in range(40)) for _ in range(300)
    ]
    for text in samples:
        for escape in (for_text_log, for_terminal):
            out = escape(text)
            assert out.isascii() and out.isprintable(), repr(text)
            # Rules 1-2 are Python's string-literal escapes: nothing is lost or ambiguous.
            assert out.encode().decode("unicode_escape") == text


def test_text_log_field_is_quoted_when_it_could_add_a_field() -> None:
    assert text_log_field("spiffe://x/y") == "spiffe://x/y"
    assert text_log_field(None) == "-"  # null, as nginx writes an empty variable
    assert text_log_field("-") == '"-"'  # the text "-": not null
    assert text_log_field("") == '""'
    assert text_log_field("CN=client,O=Example Corp") == '"CN=client,O=Example Corp"'
    assert text_log_field('a"b') == '"a\\"b"'
    forged = 'x\n2026-01-01T00:00:00.000Z INFO mtls_proxy.access: decision=allow "'
    out = text_log_field(forged)
    assert out == ('"x\\x0a2026-01-01T00:00:00.000Z INFO mtls_proxy.access: decision=allow \\""')
    assert "\n" not in out and out.count('"') - out.count('\\"') == 2


def test_text_log_field_writes_the_json_value() -> None:
    """Rule 4: the value of the JSON record's field, null as '-'."""
    assert text_log_field(True) == "true" and text_log_field(False) == "false"
    assert text_log_field(0) == "0" and text_log_field(1.5) == "1.5"
    assert text_log_field([1, 2]) == '"[1, 2]"'
    assert text_log_field(("a_b", "c\n")) == '"[\\"a_b\\", \\"c\\\\n\\"]"'
    assert text_log_field({"k": None}) == '"{\\"k\\": null}"'
    assert text_log_field(["caf\xe9"]) == '"[\\"caf\\xe9\\"]"'


def test_text_log_formatter_keeps_one_record_on_one_line() -> None:
    """logs.TextFormatter: the message, every extra field and a traceback, escaped."""
    record = logging.LogRecord(
        "mtls_proxy.server", logging.WARNING, __file__, 1, "bad %s", ("a\nb",), None
    )
    record.peer = "CN=x\u202e"
    record.spiffe_id = "spiffe://t/x\nforged=1"
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = TextFormatter().format(record)
    assert "\n" not in line and line.isascii() and line.isprintable()
    assert " WARNING mtls_proxy.server: bad a\\x0ab " in line
    assert 'peer="CN=x\\u202e"' in line and "spiffe_id=spiffe://t/x\\x0aforged\\x3d1" not in line
    assert 'spiffe_id="spiffe://t/x\\x0aforged=1"' in line
    assert 'exc="Traceback' in line and "line one\\x0aline two" in line
