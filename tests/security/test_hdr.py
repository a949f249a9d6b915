"""docs/security.md, HDR: identity-header security (HDR-001 .. HDR-023). HDR-005/006 are refused
payloads in tests/integration/test_smuggling.py; HDR-019 is checked by test_tls.test_accepted
(the forwarded hash is the leaf's for chains with extra certificates)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mtls_proxy.cli import pki
from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Seen,
    Upstream,
    connect,
    read_response,
    run_proxy,
    run_upstream,
)
from tests.security import certs as c
from tests.security.conftest import assert_canon


def xfcc_elements(value: str) -> list[list[tuple[str, str]]]:
    """The XFCC oracle (format: docs/headers.md): elements split on unquoted ',', pairs on
    unquoted ';', values optionally double-quoted; a backslash inside quotes protects the next
    character. Quoted
    values are returned as written between the quotes (a Subject is then the RFC 2253 string
    byte for byte, HDR-012); see unquote() for URI/DNS values."""
    elements: list[list[tuple[str, str]]] = [[]]
    key, buf, in_quotes, i = "", "", False, 0
    while i < len(value):
        ch = value[i]
        if in_quotes:
            if ch == "\\" and i + 1 < len(value):
                buf += value[i : i + 2]
                i += 1
            elif ch == '"':
                in_quotes = False
            else:
                buf += ch
        elif ch == '"':
            in_quotes = True
        elif ch == "=" and not key:
            key, buf = buf, ""
        elif ch in ";,":
            elements[-1].append((key, buf))
            key, buf = "", ""
            if ch == ",":
                elements.append([])
        else:
            buf += ch
        i += 1
    assert not in_quotes, value
    elements[-1].append((key, buf))
    return elements


def unquote(v: str) -> str:
    """A quoted URI/DNS value: backslash-escaped '"' and '\\' (docs/headers.md)."""
    return v.replace('\\"', '"').replace("\\\\", "\\")


NAMES = {
    "nul_cn": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin\x00.evil")]),
    "utf8": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Jürgen \u202eevil")]),
    "bmp": x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "Jürgen", x509.name._ASN1Type.BMPString)]  # type: ignore[attr-defined]
    ),
    "long": x509.Name(
        [
            *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x" * 60) for _ in range(60)),
            x509.NameAttribute(NameOID.COMMON_NAME, "client"),
        ]
    ),
    "two_cns": x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "allowed-client"),
            x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
        ]
    ),
    "sans": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "many")]),
}
MANY_SANS: list[x509.GeneralName] = [
    x509.DNSName("a.test"),
    x509.UniformResourceIdentifier(ALLOWED_URI),
    x509.DNSName("b.test"),
    x509.UniformResourceIdentifier("spiffe://test.local/second"),
    x509.DNSName("c.test"),
]


@dataclass
class HdrRig:
    tp: Pki
    d: Path
    port: int
    upstream: Upstream

    def send(self, label: str, raw: bytes) -> tuple[int, Seen | None]:
        before = len(self.upstream.seen)
        crt = (
            self.d / f"{label}.crt"
            if (self.d / f"{label}.crt").exists()
            else Path(self.tp.crt(label))
        )
        key = (
            self.d / f"{label}.key"
            if (self.d / f"{label}.key").exists()
            else Path(self.tp.key(label))
        )
        import ssl

        ctx = ssl.create_default_context(cafile=self.tp.ca)
        ctx.load_cert_chain(crt, key)
        with connect(self.port, ctx) as s:
            s.sendall(raw)
            status = read_response(s, bytearray())[0]
        new = self.upstream.seen[before:]
        return status, (new[0] if new else None)

    def get(self, label: str, headers: bytes = b"") -> Seen:
        status, seen = self.send(
            label, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + headers + b"\r\n"
        )
        assert status == 200 and seen is not None, status
        assert_canon(seen)
        return seen

    def sha(self, label: str) -> str:
        path = (
            self.d / f"{label}.crt"
            if (self.d / f"{label}.crt").exists()
            else Path(self.tp.crt(label))
        )
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def hrig(tp: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HdrRig]:
    d = tmp_path_factory.mktemp("hdr")
    issuer = pki.load_issuer(tp.dir)
    inter = c.Cert(issuer.cert, issuer.key)
    for label, subject in NAMES.items():
        sans = MANY_SANS if label == "sans" else [x509.UniformResourceIdentifier(ALLOWED_URI)]
        c.write(d, label, c.leaf(inter, subject, sans=sans, chain=[inter]))  # type: ignore[arg-type]
    with run_upstream() as up, run_proxy(tp, f"http://127.0.0.1:{up.port}", "--allow-all") as p:
        yield HdrRig(tp, d, p.port, up)


SUBJECT = "CN=client-good,O=Example Corp"


def test_hdr001_spoofed_subject_is_replaced(hrig: HdrRig) -> None:
    seen = hrig.get("good", b"X-Client-Subject: CN=admin\r\n")
    assert seen.get("x-client-subject") == [SUBJECT]


def test_hdr002_spoofed_xfcc_is_replaced(hrig: HdrRig) -> None:
    seen = hrig.get(
        "good",
        b"X-Forwarded-Client-Cert: By=spiffe://x;Hash=00;URI=spiffe://test.local/ns/kube-system/sa/admin\r\n",
    )
    (element,) = xfcc_elements(seen.one("x-forwarded-client-cert"))
    assert ("Hash", hrig.sha("good")) in element and ("URI", ALLOWED_URI) in element
    assert not any("kube-system" in v for _, v in element)


def test_hdr003_duplicated_spoofs_in_any_case_do_not_survive(hrig: HdrRig) -> None:
    seen = hrig.get(
        "good",
        b"X-Client-Subject: a\r\nx-client-subject: b\r\n"
        b"X-Forwarded-Client-Cert: Hash=1\r\nx-forwarded-client-cert: Hash=2\r\n",
    )
    assert seen.get("x-client-subject") == [SUBJECT]
    assert len(xfcc_elements(seen.one("x-forwarded-client-cert"))) == 1


def test_hdr004_underscore_spellings_are_dropped(hrig: HdrRig) -> None:
    seen = hrig.get(
        "good",
        b"X_Client_Subject: CN=admin\r\nx_forwarded_client_cert: Hash=00\r\n"
        b"X-Client_Subject: CN=admin\r\n",
    )
    names = [k for k, _ in seen.headers]
    assert not [
        n
        for n in names
        if "_" in n and n.replace("_", "-") in ("x-client-subject", "x-forwarded-client-cert")
    ]


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: keep-alive, X-Client-Subject\r\n",
        b"Connection: close, x-forwarded-client-cert\r\n",
        b"Connection: keep-alive\r\nConnection: X-Client-Subject\r\n",
        b"Connection:\r\nConnection: X-Client-Subject\r\n",
        b"Connection: ,  X-Client-Subject ,\r\n",
    ],
)
def test_hdr007_connection_cannot_remove_injected_identity(hrig: HdrRig, connection: bytes) -> None:
    seen = hrig.get("good", connection)
    assert seen.get("x-client-subject") == [SUBJECT] and seen.get("connection") == []
    assert len(seen.get("x-forwarded-client-cert")) == 1


@pytest.mark.parametrize(
    "connection", [b"Content-Length", b"Host", b"Transfer-Encoding, Authorization"]
)
def test_hdr008_connection_cannot_change_framing(hrig: HdrRig, connection: bytes) -> None:
    status, seen = hrig.send(
        "good",
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: " + connection + b"\r\n"
        b"Content-Length: 5\r\nAuthorization: x\r\n\r\nhello",
    )
    assert status == 200 and seen is not None and seen.body_len == 5
    assert seen.one("host") == "a" and seen.one("content-length") == "5"
    assert_canon(seen)


def test_hdr009_identity_in_trailers_is_dropped(hrig: HdrRig) -> None:
    status, seen = hrig.send(
        "good",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"1\r\nZ\r\n0\r\nX-Client-Subject: CN=admin\r\nX-Forwarded-Client-Cert: Hash=00\r\n\r\n",
    )
    assert status == 200 and seen is not None
    assert seen.get("x-client-subject") == [SUBJECT]


@pytest.mark.parametrize(
    ("label", "subject"),
    [
        ("evil", "CN=evil\\0D\\0AX-Client-Subject: CN=admin"),  # HDR-010
        ("nul_cn", "CN=admin\\00.evil"),  # HDR-011
        ("quote", 'CN=a\\"b\\,c\\;d=e\\\\f,O=Org\\, Inc.'),  # HDR-012 (O is the first RDN)
        ("utf8", "CN=J\\C3\\BCrgen \\E2\\80\\AEevil"),  # HDR-013
        ("bmp", "CN=J\\C3\\BCrgen"),  # HDR-013: BMPString renders like UTF8String
        ("two_cns", "CN=admin,CN=allowed-client"),  # HDR-020
    ],
)
def test_hdr010_013_020_subjects_are_escaped_ascii(hrig: HdrRig, label: str, subject: str) -> None:
    seen = hrig.get(label)
    assert seen.get("x-client-subject") == [subject]
    (element,) = xfcc_elements(seen.one("x-forwarded-client-cert"))
    assert ("Subject", subject) in element
    for _, v in seen.headers:
        assert v.isascii() and "\r" not in v and "\n" not in v and "\0" not in v


def test_hdr014_long_subject_is_forwarded_whole(hrig: HdrRig) -> None:
    seen = hrig.get("long")
    assert seen.one("x-client-subject").startswith("CN=client,OU=" + "x" * 60)
    assert seen.one("x-client-subject").count("OU=") == 60


def test_hdr015_delimiters_in_san_values_are_quoted(hrig: HdrRig) -> None:
    seen = hrig.get("quote")
    elements = xfcc_elements(seen.one("x-forwarded-client-cert"))
    assert len(elements) == 1
    assert [v for k, v in elements[0] if k == "URI"] == [
        "spiffe://test.local/a;By=spiffe://admin,Hash=00"
    ]


def test_hdr016_017_every_san_in_order_and_the_hash(hrig: HdrRig) -> None:
    """HDR-016 (one pair per SAN, in order) and HDR-017 (Hash is the DER's SHA-256)."""
    seen = hrig.get("sans")
    (element,) = xfcc_elements(seen.one("x-forwarded-client-cert"))
    assert [v for k, v in element if k == "DNS"] == ["a.test", "b.test", "c.test"]
    assert [v for k, v in element if k == "URI"] == [ALLOWED_URI, "spiffe://test.local/second"]
    assert ("Hash", hrig.sha("sans")) in element
    assert seen.one("x-client-cert-sha256") == hrig.sha("sans")


def test_hdr021_every_keepalive_and_pipelined_request_gets_one_fresh_set(hrig: HdrRig) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=hrig.tp.ca)
    ctx.load_cert_chain(hrig.tp.crt("good"), hrig.tp.key("good"))
    before = len(hrig.upstream.seen)
    with connect(hrig.port, ctx) as s:
        buf = bytearray()
        for i in range(3):
            s.sendall(b"GET /k%d HTTP/1.1\r\nHost: a\r\nX-Client-Subject: x\r\n\r\n" % i)
            assert read_response(s, buf)[0] == 200
        s.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3)))
        assert [read_response(s, buf)[0] for _ in range(3)] == [200] * 3
    new = hrig.upstream.seen[before:]
    assert len(new) == 6
    for seen in new:
        assert seen.get("x-client-subject") == [SUBJECT]
        assert_canon(seen)


def test_hdr022_forwarding_headers_are_the_proxys(hrig: HdrRig) -> None:
    seen = hrig.get(
        "good",
        b"X-Forwarded-Proto: http\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"Forwarded: for=1.2.3.4;proto=http\r\nX-Real-IP: 1.2.3.4\r\n",
    )
    assert seen.get("x-forwarded-proto") == ["https"]
    assert seen.get("x-forwarded-for") == ["127.0.0.1"]
    assert seen.get("forwarded") == [] and seen.get("x-real-ip") == []


def test_hdr023_no_identity_or_hop_by_hop_in_responses(hrig: HdrRig) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=hrig.tp.ca)
    ctx.load_cert_chain(hrig.tp.crt("good"), hrig.tp.key("good"))
    hrig.upstream.raw_response = (
        b"HTTP/1.1 200 OK\r\nConnection: X-Foo\r\nX-Foo: 1\r\nKeep-Alive: timeout=1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    with connect(hrig.port, ctx) as s:
        s.sendall(b"GET /raw HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        status, headers, body = read_response(s, bytearray())
    assert status == 200 and body == b"ok"
    assert "x-foo" not in headers and "keep-alive" not in headers
    assert not [k for k in headers if k.startswith(("x-client", "x-forwarded-client"))]
