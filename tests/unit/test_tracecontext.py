"""W3C trace context (core/tracecontext.py): the traceparent parser, checked against the spec's
examples and, with Hypothesis, against an independent reading of the same grammar; and what
the header rewrite (headers.py, request.py rule 4) forwards."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtls_proxy.core.headers import split_request_headers
from mtls_proxy.core.tracecontext import TraceParent, child, parse, upstream_fields
from mtls_proxy.http1.request import prepare
from mtls_proxy.http2.request import translate
from tests.unit.test_request_response import BLOCK

TID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PID = b"00f067aa0ba902b7"
W3C = b"00-" + TID + b"-" + PID + b"-01"  # the spec's example
HEX = "0123456789abcdef"


def _reference(value: bytes) -> bool:
    """The grammar read another way (split on '-', W3C Trace Context section 3.2): is *value*
    a traceparent the proxy must honour?"""
    text = value.strip(b" \t").decode("latin-1")
    parts = text.split("-")
    if len(parts) < 4 or (parts[0] == "00" and len(parts) != 4):
        return False
    version, trace_id, parent_id, flags = parts[:4]

    def is_hex(s: str, n: int) -> bool:
        return len(s) == n and all(c in HEX for c in s)

    if not (is_hex(version, 2) and is_hex(trace_id, 32) and is_hex(parent_id, 16)):
        return False
    if not is_hex(flags, 2) or version == "ff":
        return False
    if set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return False
    rest = "-".join(parts[4:])
    return all("\x21" <= c <= "\x7e" for c in rest)


# -- the parser ----------------------------------------------------------------------------------
def test_the_spec_example_parses_into_its_fields() -> None:
    tp = parse(W3C)
    assert tp == TraceParent(W3C) and tp.sampled
    assert (tp.trace_id, tp.parent_id, tp.flags) == (TID, PID, b"01")
    unsampled = parse(W3C[:-2] + b"00")
    assert unsampled is not None and not unsampled.sampled
    assert parse(W3C[:-2] + b"ff") is not None  # flags the proxy does not know are kept


@pytest.mark.parametrize(
    "value",
    [
        b"",
        W3C.upper(),  # lower-case hex only
        W3C.replace(b"4bf9", b"4BF9"),
        b"00-" + b"0" * 32 + b"-" + PID + b"-01",  # all-zero trace-id
        b"00-" + TID + b"-" + b"0" * 16 + b"-01",  # all-zero parent-id
        b"ff-" + TID + b"-" + PID + b"-01",  # version ff
        W3C + b"-extra",  # version 00 has exactly four fields
        W3C + b"0",
        W3C[:-1],
        b"00-" + TID[:-1] + b"-" + PID + b"-01",
        b"00-" + TID + b"-" + PID + b"01",
        b"00_" + TID + b"_" + PID + b"_01",
        b"0-" + TID + b"-" + PID + b"-01",
        b"00-" + TID + b"-" + PID + b"-0g",
        b"00-" + TID + b" -" + PID + b"-01",  # whitespace inside
        W3C + b"," + W3C,  # two in one field line
        b"01-" + TID + b"-" + PID + b"-01x",  # a later version: the end or '-' after 55
        b"01-" + TID + b"-" + PID + b"-01- space",
    ],
)
def test_invalid_traceparents_are_refused(value: bytes) -> None:
    assert parse(value) is None
    assert not _reference(value)


def test_later_versions_are_read_by_their_first_55_characters() -> None:
    later = b"cc-" + TID + b"-" + PID + b"-01-what-the-future-adds"
    tp = parse(later)
    assert tp is not None and (tp.value, tp.trace_id, tp.parent_id) == (later, TID, PID)
    assert parse(b"01-" + TID + b"-" + PID + b"-00") is not None


def test_whitespace_around_the_value_is_trimmed() -> None:
    tp = parse(b" \t" + W3C + b"\t ")
    assert tp is not None and tp.value == W3C


@given(
    trace=st.binary(min_size=16, max_size=16).filter(any),
    parent=st.binary(min_size=8, max_size=8).filter(any),
    flags=st.integers(0, 255),
    version=st.integers(0, 254),
    tail=st.sampled_from([b"", b"-x", b"-a-b-c", b"-"]),
)
def test_every_valid_traceparent_parses_to_its_fields(
    trace: bytes, parent: bytes, flags: int, version: int, tail: bytes
) -> None:
    if version == 0:
        tail = b""
    value = b"%02x-%s-%s-%02x%s" % (
        version,
        trace.hex().encode(),
        parent.hex().encode(),
        flags,
        tail,
    )
    tp = parse(value)
    assert tp is not None and _reference(value)
    assert (tp.value, tp.trace_id, tp.parent_id) == (
        value,
        trace.hex().encode(),
        parent.hex().encode(),
    )
    assert tp.sampled == bool(flags & 1)


@given(st.binary(max_size=80))
def test_parse_agrees_with_the_reference_on_any_bytes(value: bytes) -> None:
    assert (parse(value) is not None) == _reference(value)


@given(
    st.integers(0, 54),
    st.sampled_from(list(b"ABCDEFG-_ xz\x00\x7f")),
)
def test_one_changed_character_of_a_valid_value_is_caught(at: int, byte: int) -> None:
    value = bytearray(W3C)
    if value[at] == byte:
        return
    value[at] = byte
    assert (parse(bytes(value)) is not None) == _reference(bytes(value))


def test_child_is_a_version_00_traceparent_that_parses_back() -> None:
    ours = child(TID, b"b7ad6b7169203331", True)
    assert ours.value == b"00-" + TID + b"-b7ad6b7169203331-01"
    assert parse(ours.value) == ours
    assert child(TID, b"b7ad6b7169203331", False).flags == b"00"


# -- what the upstream gets ------------------------------------------------------------------------
OWN = child(TID, b"b7ad6b7169203331", True)


def _span(parent: TraceParent | None) -> tuple[TraceParent | None, object]:
    return (child(parent.trace_id if parent else b"1" * 32, OWN.parent_id, True), "span")


def _asis(parent: TraceParent | None) -> tuple[TraceParent | None, object]:
    return None, None


def test_upstream_fields_forward_a_valid_one_with_its_tracestate() -> None:
    lines, ctx, handle = upstream_fields("forward", W3C, [b"a=1", b"b=2"], None)
    assert lines == b"traceparent: " + W3C + b"\r\ntracestate: a=1,b=2\r\n"
    assert ctx == parse(W3C) and handle is None
    assert upstream_fields("create", W3C, None, _asis)[0] == b"traceparent: " + W3C + b"\r\n"


@pytest.mark.parametrize("sent", [None, b"", b"00-bad"])
def test_no_valid_traceparent_no_tracestate(sent: bytes | None) -> None:
    assert upstream_fields("forward", sent, [b"a=1"], None) == (b"", None, None)


def test_the_proxy_s_own_context_replaces_the_client_s_parent() -> None:
    lines, ctx, handle = upstream_fields("forward", W3C, [b"a=1"], _span)
    assert ctx is not None and ctx.trace_id == TID and ctx.parent_id == OWN.parent_id
    assert lines == b"traceparent: " + ctx.value + b"\r\ntracestate: a=1\r\n"
    assert handle == "span"
    # A new trace of the proxy's: the client's tracestate (of an invalid parent) is not its.
    lines, ctx, _ = upstream_fields("forward", b"00-bad", [b"a=1"], _span)
    assert ctx is not None and lines == b"traceparent: " + ctx.value + b"\r\n"


def test_off_reads_nothing_and_forwards_nothing() -> None:
    assert upstream_fields("off", W3C, [b"a=1"], None) == (b"", None, None)
    lines, ctx, handle = upstream_fields("off", W3C, [b"a=1"], _span)
    # A span of the proxy's still exists (a new trace, not the client's), but is not sent.
    assert lines == b"" and ctx is not None and ctx.trace_id == b"1" * 32 and handle == "span"


# -- through the header rewrite --------------------------------------------------------------------
def _head(*headers: tuple[bytes, bytes], **kw: object) -> tuple[list[bytes], object]:
    p = prepare(
        b"GET",
        b"/",
        "1.1",
        [(b"Host", b"svc"), *headers],
        upgrade=False,
        client_ip=b"10.0.0.9",
        block=BLOCK,
        default_host=b"up",
        request_id=b"rid",
        **kw,  # type: ignore[arg-type]
    )
    lines = p.head.split(b"\r\n")
    return [ln for ln in lines if ln.lower().startswith((b"trace", b"x-request-id"))], p.trace


def test_prepare_forwards_a_valid_traceparent_after_the_request_id() -> None:
    lines, trace = _head((b"TraceParent", W3C), (b"tracestate", b"a=1"), (b"Tracestate", b"b=2"))
    assert lines == [b"X-Request-Id: rid", b"traceparent: " + W3C, b"tracestate: a=1,b=2"]
    assert trace == parse(W3C)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"traceparent", W3C), (b"traceparent", W3C)],  # repeated, even with one value
        [(b"traceparent", W3C.upper())],
        [(b"tracestate", b"a=1")],  # no traceparent
        [(b"traceparent", W3C), (b"tracestate", b"a=1"), (b"Connection", b"traceparent")],
    ],
)
def test_prepare_drops_invalid_repeated_or_hop_by_hop_trace_context(
    headers: list[tuple[bytes, bytes]],
) -> None:
    assert _head(*headers) == ([b"X-Request-Id: rid"], None)


def test_a_tracestate_the_connection_header_names_goes_alone() -> None:
    lines, _ = _head((b"traceparent", W3C), (b"tracestate", b"a=1"), (b"Connection", b"tracestate"))
    assert lines == [b"X-Request-Id: rid", b"traceparent: " + W3C]


def test_underscore_spellings_are_not_trace_context() -> None:
    lines, trace = _head((b"trace_parent", W3C), (b"Trace-State", b"a=1"))
    assert lines == [b"Trace-State: a=1", b"X-Request-Id: rid"] and trace is None
    rh = split_request_headers([(b"trace_parent", W3C)])
    assert rh.traceparent is None and rh.underscored == [b"trace_parent"]


def test_prepare_with_a_factory_and_modes() -> None:
    lines, trace = _head((b"traceparent", W3C), make=_span)
    assert trace is not None and lines[1] == b"traceparent: " + trace.value
    assert trace.trace_id == TID and trace.parent_id == OWN.parent_id
    assert _head((b"traceparent", W3C), trace="off") == ([b"X-Request-Id: rid"], None)


def test_http2_requests_take_the_same_path() -> None:
    req = translate(
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/"),
            (b":authority", b"svc"),
            (b"traceparent", W3C),
            (b"tracestate", b"a=1"),
        ],
        True,
    )
    p = prepare(
        req.method,
        req.path,
        "1.1",
        req.raw,
        upgrade=False,
        client_ip=b"1",
        block=BLOCK,
        default_host=b"up",
    )
    assert b"\r\ntraceparent: " + W3C + b"\r\ntracestate: a=1\r\n" in p.head
    assert p.head.count(b"traceparent") == 1
