"""http2/guard.py: frame budgets counted from real frames (hyperframe, as a client sends them),
fed whole, split at every byte, and one byte at a time."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mtls_proxy.http2 import guard
from mtls_proxy.http2.guard import PREFACE, FrameGuard


def _wire(*frames: Frame) -> bytes:
    return PREFACE + b"".join(f.serialize() for f in frames)


def _headers(sid: int, size: int, end_headers: bool) -> HeadersFrame:
    f = HeadersFrame(sid, b"x" * size)
    if end_headers:
        f.flags.add("END_HEADERS")
    return f


def _cont(sid: int, size: int, end_headers: bool) -> ContinuationFrame:
    f = ContinuationFrame(sid, b"y" * size)
    if end_headers:
        f.flags.add("END_HEADERS")
    return f


def _feed_all_ways(data: bytes, make: type[FrameGuard] = FrameGuard, **kw: int) -> set[str | None]:
    """The verdict fed whole, in two pieces at every split, and byte by byte: always the same."""
    args = {"max_header_block": 1000, "reset_budget": 5, **kw}
    whole = make(**args).feed(data, 1.0)
    seen = {whole}
    for cut in range(0, len(data) + 1, max(1, len(data) // 40)):
        g = make(**args)
        seen.add(g.feed(data[:cut], 1.0) or g.feed(data[cut:], 1.0))
    g = make(**args)
    seen.add(next((r for b in data if (r := g.feed(bytes((b,)), 1.0))), None))
    return seen


def test_ordinary_traffic_passes() -> None:
    frames = [SettingsFrame(0), _headers(1, 200, True), DataFrame(1, b"d" * 5000)]
    frames += [WindowUpdateFrame(0, 100), PingFrame(0), _headers(3, 900, False)]
    frames += [_cont(3, 100, True), RstStreamFrame(3)]
    assert _feed_all_ways(_wire(*frames)) == {None}


def test_continuation_flood_is_cut_before_the_block_ends() -> None:
    frames = [_headers(1, 600, False), _cont(1, 300, False), _cont(1, 200, False)]
    assert _feed_all_ways(_wire(*frames)) == {"header_block"}


def test_a_single_oversized_headers_frame() -> None:
    assert _feed_all_ways(_wire(_headers(1, 1001, True))) == {"header_block"}


def test_blocks_are_counted_each_on_its_own() -> None:
    frames = [_headers(1, 900, False), _cont(1, 100, True), _headers(3, 1000, True)]
    assert _feed_all_ways(_wire(*frames)) == {None}
    # A CONTINUATION with no open block (h2 refuses it): counted as a block of its own.
    assert _feed_all_ways(_wire(_cont(1, 1000, True))) == {None}


def test_rapid_reset_budget() -> None:
    frames: list[Frame] = []
    for sid in range(1, 13, 2):  # 6 streams opened and reset at once: budget 5
        frames += [_headers(sid, 10, True), RstStreamFrame(sid)]
    assert _feed_all_ways(_wire(*frames)) == {"reset_budget"}
    assert _feed_all_ways(_wire(*frames[:-2])) == {None}


def test_proxy_resets_share_the_budget_and_the_window_slides() -> None:
    g = FrameGuard(1000, 2)
    assert g.feed(_wire(RstStreamFrame(1)), 10.0) is None
    assert g.reset(10.5) is None
    assert g.reset(10.9) == "reset_budget"  # one client reset + two of the proxy's
    assert g.reset(11.0) == "reset_budget"  # the previous second still counts whole
    assert g.reset(13.5) is None  # two seconds on: nothing of 11.x is left in the window
    assert g.reset(13.6) is None
    assert g.feed(RstStreamFrame(3).serialize(), 13.7) == "reset_budget"


def test_a_burst_across_a_second_boundary_counts_whole() -> None:
    """Budget 50: 30 resets at x.92 and 30 at (x+1).05 are 60 within 130 ms."""
    g = FrameGuard(1000, 50)
    assert g.feed(PREFACE + RstStreamFrame(1).serialize() * 30, 7.92) is None
    assert g.feed(RstStreamFrame(1).serialize() * 30, 8.05) == "reset_budget"
    quiet = FrameGuard(1000, 50)  # the same 60 spread over two seconds pass
    assert quiet.feed(PREFACE + RstStreamFrame(1).serialize() * 30, 7.1) is None
    assert quiet.feed(RstStreamFrame(1).serialize() * 30, 8.95) is None


@pytest.mark.parametrize(
    ("frame", "budget"),
    [
        (PingFrame(0), guard.CONTROL_BUDGET),
        (SettingsFrame(0), guard.CONTROL_BUDGET),
        (PriorityFrame(1), guard.CONTROL_BUDGET),
        (WindowUpdateFrame(0, 1), guard.WINDOW_UPDATE_BUDGET),
        (DataFrame(1, b""), guard.EMPTY_DATA_BUDGET),
    ],
)
def test_floods(frame: Frame, budget: int) -> None:
    one = frame.serialize()
    g = FrameGuard(1000, 5)
    assert g.feed(PREFACE + one * budget, 1.0) is None
    assert g.feed(one, 1.5) in ("flood",)
    g2 = FrameGuard(1000, 5)
    assert g2.feed(PREFACE + one * budget, 1.0) is None
    assert g2.feed(one, 2.0) == "flood"  # 1.0 .. 2.0 is one second: budget + 1
    assert g2.feed(one, 2.5) is None  # half of 1.x is left in the window


def test_empty_data_ending_the_stream_is_not_a_flood() -> None:
    end = DataFrame(1, b"")
    end.flags.add("END_STREAM")
    g = FrameGuard(1000, 5)
    assert g.feed(PREFACE + end.serialize() * (guard.EMPTY_DATA_BUDGET + 5), 1.0) is None


def test_payloads_are_skipped_not_parsed() -> None:
    """A DATA payload that looks like frame headers is never read as frames."""
    fake = RstStreamFrame(1).serialize() * 20
    assert _feed_all_ways(_wire(DataFrame(1, fake))) == {None}
