"""http2/goaway.py: GOAWAY frames taken out of a real frame stream, fed whole, split at every
byte and byte by byte; every other byte passes through unchanged."""

from __future__ import annotations

from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from mtls_proxy.http2.goaway import GoAwayTap


def _goaway(last: int, code: int, debug: bytes = b"") -> GoAwayFrame:
    f = GoAwayFrame(0, additional_data=debug)
    f.last_stream_id, f.error_code = last, code
    return f


OTHER = [SettingsFrame(0), HeadersFrame(1, b"h" * 30), DataFrame(1, b"d" * 5000), PingFrame(0)]
WIRE = b"".join(f.serialize() for f in OTHER[:2])
WIRE += _goaway(5, 0, b"shutting down").serialize()
WIRE += b"".join(f.serialize() for f in OTHER[2:]) + _goaway(3, 2).serialize()
EXPECTED = b"".join(f.serialize() for f in OTHER)


def _run(pieces: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    tap = GoAwayTap()
    out, found = b"", []
    for piece in pieces:
        o, f = tap.feed(piece)
        out += o
        found += f
    return out, found


def test_whole_split_and_byte_by_byte() -> None:
    want = (EXPECTED, [(5, 0), (3, 2)])
    assert _run([WIRE]) == want
    for cut in range(len(WIRE) + 1):
        assert _run([WIRE[:cut], WIRE[cut:]]) == want
    assert _run([bytes((b,)) for b in WIRE]) == want


def test_a_goaway_payload_that_looks_like_frames_is_not_passed() -> None:
    tricky = _goaway(1, 0, SettingsFrame(0).serialize() * 3).serialize()
    assert _run([tricky]) == (b"", [(1, 0)])


def test_malformed_goaway_payloads() -> None:
    empty = b"\x00\x00\x00\x07\x00\x00\x00\x00\x00"  # length 0
    short = b"\x00\x00\x03\x07\x00\x00\x00\x00\x00abc"
    assert _run([empty + short]) == (b"", [(0, 1), (0, 1)])
    high = _goaway(0x7FFFFFFF, 0).serialize()
    assert _run([high]) == (b"", [(0x7FFFFFFF, 0)])
