"""PURE. The HTTP/2 attack classes a frame parser lets through, counted from the client's bytes
before h2 parses them: only the 9-byte frame headers are read, never a payload.

h2 (the library) decodes a header block only once its last CONTINUATION arrives, and answers
PING and SETTINGS by queueing frames; RFC 9113 gives a client no limit on either. What an attacker
gains from that is named by CVE: CONTINUATION floods (CVE-2024-27316 family), Rapid Reset
(CVE-2023-44487), MadeYouReset (CVE-2025-8671), control-frame and empty-frame floods
(CVE-2019-9512/9515/9518). Each is a budget here; over one, the connection ends with
GOAWAY(ENHANCE_YOUR_CALM), as Envoy, nginx and HAProxy do.

Rules:
1. A header block (HEADERS and its CONTINUATIONs) may carry at most `max_header_block` raw
   bytes, counted as the frames arrive, so an endless block is cut before it is decoded.
2. Stream resets, the client's RST_STREAM frames plus the streams the proxy resets because of the
   client (`reset()`), are at most `reset_budget` in any one-second window, estimated as the
   current second's count plus the previous second's weighted by how much of it the window
   still covers (a burst across a second boundary counts whole).
3. PING, SETTINGS and PRIORITY frames (each costs an answer or a state change, none carries a
   request) are at most CONTROL_BUDGET per second; WINDOW_UPDATE at most WINDOW_UPDATE_BUDGET;
   DATA frames with no payload and no END_STREAM at most EMPTY_DATA_BUDGET; each over any
   one-second window, estimated as in rule 2.
4. Frame lengths are the frame's own; a length over the 16,384-byte maximum frame size we
   announce is h2's to refuse (a FRAME_SIZE_ERROR); the guard only skips the payload.
"""

from __future__ import annotations

from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PING, WINDOW_UPDATE, CONTINUATION = 0x6, 0x8, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4
CONTROL_BUDGET: Final = 1000
WINDOW_UPDATE_BUDGET: Final = 10000
EMPTY_DATA_BUDGET: Final = 100
_CONTROL: Final = frozenset((PING, SETTINGS, PRIORITY))
_RESETS, _CONTROLS, _UPDATES, _EMPTY = 0, 1, 2, 3  # the budgets' counters


class FrameGuard:
    """One client connection's frame budgets (rules 1-3)."""

    __slots__ = (
        "_block",
        "_count",
        "_head",
        "_now",
        "_preface",
        "_prev",
        "_second",
        "_skip",
        "max_header_block",
        "reset_budget",
    )

    def __init__(self, max_header_block: int, reset_budget: int) -> None:
        self.max_header_block = max_header_block
        self.reset_budget = reset_budget
        self._preface = len(PREFACE)  # bytes of the client preface still to pass over
        self._head = b""  # a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to pass over
        self._block = -1  # raw bytes of the open header block; -1 = none open
        self._second = -1
        self._now = 0.0
        # Per budget (resets, control, window updates, empty DATA): this second's count and
        # the previous second's (rule 2's estimate).
        self._count = [0, 0, 0, 0]
        self._prev = [0, 0, 0, 0]

    def feed(self, data: bytes, now: float) -> str | None:
        """Count the frames in *data* (any split); the budget it exceeds, or None."""
        self._tick(now)
        pos, end = 0, len(data)
        if self._preface:
            n = min(self._preface, end)
            self._preface -= n
            pos = n
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                continue
            need = 9 - len(self._head)
            head = self._head + data[pos : pos + need]
            pos += min(need, end - pos)
            if len(head) < 9:
                self._head = head
                return None
            self._head = b""
            over = self._frame(head)
            if over is not None:
                return over
        return None

    def reset(self, now: float) -> str | None:
        """The proxy reset a stream because of the client (rule 2): over budget, or None."""
        self._tick(now)
        return "reset_budget" if self._over(_RESETS, self.reset_budget) else None

    def _tick(self, now: float) -> None:
        self._now = now
        second = int(now)
        if second != self._second:
            gap = second - self._second
            self._prev = self._count if gap == 1 else [0, 0, 0, 0]
            self._count = [0, 0, 0, 0]
            self._second = second

    def _over(self, kind: int, budget: int) -> bool:
        """Count one event of *kind*; whether the one-second estimate passes *budget*."""
        self._count[kind] += 1
        weight = 1.0 - (self._now - self._second)  # the previous second's share of the window
        return self._count[kind] + self._prev[kind] * weight > budget

    def _frame(self, head: bytes) -> str | None:
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        self._skip = length
        if kind in (HEADERS, CONTINUATION):
            self._block = (0 if kind == HEADERS or self._block < 0 else self._block) + length
            if self._block > self.max_header_block:
                return "header_block"
            if flags & END_HEADERS:
                self._block = -1
        elif kind == RST_STREAM:
            if self._over(_RESETS, self.reset_budget):
                return "reset_budget"
        elif kind in _CONTROL:
            if self._over(_CONTROLS, CONTROL_BUDGET):
                return "flood"
        elif kind == WINDOW_UPDATE:
            if self._over(_UPDATES, WINDOW_UPDATE_BUDGET):
                return "flood"
        elif (
            kind == DATA
            and not length
            and not flags & END_STREAM
            and self._over(_EMPTY, EMPTY_DATA_BUDGET)
        ):
            return "flood"
        return None
