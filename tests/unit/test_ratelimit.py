"""The handshake-failure log limiter: 10 records a second, the rest counted and reported."""

from __future__ import annotations

from mtls_proxy.telemetry.logs import RateLimiter


def test_limits_per_second_and_reports_what_it_held_back() -> None:
    rl = RateLimiter(3)
    assert [rl.allow(100.1), rl.allow(100.2), rl.allow(100.3)] == [0, 0, 0]
    assert rl.allow(100.4) is None and rl.allow(100.9) is None
    assert rl.suppressed == 2
    assert rl.allow(101.0) == 2  # the next second's first record carries the count
    assert rl.allow(101.5) == 0
