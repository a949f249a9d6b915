"""PURE. GOAWAY frames taken out of an HTTP/2 peer's byte stream before the library sees them.

python-hyper's h2 moves a connection to CLOSED on a received GOAWAY, and in CLOSED it refuses
every later frame, also the DATA of the streams the GOAWAY lets finish: an upstream's graceful
shutdown (a grpcio server's stop(grace), a max-connection-age) would cut the calls in flight,
and a client's GOAWAY (it opens no more streams) would leave its open streams unanswered. Both
connections read the GOAWAY here instead (h2upstream.py rule 3, h2conn.py rule 6): the library
never learns of it and the streams it lets finish do.

Rules:
1. Frames other than GOAWAY (type 0x7) pass through byte for byte, in order, with any split.
2. A GOAWAY is withheld whole and reported as (last_stream_id, error_code); its debug data is
   dropped.
3. A frame header split across reads is held until complete; nothing else is buffered.
4. On the server side the client preface (24 bytes, not a frame) passes through first.
"""

from __future__ import annotations

from typing import Final

GOAWAY: Final = 0x7


class GoAwayTap:
    """One connection's incoming bytes, with the GOAWAY frames taken out (rules 1-3)."""

    __slots__ = ("_frame", "_head", "_need", "_skip")

    def __init__(self, preface: int = 0) -> None:
        self._head = b""  # a frame header split across reads
        # Bytes to pass through: a passed-through frame's payload, and first the client
        # preface (*preface* bytes, on the server side), which is not a frame.
        self._skip = preface
        self._frame: bytearray | None = None  # a GOAWAY's payload so far
        self._need = 0  # bytes of that payload still to come

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """(the bytes for the library, the GOAWAYs found as (last_stream_id, error_code))."""
        out: list[bytes] = []
        found: list[tuple[int, int]] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                out.append(data[pos : pos + n])
                self._skip -= n
                pos += n
            elif self._frame is not None:
                n = min(self._need, end - pos)
                self._frame += data[pos : pos + n]
                self._need -= n
                pos += n
                if not self._need:
                    found.append(_parse(bytes(self._frame)))
                    self._frame = None
            else:
                need = 9 - len(self._head)
                head = self._head + data[pos : pos + need]
                pos += min(need, end - pos)
                if len(head) < 9:
                    self._head = head
                    break
                self._head = b""
                length = int.from_bytes(head[:3], "big")
                if head[3] == GOAWAY:
                    self._frame, self._need = bytearray(), length
                    if not length:
                        found.append(_parse(b""))
                        self._frame = None
                else:
                    out.append(head)
                    self._skip = length
        return b"".join(out), found


def _parse(payload: bytes) -> tuple[int, int]:
    """(last_stream_id, error_code); a payload too short for them says 0, PROTOCOL_ERROR."""
    if len(payload) < 8:
        return 0, 0x1
    last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
    return last, int.from_bytes(payload[4:8], "big")
