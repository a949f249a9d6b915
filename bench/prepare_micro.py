"""The header path alone: request.prepare (validation, the header rewrite, the upstream head)
for a typical request, without and with W3C trace context headers; best of 7 rounds.

    python bench/prepare_micro.py [N]
"""

from __future__ import annotations

import sys
import time

from mtls_proxy.core.headers import identity_block
from mtls_proxy.http1.request import prepare

BLOCK = identity_block(None, ("xfcc", "simple"), "sanitize_set", None)
BASE = [
    (b"Host", b"api.internal"),
    (b"User-Agent", b"curl/8.5.0"),
    (b"Accept", b"*/*"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"12"),
]
TRACED = [
    *BASE,
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    (b"tracestate", b"congo=t61rcWkgMzE"),
]


def best(raw: list[tuple[bytes, bytes]], n: int) -> float:
    """The fastest of 7 rounds of *n* calls, in ns per call."""
    out = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            prepare(
                b"POST", b"/v1/orders", "1.1", raw, upgrade=False, client_ip=b"10.0.0.7",
                block=BLOCK, default_host=b"x", port=b"8443", request_id=b"abcd",
            )  # fmt: skip
        out = min(out, (time.perf_counter() - t0) / n)
    return out * 1e9


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    print(f"prepare, no trace context: {best(BASE, count):.0f} ns")
    print(f"prepare, traceparent + tracestate: {best(TRACED, count):.0f} ns")
