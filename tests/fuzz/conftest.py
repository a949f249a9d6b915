"""The fuzz targets: each upstream kind behind its own proxy, started once for tests/fuzz.

The proxy runs with a routed policy: ``/admin`` is for another client only, ``/public`` and the
rest are allowed to the fuzzing client ("good"), and every identity-header dialect is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fuzz.oracle import Target, exact_name, norm, run
from tests.fuzz.streams import Stream
from tests.fuzz.upstreams import (
    AiohttpUpstream,
    Recorder,
    StrictUpstream,
    h11_upstream,
    tomcat_missing,
    tomcat_upstream,
)
from tests.helpers import ALLOWED_URI, Pki, client_ctx, run_proxy

KINDS = ["strict", "h11", "aiohttp", "tomcat"]
POLICY = f"""
allow:
  - uri: {ALLOWED_URI}
routes:
  - path_prefix: /admin
    allow:
      - cn: client-other
  - path_prefix: /public
    allow:
      - uri: {ALLOWED_URI}
"""
DIALECTS = "xfcc,simple,rfc9440,tomcat,traefik"
CLEAN = Stream((b"GET /__baseline HTTP/1.1\r\nHost: localhost\r\n\r\n",), (False,))


@contextlib.contextmanager
def _upstream(
    kind: str, tmp: pytest.TempPathFactory
) -> Iterator[tuple[Recorder, Callable[[], list[str]]]]:
    if kind == "strict":
        strict = StrictUpstream()
        try:
            yield strict, lambda: list(strict.rejects)
        finally:
            strict.close()
    elif kind == "h11":
        with h11_upstream() as h11:
            # h11 also reports a body cut short when the proxy drops an upstream connection
            # whose client left (the fuzzer's client gives up on idle streams): not a finding.
            yield h11, lambda: [e for e in h11.errors if "peer closed connection" not in e]
    elif kind == "aiohttp":
        aio = AiohttpUpstream()
        try:
            yield aio, list
        finally:
            aio.close()
    else:
        reason = tomcat_missing()
        if reason:
            pytest.skip(reason)
        with tomcat_upstream(Path(tmp.mktemp("tomcat"))) as tomcat:
            yield tomcat, list


@pytest.fixture(scope="package", params=KINDS)
def target(
    request: pytest.FixtureRequest, tp: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    kind = str(request.param)
    policy = tmp_path_factory.mktemp("fuzz-policy") / "policy.yaml"
    policy.write_text(POLICY)
    with (
        _upstream(kind, tmp_path_factory) as (up, errors),
        run_proxy(
            tp,
            f"http://127.0.0.1:{up.port}",
            "--policy",
            str(policy),
            "--identity-headers",
            DIALECTS,
            default_policy=False,
        ) as proxy,
    ):
        t = Target(kind, proxy, up, client_ctx(tp, "good"), errors)
        for _ in range(20 if kind == "tomcat" else 2):  # warm up (Tomcat's JIT)
            run(t, CLEAN)
        o = run(t, CLEAN)
        assert [a.target for a in o.acted] == ["/__baseline", o.sentinel], o
        t.baseline = tuple((norm(k), v) for k, v in o.acted[0].headers if exact_name(k))
        yield t
