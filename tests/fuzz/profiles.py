"""Hypothesis profiles of the fuzzer: ``ci`` (the default: the suite's run, about a minute for all
upstreams together) and ``long`` (one round of scripts/fuzz, which repeats rounds for a set
time); MTLS_FUZZ_PROFILE picks one."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,  # an example is a TLS connection or two through a subprocess: never flaky
    max_examples=200,
    derandomize=False,  # every CI run explores new streams; failures print a replay blob
    print_blob=True,
    report_multiple_bugs=False,  # one minimal counterexample, not a pile of half-shrunk ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", settings.get_profile("ci"), max_examples=600)
PROFILE = os.environ.get("MTLS_FUZZ_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE)
# pytest-timeout (120 s per test in pyproject) would cut a shrinking run or a long round short.
TIMEOUT_S = 0 if PROFILE == "long" else 600
