"""PURE. W3C Trace Context (``traceparent``, ``tracestate``): what a client sent, checked, and
the fields the upstream gets.

Rules:
1. A traceparent counts only when the client sent exactly one field line of it and its value
   (spaces and tabs around it trimmed, RFC 9110 section 5.5) is W3C Trace Context's: version
   ``00`` is exactly ``00-<trace-id>-<parent-id>-<flags>``, 32, 16 and 2 lower-case hex digits,
   the trace-id and the parent-id not all zero. A later version (``01``..``fe``) is read by
   the same first 55 characters, followed by the end of the value or ``-`` and more (the
   spec's forward compatibility); version ``ff`` is invalid.
2. An invalid or repeated traceparent is dropped, and every tracestate with it: a tracestate
   means something only beside the traceparent it came with (W3C section 3.3).
3. A valid one is forwarded as received, with its tracestate lines as one list joined by ','
   (RFC 9110 section 5.3); the proxy adds no tracestate member of its own.
4. When the proxy has a context of its own for the request (its span, or one it created), the
   upstream gets that one instead: version 00, the client's trace-id when the client's
   traceparent was valid, the proxy's span id as the parent-id; the client's tracestate still
   goes with it when the trace is the client's.
5. ``--trace-context off``: a client's fields are neither read nor forwarded, and none is made
   up for the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Literal, NamedTuple

TraceMode = Literal["off", "forward", "create"]
TRACE_MODES: Final[tuple[str, ...]] = ("off", "forward", "create")

# Rule 1 but version 00's length: not version ff, ids not all zero, a later version's rest.
_TRACEPARENT: Final = re.compile(
    rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-[!-~]*)?"
)


class TraceParent(NamedTuple):
    """A valid traceparent, as forwarded; its fields (lower-case hex) are at fixed offsets in
    every version. A one-field tuple: one is made for every request that carries a
    traceparent, so making it must cost next to nothing."""

    value: bytes

    @property
    def trace_id(self) -> bytes:
        """32 hex digits, not all zero."""
        return self.value[3:35]

    @property
    def parent_id(self) -> bytes:
        """16 hex digits, not all zero: the caller's span."""
        return self.value[36:52]

    @property
    def flags(self) -> bytes:
        """2 hex digits."""
        return self.value[53:55]

    @property
    def sampled(self) -> bool:
        """The sampled flag: the caller may have recorded trace data."""
        return bool(int(self.value[53:55], 16) & 1)


# What the data plane hands prepare to give the request a context of its own (rule 4): called
# with the client's valid traceparent (or None), it returns the context the upstream gets (or
# None: the client's as received, when there is one) and a handle for the caller (a span).
ChildFactory = Callable[[TraceParent | None], tuple[TraceParent | None, object]]


def parse(value: bytes) -> TraceParent | None:
    """*value* as a traceparent (rule 1), or None when it is not a valid one."""
    if _TRACEPARENT.fullmatch(value) is None:
        value = value.strip(b" \t")  # RFC 9110: whitespace around a value is not part of it
        if _TRACEPARENT.fullmatch(value) is None:
            return None
    if len(value) != 55 and value.startswith(b"00"):
        return None  # a version-00 value is exactly 55 bytes; a later one may be longer
    return TraceParent(value)


def child(trace_id: bytes, span_id: bytes, sampled: bool) -> TraceParent:
    """The version-00 traceparent of a context of the proxy's (rule 4); *trace_id* and
    *span_id* are 32 and 16 lower-case hex digits, not all zero."""
    return TraceParent(b"00-%s-%s-%s" % (trace_id, span_id, b"01" if sampled else b"00"))


def upstream_fields(
    mode: TraceMode,
    sent: bytes | None,
    states: list[bytes] | None,
    make: ChildFactory | None,
) -> tuple[bytes, TraceParent | None, object]:
    """(the trace context lines the upstream gets, the context they carry, *make*'s handle).

    *sent* is the client's traceparent when it sent exactly one (b"" for several: invalid),
    *states* its tracestate values."""
    parent = parse(sent) if sent and mode != "off" else None
    own, handle = (None, None) if make is None else make(parent)
    context = own or parent
    if context is None or mode == "off":
        return b"", context, handle  # rule 2, rule 5 (a span of the proxy's is still one)
    if parent is not None and states:
        lines = b"traceparent: %s\r\ntracestate: %s\r\n" % (context.value, b",".join(states))
    else:
        lines = b"traceparent: " + context.value + b"\r\n"
    return lines, context, handle
