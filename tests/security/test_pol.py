"""docs/security.md, POL: the allow-list (POL-001 .. POL-013). POL-010 (policy reload on an open
connection) is in tests/integration/test_operations.py, POL-013 (CA removed) in
tests/integration/test_reload.py."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from mtls_proxy.cli import pki
from tests.helpers import Pki, Proxy, Upstream, connect, read_response, run_proxy, run_upstream
from tests.security import certs as c

BASE = "spiffe://test.local/ns/default/sa/client"
POLICY = f"""
allow:
  - uri: {BASE}
  - uri: spiffe://test.local/ns/*/sa/wild
  - cn: allowed-client
  - cn: admin
  - dns: allowed.test
"""


def uri(*values: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(v) for v in values]


def cn(*values: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, v) for v in values])


@dataclass
class PolRig:
    tp: Pki
    d: Path
    proxy: Proxy
    upstream: Upstream
    policy: Path

    def ctx(self, label: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.tp.ca)
        ctx.load_cert_chain(self.d / f"{label}.crt", self.d / f"{label}.key")
        return ctx

    def status(self, label: str) -> int:
        with connect(self.proxy.port, self.ctx(label)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            return read_response(s, bytearray())[0]


FIXTURES: dict[str, tuple[x509.Name, list[x509.GeneralName]]] = {
    "good": (cn("client"), uri(BASE)),
    "other": (cn("client"), uri("spiffe://test.local/ns/default/sa/other")),
    "upper": (cn("client"), uri("SPIFFE://TEST.LOCAL/ns/default/sa/client")),
    "upper_sa": (cn("client"), uri("spiffe://test.local/ns/default/sa/CLIENT")),
    "evil_suffix": (cn("client"), uri(BASE + "-evil")),
    "slash": (cn("client"), uri(BASE + "/")),
    "dotdot": (cn("client"), uri(BASE + "/../admin")),
    "enc": (cn("client"), uri(BASE + "%2F..")),
    "query": (cn("client"), uri(BASE + "?x")),
    "fragment": (cn("client"), uri(BASE + "#x")),
    "wild_one": (cn("client"), uri("spiffe://test.local/ns/a/sa/wild")),
    "wild_two": (cn("client"), uri("spiffe://test.local/ns/a/b/sa/wild")),
    "evilclient": (cn("evilallowed-client"), []),
    "trailing_space": (cn("allowed-client "), []),
    "nul_cn": (cn("admin\x00.evil"), []),
    "two_uris": (cn("client"), uri("spiffe://test.local/ns/default/sa/other", BASE)),
    "two_cns": (cn("allowed-client", "admin"), []),
    "nul_dns": (
        cn("client"),
        [x509.DNSName._init_without_validation("allowed.test\x00.evil.test")],  # type: ignore[attr-defined]
    ),
    "cn_spiffe": (cn(BASE), []),
}


@pytest.fixture(scope="module")
def prig(tp: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolRig]:
    d = tmp_path_factory.mktemp("pol")
    issuer = pki.load_issuer(tp.dir)
    inter = c.Cert(issuer.cert, issuer.key)
    for label, (subject, sans) in FIXTURES.items():
        c.write(d, label, c.leaf(inter, subject, sans=sans, chain=[inter]))  # type: ignore[arg-type]
    policy = d / "policy.yaml"
    policy.write_text(POLICY)
    with (
        run_upstream() as up,
        run_proxy(
            tp, f"http://127.0.0.1:{up.port}", "--policy", str(policy), default_policy=False
        ) as p,
    ):
        yield PolRig(tp, d, p, up, policy)


CASES = [
    ("POL-001", "good", 200),
    ("POL-002", "other", 403),
    ("POL-003 scheme/host case", "upper", 403),
    ("POL-003 path case", "upper_sa", 403),
    *(
        (f"POL-004 {label}", label, 403)
        for label in ("evil_suffix", "slash", "dotdot", "enc", "query", "fragment")
    ),
    ("POL-005 one segment", "wild_one", 200),
    ("POL-005 two segments", "wild_two", 403),
    ("POL-006 substring", "evilclient", 403),
    ("POL-006 trailing space", "trailing_space", 403),
    ("POL-006 NUL in CN", "nul_cn", 403),
    ("POL-007 any URI SAN", "two_uris", 200),
    ("POL-008 two CNs", "two_cns", 403),
    ("POL-009 NUL in DNS SAN", "nul_dns", 403),
    ("HDR-013/POL CN that looks like a SPIFFE ID", "cn_spiffe", 403),
]


@pytest.mark.parametrize(("label", "status"), [x[1:] for x in CASES], ids=[x[0] for x in CASES])
def test_allow_list(prig: PolRig, label: str, status: int) -> None:
    before = len(prig.upstream.seen)
    assert prig.status(label) == status
    assert len(prig.upstream.seen) == before + (1 if status == 200 else 0)


def test_pol011_resumed_session_of_a_now_denied_identity_gets_403(prig: PolRig) -> None:
    ctx = prig.ctx("wild_one")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection(("127.0.0.1", prig.proxy.port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert read_response(s, bytearray())[0] == 200
        session = s.session
    prig.policy.write_text(POLICY.replace("  - uri: spiffe://test.local/ns/*/sa/wild\n", ""))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "success" not in _reloads(prig.proxy):
            time.sleep(0.1)
        raw = socket.create_connection(("127.0.0.1", prig.proxy.port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_response(s, bytearray())[0] == 403
            assert s.session_reused  # a policy reload keeps TLS sessions; the policy still applies
    finally:
        prig.policy.write_text(POLICY)


def _reloads(p: Proxy) -> str:
    text = p.admin_get("/metrics")[1]
    return "success" if 'mtls_proxy_reloads_total{result="success"} 0.0' not in text else ""


def test_pol012_denied_client_with_expect_gets_403_and_no_100(prig: PolRig) -> None:
    before = len(prig.upstream.seen)
    with connect(prig.proxy.port, prig.ctx("other")) as s:
        s.sendall(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1073741824\r\n\r\n"
        )
        status, headers, _ = read_response(s, bytearray())
    assert status == 403 and headers.get("connection") == "close"
    assert len(prig.upstream.seen) == before
