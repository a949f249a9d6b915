"""One interpretation of every request (INT-001 .. INT-039): the classes a red team found where
the proxy and the upstream read the same bytes differently.

- INT-001..005: framing look-alikes (``Content_Length``) and underscore header names;
- INT-010..012: no byte after a response that closes the connection is read as a request;
- INT-020..024: path parameters in dot segments, encoded dot segments (Tomcat/Spring read them);
- INT-030..031: every client forwarding header is removed, the proxy sets its own;
- INT-032: identity header values from the certificate cannot fake a list element.

Each runs on both event loops against the h11 recording upstream; the real-Tomcat variants of
INT-001 and INT-020 are in tests/integration/test_tomcat.py.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from mtls_proxy.cli import pki
from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Proxy,
    Seen,
    Upstream,
    client_ctx,
    connect,
    read_response,
    run_proxy,
    run_upstream,
    send_and_read,
)
from tests.security import certs as c
from tests.security.conftest import assert_canon

POLICY = f"""
allow:
  - uri: {ALLOWED_URI}
routes:
  - path_prefix: /admin
    allow:
      - cn: nobody-has-this
  - path_prefix: /public
    allow:
      - anonymous: true
      - uri: {ALLOWED_URI}
"""
FORGED = b"CN=forged"
SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: a\r\nX-Client-Subject: " + FORGED + b"\r\n\r\n"


@dataclass
class IntRig:
    tp: Pki
    proxy: Proxy
    upstream: Upstream
    d: Path

    def ctx(self, label: str | None = "good") -> ssl.SSLContext:
        if label is None or label == "good":
            return client_ctx(self.tp, label)
        ctx = ssl.create_default_context(cafile=self.tp.ca)
        ctx.load_cert_chain(self.d / f"{label}.crt", self.d / f"{label}.key")
        return ctx

    def exchange(self, payload: bytes, label: str | None = "good", timeout: float = 3) -> bytes:
        """Send *payload* in one write; read until the proxy closes or goes quiet."""
        return send_and_read(self.proxy.port, self.ctx(label), payload, timeout)

    def one(self, payload: bytes, label: str | None = "good") -> tuple[int, list[Seen]]:
        """Send one request (Connection: close expected in *payload*); status and what the
        upstream parsed because of it."""
        before = len(self.upstream.seen)
        with connect(self.proxy.port, self.ctx(label)) as s:
            s.sendall(payload)
            status = read_response(s, bytearray())[0]
        time.sleep(0.05)
        return status, self.upstream.seen[before:]

    def seen_since(self, before: int) -> list[Seen]:
        time.sleep(0.1)
        return self.upstream.seen[before:]


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def irig(
    request: pytest.FixtureRequest, tp: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IntRig]:
    d = tmp_path_factory.mktemp("int")
    (d / "policy.yaml").write_text(POLICY)
    issuer = pki.load_issuer(tp.dir)
    inter = c.Cert(issuer.cert, issuer.key)
    c.write(
        d,
        "dns_comma",
        c.leaf(
            inter,
            sans=[
                x509.UniformResourceIdentifier(ALLOWED_URI),
                x509.DNSName._init_without_validation("a.test,evil.test"),  # type: ignore[attr-defined]
                x509.DNSName._init_without_validation('b.test" x'),  # type: ignore[attr-defined]
            ],
            chain=[inter],
        ),
    )
    with (
        run_upstream() as up,
        run_proxy(
            tp,
            f"http://127.0.0.1:{up.port}",
            "--policy",
            str(d / "policy.yaml"),
            "--client-auth",
            "optional",
            "--identity-headers",
            "xfcc,simple",
            "--header-timeout",
            "2",
            "--body-timeout",
            "2",
            loop=str(request.param),
            default_policy=False,
        ) as p,
    ):
        yield IntRig(tp, p, up, d)


def no_forgery(seen: list[Seen]) -> None:
    for s in seen:
        for k, v in s.headers:
            assert "forged" not in v, (s.target, k, v)
        assert "smuggled" not in s.target, s.target


# -- INT-001..005: framing look-alikes and underscore names ---------------------------------------
def test_int001_content_length_lookalike_after_the_real_one(irig: IntRig) -> None:
    """``Content-Length: N`` + ``Content_Length: 0``: the body is N bytes, forwarded as such."""
    before = len(irig.upstream.seen)
    payload = (
        b"POST /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nContent_Length: 0\r\n"
        b"Connection: close\r\n\r\n" % len(SMUGGLED)
    ) + SMUGGLED
    out = irig.exchange(payload)
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    seen = irig.seen_since(before)
    no_forgery(seen)
    assert [(s.target, s.body_len) for s in seen] == [("/public/a", len(SMUGGLED))]
    assert seen[0].one("content-length") == str(len(SMUGGLED))
    assert_canon(seen[0])


def test_int002_content_length_lookalike_alone(irig: IntRig) -> None:
    """``Content_Length: N`` alone frames nothing: what follows is the next request, parsed,
    policy-checked and logged by the proxy (here a denied /admin request)."""
    before = len(irig.upstream.seen)
    payload = (
        b"POST /public/a HTTP/1.1\r\nHost: a\r\nContent_Length: %d\r\n\r\n" % len(SMUGGLED)
    ) + SMUGGLED
    out = irig.exchange(payload)
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert b"HTTP/1.1 403" in out, out
    seen = irig.seen_since(before)
    no_forgery(seen)
    assert [(s.target, s.body_len) for s in seen] == [("/public/a", 0)]
    assert seen[0].get("content-length") in ([], ["0"])


def test_int002_transfer_encoding_lookalike(irig: IntRig) -> None:
    """``Transfer_Encoding: chunked`` next to a real Content-Length frames nothing."""
    before = len(irig.upstream.seen)
    body = b"0\r\n\r\n" + SMUGGLED
    payload = (
        b"POST /public/a HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body
    out = irig.exchange(payload)
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    seen = irig.seen_since(before)
    no_forgery(seen)
    assert [(s.target, s.body_len) for s in seen] == [("/public/a", len(body))]
    assert seen[0].get("transfer-encoding") == []


def test_int003_lookalike_with_pooled_connection_next_client(irig: IntRig) -> None:
    """The upstream connection is pooled: a look-alike must not corrupt the next client's
    request on it (before the fix the smuggled bytes were the next request upstream)."""
    before = len(irig.upstream.seen)
    partial = b"GET /admin/x HTTP/1.1\r\nHost: a\r\nX-Client-Subject: CN=forged\r\nX-Pad: "
    payload = (
        b"POST /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nContent_Length: 0\r\n"
        b"Connection: close\r\n\r\n" % len(partial)
    ) + partial
    irig.exchange(payload)
    for _ in range(3):
        status, _ = irig.one(b"GET /public/next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status == 200
    seen = irig.seen_since(before)
    no_forgery(seen)
    assert [s.target for s in seen] == ["/public/a"] + ["/public/next"] * 3
    assert seen[0].body_len == len(partial)


def test_int004_upstream_answering_before_the_body(tp: Pki, tmp_path: Path) -> None:
    """An upstream that answers before reading the body still sees one well-framed request:
    the body it did not read is counted by the declared length, not left to be parsed."""
    got: list[bytes] = []

    def handle(conn: socket.socket, _n: int) -> None:
        conn.settimeout(2)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            while chunk := conn.recv(65536):
                data += chunk
        except OSError:
            pass
        got.append(data)
        conn.close()

    from tests.helpers import serve_raw

    srv = serve_raw(handle)
    port = srv.getsockname()[1]
    with run_proxy(tp, f"http://127.0.0.1:{port}") as p:
        with connect(p.port, client_ctx(tp, "good"), timeout=3) as s:
            s.sendall(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nContent_Length: 0\r\n\r\n"
                % len(SMUGGLED)
                + SMUGGLED
            )
            assert read_response(s, bytearray())[0] == 200
        time.sleep(0.3)
    srv.close()
    raw = b"".join(got)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\ncontent-length: %d\r\n" % len(SMUGGLED) in head.lower() + b"\r\n", head
    assert b"content_length" not in head.lower()
    assert body in (b"", SMUGGLED)


def test_int005_underscore_headers_dropped_by_default_and_counted(irig: IntRig) -> None:
    before_metric = irig.proxy.metric("mtls_proxy_request_headers_dropped_total")
    status, seen = irig.one(
        b"GET /public/u HTTP/1.1\r\nHost: a\r\nX_Custom: 1\r\nX-Custom-Ok: 2\r\n"
        b"X_Client_Subject: CN=forged\r\nX_Forwarded_Prefix: /forged\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    names = [k for k, _ in seen[0].headers]
    assert "x-custom-ok" in names
    assert not [n for n in names if "_" in n], names
    no_forgery(seen)
    assert irig.proxy.metric("mtls_proxy_request_headers_dropped_total") >= before_metric + 3


@pytest.mark.parametrize("action", ["reject", "allow"])
def test_int005_underscore_headers_option(tp: Pki, upstream: Upstream, action: str) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--underscore-headers", action) as p:
        with connect(p.port, client_ctx(tp, "good")) as s:
            s.sendall(
                b"GET / HTTP/1.1\r\nHost: a\r\nX_Custom: 1\r\nX_Client_Subject: CN=forged\r\n"
                b"Content_Length: 5\r\nX_Real_IP: forged\r\nConnection: close\r\n\r\n"
            )
            status = read_response(s, bytearray())[0]
        time.sleep(0.05)
    if action == "reject":
        assert status == 400
        assert upstream.seen == []
        return
    assert status == 200
    (seen,) = upstream.seen
    names = [k for k, _ in seen.headers]
    assert "x_custom" in names  # allowed: forwarded as sent
    assert "x_client_subject" not in names and "content_length" not in names
    assert "x_real_ip" not in names
    no_forgery([seen])
    assert seen.body_len == 0


# -- INT-010..012: nothing is read after a closing response --------------------------------------
def test_int010_no_request_after_501_close(irig: IntRig) -> None:
    before = len(irig.upstream.seen)
    out = irig.exchange(
        b"POST /public/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED + b"GET /public/after HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 501"), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert b"connection: close" in out.lower()
    assert irig.seen_since(before) == []


def test_int011_no_request_after_connection_close(irig: IntRig) -> None:
    """RFC 9112 9.6: after a request with ``Connection: close`` no further request is processed."""
    before = len(irig.upstream.seen)
    out = irig.exchange(
        b"GET /public/first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        b"GET /public/second HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert [s.target for s in irig.seen_since(before)] == ["/public/first"]


def test_int012_no_request_after_a_bad_request(irig: IntRig) -> None:
    before = len(irig.upstream.seen)
    out = irig.exchange(
        b"GET /public/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET /public/after HTTP/1.1\r\n"
        b"Host: a\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert irig.seen_since(before) == []


def test_int012_no_request_after_http10(irig: IntRig) -> None:
    before = len(irig.upstream.seen)
    out = irig.exchange(
        b"GET /public/ten HTTP/1.0\r\n\r\nGET /public/after HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert [s.target for s in irig.seen_since(before)] == ["/public/ten"]


# -- INT-020..024: paths ---------------------------------------------------------------------------
AMBIGUOUS = [
    "/public/..;/admin/x",
    "/public/..;v=1/admin/x",
    "/.;/admin",
    "/;/admin",
    "/public/;/../admin",
    "/public/.;x/../../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2e/admin",
    "/public/.%2e/admin",
    "/public/%2e./admin",
    "/public/%2e/../admin",
    "/public/..%3b/admin",
]


@pytest.mark.parametrize("path", AMBIGUOUS)
def test_int020_ambiguous_paths_refused(irig: IntRig, path: str) -> None:
    status, seen = irig.one(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    assert status == 400, (path, status)
    assert seen == []


@pytest.mark.parametrize("path", ["/public/..;/admin/x", "/;/admin", "/public/%2e%2e/admin"])
def test_int021_ambiguous_paths_refused_for_anonymous(irig: IntRig, path: str) -> None:
    """The anonymous route (/public, no certificate) gets the same refusal."""
    status, seen = irig.one(
        f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(), label=None
    )
    assert status == 400, (path, status)
    assert seen == []


@pytest.mark.parametrize(
    ("path", "status", "forwarded"),
    [
        ("/public/../admin/x", 403, None),
        ("/admin;jsessionid=1/x", 403, None),
        ("/public//../admin", 403, None),
        ("/public/a;v=1/b", 200, "/public/a;v=1/b"),
        ("/public/x/../y", 200, "/public/y"),
        ("/public/%7Euser", 200, "/public/~user"),
        ("/public/a%3Bb", 200, "/public/a%3Bb"),
    ],
)
def test_int022_forwarded_path_is_the_matched_path(
    irig: IntRig, path: str, status: int, forwarded: str | None
) -> None:
    got, seen = irig.one(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    assert got == status, (path, got)
    assert [s.target for s in seen] == ([forwarded] if forwarded else [])


# -- INT-030..032: forwarding and identity headers -------------------------------------------------
FORWARDING = [
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Ssl",
    "X-Forwarded-Scheme",
    "X-Forwarded-Uri",
    "X-Forwarded-Method",
    "X-Forwarded-Server",
    "X-Forwarded-Path",
    "x-forwarded-anything",
    "Forwarded",
    "X-Real-IP",
    "X-Original-URL",
    "X-Original-URI",
    "X-Original-Method",
    "X-Original-Host",
    "X-Rewrite-URL",
]


def test_int030_client_forwarding_headers_removed(irig: IntRig) -> None:
    lines = "".join(f"{n}: forged\r\n" for n in FORWARDING).encode()
    status, seen = irig.one(
        b"GET /public/f HTTP/1.1\r\nHost: a\r\n" + lines + b"Connection: close\r\n\r\n"
    )
    assert status == 200
    (s,) = seen
    no_forgery(seen)
    names = {k for k, _ in s.headers}
    for n in FORWARDING:
        if n.lower() not in (
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
        ):
            assert n.lower() not in names, n
    assert s.one("x-forwarded-for") == "127.0.0.1"
    assert s.one("x-forwarded-proto") == "https"
    assert s.one("x-forwarded-host") == "a"
    assert s.one("x-forwarded-port") == str(irig.proxy.port)


def test_int031_connection_cannot_nominate_away_our_forwarding_headers(irig: IntRig) -> None:
    status, seen = irig.one(
        b"GET /public/f HTTP/1.1\r\nHost: a\r\nConnection: close, X-Forwarded-For, "
        b"X-Forwarded-Port, X-Client-Subject\r\n\r\n"
    )
    assert status == 200
    (s,) = seen
    assert s.one("x-forwarded-for") == "127.0.0.1"
    assert s.one("x-forwarded-port") == str(irig.proxy.port)
    assert len(s.get("x-client-subject")) == 1


def test_int032_dns_sans_cannot_fake_list_elements(irig: IntRig) -> None:
    """A DNS SAN holding ',' (or '"') is quoted in X-Client-DNS, as in XFCC: no reader sees a
    name the CA never issued."""
    status, seen = irig.one(
        b"GET /public/d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", label="dns_comma"
    )
    assert status == 200
    (s,) = seen
    assert s.one("x-client-dns") == '"a.test,evil.test","b.test\\" x"'
    assert 'DNS="a.test,evil.test"' in s.one("x-forwarded-client-cert")


OTHER_TERMINATORS = [
    "X-SSL-Client-Cert",
    "X-SSL-Client-DN",
    "X-SSL-Client-Verify",
    "SSL_CLIENT_S_DN",
    "SSL_CLIENT_VERIFY",
    "X-Client-Cert",
    "X-Client-Cert-Chain",
    "X-Client-Verify",
    "X-Client-Issuer",
    "X-Client-Email",
    "X-ARR-ClientCert",
    "X-Amzn-Mtls-Clientcert",
    "X-Amzn-Mtls-Clientcert-Leaf",
    "X-Envoy-Original-Path",
    "X-Client-IP",
    "True-Client-IP",
    "X-Cluster-Client-IP",
    "CF-Connecting-IP",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
]


def test_int034_other_terminators_identity_and_method_overrides_removed(irig: IntRig) -> None:
    """Client-certificate headers of other terminators, client-address headers and method
    overrides never reach the upstream: the proxy never sets them, so no client may."""
    lines = "".join(f"{n}: forged\r\n" for n in OTHER_TERMINATORS).encode()
    status, seen = irig.one(
        b"GET /public/o HTTP/1.1\r\nHost: a\r\n" + lines + b"Connection: close\r\n\r\n"
    )
    assert status == 200
    no_forgery(seen)
    names = {k for k, _ in seen[0].headers}
    assert not names & {n.lower() for n in OTHER_TERMINATORS}, names


def test_int013_request_acted_on_after_the_client_left_is_logged(irig: IntRig) -> None:
    """The client closes while its request is with the upstream: the upstream acts on it, so
    the proxy writes its access record (status 499, aborted), as nginx does."""
    before = len(irig.upstream.seen)
    with connect(irig.proxy.port, irig.ctx()) as s:
        s.sendall(b"GET /slow/left?s=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline and not records:
        time.sleep(0.1)
        records = [r for r in irig.proxy.records() if r.get("path") == "/slow/left"]
    assert [s.target for s in irig.upstream.seen[before:]] == ["/slow/left?s=1"]
    assert len(records) == 1, records
    assert records[0]["status"] == 499 and records[0].get("aborted") is True, records[0]
