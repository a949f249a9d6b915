"""The security catalogue's rig (docs/security.md, How the cases are run): one proxy per module
in front of a recording upstream, raw TLS clients, and the canonical-form check of every
forwarded request."""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.helpers import (
    Pki,
    Proxy,
    Seen,
    Upstream,
    client_ctx,
    run_proxy,
    run_upstream,
    send_and_read,
)

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "proxy-authorization",
}
IDENTITY = (
    "x-forwarded-client-cert",
    "x-client-subject",
    "x-client-cert-sha256",
    "x-client-verified",
)
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def assert_canon(seen: Seen, *, identity: bool = True) -> None:
    """docs/security.md, canonical form: what the upstream received is one well-framed,
    canonical request."""
    assert seen.target.startswith("/") or seen.target == "*", seen.target
    assert len(seen.get("host")) == 1
    names = [k for k, _ in seen.headers]
    assert not ("content-length" in names and "transfer-encoding" in names), names
    assert seen.get("transfer-encoding") in ([], ["chunked"])
    assert len(seen.get("content-length")) <= 1
    assert not HOP_BY_HOP & set(names), names
    for k, v in seen.headers:
        assert not _CTL.search(v), (k, v)
    if identity:
        for name in IDENTITY:
            assert len(seen.get(name)) == 1, (name, seen.get(name))
    for variant in ("x_client_subject", "x-client-subject "):
        assert variant not in names


@dataclass
class Rig:
    """The proxy, its upstream, and clients."""

    tp: Pki
    proxy: Proxy
    upstream: Upstream

    @property
    def port(self) -> int:
        return self.proxy.port

    def good(self) -> ssl.SSLContext:
        return client_ctx(self.tp, "good")

    def exchange(self, payload: bytes, timeout: float = 5, per_byte: bool = False) -> bytes:
        """Send exact bytes over mTLS with the good client; read until close or timeout.
        *per_byte*: one TLS record per byte (SMG-066)."""
        return send_and_read(self.port, self.good(), payload, timeout, per_byte)

    def new_requests(self, before: int) -> list[Seen]:
        """Requests the upstream parsed since *before* (waits briefly for stragglers)."""
        time.sleep(0.05)
        return self.upstream.seen[before:]


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[Upstream]:
    with run_upstream() as up:
        yield up


@pytest.fixture(scope="module")
def rig(tp: Pki, module_upstream: Upstream) -> Iterator[Rig]:
    with run_proxy(
        tp,
        f"http://127.0.0.1:{module_upstream.port}",
        "--header-timeout",
        "2",
        "--body-timeout",
        "2",
    ) as p:
        yield Rig(tp, p, module_upstream)
