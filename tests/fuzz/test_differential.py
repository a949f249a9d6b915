"""INT-070: the differential fuzz test: generated streams through the proxy to each upstream
(oracle.py); its counterexamples are replayed in test_regressions.py."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings

from tests.fuzz.oracle import Target, check
from tests.fuzz.profiles import FUZZ, TIMEOUT_S
from tests.fuzz.streams import Stream, streams


@pytest.mark.timeout(TIMEOUT_S)
@settings(FUZZ)
@given(stream=streams())
def test_upstream_acts_only_on_what_the_proxy_logged_and_checked(
    target: Target, stream: Stream
) -> None:
    o = check(target, stream)
    # What the run exercised (--hypothesis-show-statistics): how much reached the upstream.
    event(f"requests forwarded: {min(len(o.acted) - 1, 3)}")
    event(f"client: {o.ended}")
    for status in {r["status"] for r in o.records if r["path"] != o.sentinel}:
        event(f"proxy answered {status}")
