"""PURE. A small, strict RFC 9112 request parser: the reference upstream of the differential fuzzer.

Sans-I/O (h11's shape): ``StrictParser.feed(bytes)`` returns the requests completed so far and
raises ``Reject`` for anything a careful server should refuse rather than guess about.

Rules:
1. Lines end in CRLF only: a bare LF or a bare CR anywhere in a head or chunk framing is refused.
2. request-line = token SP origin-or-absolute-target SP ``HTTP/1.1`` | ``HTTP/1.0``; nothing before
   it (no leading empty lines) and nothing after the version.
3. field-line = token ":" OWS value OWS; no whitespace before the colon, no obs-fold, no control
   bytes in values.
4. Framing is unambiguous or refused: HTTP/1.1 needs exactly one Host; Content-Length is 1*DIGIT
   and appears at most once; Content-Length with Transfer-Encoding is refused; Transfer-Encoding
   must be exactly ``chunked`` (this server implements no other coding) and never on HTTP/1.0.
5. chunk = 1*16HEXDIG *(";" token ["=" (token / quoted-string)]) CRLF data CRLF; trailer field
   lines obey rule 3.
6. Connections persist (HTTP/1.1) and requests may be pipelined; ``Connection: close`` or
   HTTP/1.0 ends the connection after that request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_TOKEN: Final = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) (HTTP/1\.[01])")
_FIELD: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:;"
    + _TOKEN
    + rb"(?:=(?:"
    + _TOKEN
    + rb'|"(?:[^"\\\x00-\x1f\x7f]|\\.)*"))?)*)'
)
MAX_HEAD: Final = 64 * 1024


class Reject(ValueError):
    """The request is refused (the server answers 400 and closes)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """One request as this server parsed it."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body_len: int
    close: bool


def _check_crlf(region: bytes, final: bool) -> None:
    """Rule 1 over *region*; a CR as the very last byte may still get its LF unless *final*."""
    for m in re.finditer(rb"\r(?!\n)|(?<!\r)\n", region):
        if m.group() == b"\r" and m.start() == len(region) - 1 and not final:
            continue
        raise Reject("bare CR or LF")


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise Reject("obs-fold")
        m = _FIELD.fullmatch(line)
        if m is None:
            raise Reject(f"bad field line {line[:60]!r}")
        out.append((m.group(1).decode().lower(), m.group(2).decode("latin-1")))
    return out


class StrictParser:
    """Parses requests off one connection (rules 1-6)."""

    def __init__(self) -> None:
        self._buf = b""
        self.closed = False

    def feed(self, data: bytes) -> list[Parsed]:
        """Add *data*; return every request now complete. Raise Reject on the first bad byte."""
        if self.closed:
            return []
        self._buf += data
        out: list[Parsed] = []
        while not self.closed:
            req = self._one()
            if req is None:
                break
            out.append(req)
            self.closed = req.close
        return out

    def _one(self) -> Parsed | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        _check_crlf(buf if end < 0 else buf[: end + 4], final=end >= 0)
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise Reject("head too large")
            return None
        lines = buf[:end].split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise Reject(f"bad request-line {lines[0][:80]!r}")
        method, target, version = (g.decode("latin-1") for g in m.groups())
        headers = _fields(lines[1:])
        values: dict[str, list[str]] = {}
        for name, value in headers:
            values.setdefault(name, []).append(value)
        hosts = values.get("host", [])
        if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
            raise Reject("Host missing or repeated")
        cl, te = values.get("content-length", []), values.get("transfer-encoding", [])
        if cl and te:
            raise Reject("Content-Length with Transfer-Encoding")
        if len(cl) > 1 or (cl and not re.fullmatch(r"[0-9]{1,15}", cl[0])):
            raise Reject(f"bad Content-Length {cl}")
        tokens = {t.strip().lower() for v in values.get("connection", []) for t in v.split(",")}
        close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
        rest = buf[end + 4 :]
        if te:
            if version == "HTTP/1.0" or ",".join(te).strip().lower() != "chunked":
                raise Reject(f"Transfer-Encoding {te}")
            done = _chunked(rest)
            if done is None:
                return None
            body_len, used = done
        else:
            body_len = int(cl[0]) if cl else 0
            if len(rest) < body_len:
                return None
            used = body_len
        self._buf = rest[used:]
        return Parsed(method, target, version, tuple(headers), body_len, close)


def _chunked(data: bytes) -> tuple[int, int] | None:
    """(decoded length, bytes used) of a complete chunked body at the start of *data*, or None."""
    pos = total = 0
    while True:
        eol = data.find(b"\r\n", pos)
        _check_crlf(data[pos:] if eol < 0 else data[pos : eol + 2], final=eol >= 0)
        if eol < 0:
            return None
        m = _CHUNK_LINE.fullmatch(data[pos:eol])
        if m is None:
            raise Reject(f"bad chunk line {data[pos:eol][:40]!r}")
        size = int(m.group(1), 16)
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            if len(data) > pos + size and data[pos + size : pos + size + 1] != b"\r":
                raise Reject("chunk data not followed by CRLF")
            return None
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Reject("chunk data not followed by CRLF")
        total += size
        pos += size + 2
    # The trailer section: field lines, then an empty line.
    while True:
        eol = data.find(b"\r\n", pos)
        _check_crlf(data[pos:] if eol < 0 else data[pos : eol + 2], final=eol >= 0)
        if eol < 0:
            return None
        line = data[pos:eol]
        pos = eol + 2
        if not line:
            return total, pos
        _fields([line])
