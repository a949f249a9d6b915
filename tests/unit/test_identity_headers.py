"""Identity extraction (RFC 2253 against OpenSSL) and header rewriting/encoding tables."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess as sp

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from mtls_proxy.cli import pki
from mtls_proxy.core import headers
from mtls_proxy.core.headers import (
    IdentityBlock,
    UnderscoreAction,
    classify,
    clean,
    identity_block,
    normalize_name,
    protected,
    simple_headers,
    split_request_headers,
    xfcc_element,
)
from mtls_proxy.core.identity import PeerIdentity, escape_value, identity_from_der, rfc2253

KEY = ec.generate_private_key(ec.SECP256R1())
A = x509.NameAttribute


def self_signed(name: x509.Name) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(KEY, hashes.SHA256())
    )


NAMES = [
    [A(NameOID.COMMON_NAME, "client-a"), A(NameOID.ORGANIZATION_NAME, "Example Corp")],
    [A(NameOID.COMMON_NAME, 'a"b,c;d=e\\f'), A(NameOID.ORGANIZATION_NAME, "Org, Inc.")],
    [A(NameOID.COMMON_NAME, "evil\r\nX-Client-Subject: CN=admin")],
    [A(NameOID.COMMON_NAME, "admin\x00.evil\x7f")],
    [A(NameOID.COMMON_NAME, "Jürgen \u202eevil")],
    [A(NameOID.COMMON_NAME, "Jürgen", _ASN1Type.BMPString)],
    [A(NameOID.COMMON_NAME, "#hash + <x> ")],
    [
        A(NameOID.EMAIL_ADDRESS, "a@b.c"),
        A(NameOID.DOMAIN_COMPONENT, "org"),
        A(NameOID.SERIAL_NUMBER, "123"),
        A(NameOID.COUNTRY_NAME, "DE"),
        A(NameOID.USER_ID, "u1"),
        A(NameOID.GIVEN_NAME, "g"),
        A(NameOID.SURNAME, "s"),
        A(NameOID.STREET_ADDRESS, "st"),
    ],
    [A(x509.ObjectIdentifier("1.2.3.4.5"), "weird")],
    [
        A(NameOID.COMMON_NAME, "u"),
        A(NameOID.X500_UNIQUE_IDENTIFIER, b"\x00\x01", _ASN1Type.BitString),
    ],
    [A(NameOID.COMMON_NAME, "admin"), A(NameOID.COMMON_NAME, "allowed-client")],
]


@pytest.mark.parametrize("attrs", NAMES, ids=range(len(NAMES)))
def test_rfc2253_matches_openssl(attrs: list[x509.NameAttribute[str]]) -> None:
    cert = self_signed(x509.Name(attrs))
    out = sp.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253"],
        input=cert.public_bytes(serialization.Encoding.PEM),
        capture_output=True,
        check=True,
    ).stdout.decode()
    expected = out.removeprefix("subject=").removesuffix("\n")
    got = rfc2253(cert.subject)
    assert got == expected
    assert got.isascii() and "\r" not in got and "\n" not in got and "\x00" not in got


def test_multivalued_rdn() -> None:
    name = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [A(NameOID.COMMON_NAME, "a"), A(NameOID.ORGANIZATIONAL_UNIT_NAME, "b")]
            ),
            x509.RelativeDistinguishedName([A(NameOID.COUNTRY_NAME, "US")]),
        ]
    )
    assert rfc2253(name) == "C=US,OU=b+CN=a"


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        (" lead", "\\ lead"),
        ("trail ", "trail\\ "),
        ("#x", "\\#x"),
        ("a#b", "a#b"),
        ("\t", "\\09"),
        ("ü", "\\C3\\BC"),
    ],
)
def test_escape_value(raw: str, escaped: str) -> None:
    assert escape_value(raw) == escaped


def test_identity_from_der_reads_every_field() -> None:
    root = pki.make_ca("r")
    leaf = pki.issue(
        root,
        "client",
        "c1",
        o="Org",
        ou=["t1", "t2"],
        dns=["a.test", "b.test"],
        ips=["10.0.0.1", "::1"],
        uris=["spiffe://td/x", "https://e/x"],
        emails=["a@b.c"],
    )
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    ident = identity_from_der(der)
    assert ident.subject == "CN=c1,OU=t2,OU=t1,O=Org"
    assert (ident.cn, ident.o, ident.ou) == (("c1",), ("Org",), ("t1", "t2"))
    assert ident.dns == ("a.test", "b.test") and ident.email == ("a@b.c",)
    assert ident.uri == ("spiffe://td/x", "https://e/x") and ident.spiffe_id == "spiffe://td/x"
    assert ident.ip == ("10.0.0.1", "::1")
    assert ident.sha256 == hashlib.sha256(der).hexdigest()
    assert ident.not_after == leaf.cert.not_valid_after_utc
    assert identity_from_der(der) is ident  # cached per DER


def test_identity_without_sans() -> None:
    cert = self_signed(x509.Name([A(NameOID.COMMON_NAME, "x")]))
    ident = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert ident.dns == ident.uri == ident.ip == ident.email == () and ident.spiffe_id is None


# -- headers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "norm"),
    [
        (b"X-Client-Subject", b"x-client-subject"),
        (b"X_CLIENT_SUBJECT", b"x-client-subject"),
        (b"x_client-subject", b"x-client-subject"),
        (b"Host", b"host"),
    ],
)
def test_normalize_name(name: bytes, norm: bytes) -> None:
    assert normalize_name(name) == norm


def test_split_request_headers_strips_and_collects() -> None:
    rh = split_request_headers(
        [
            (b"Host", b"a"),
            (b"X-Keep", b"1"),
            (b"X_Client_Subject", b"spoof"),
            (b"x-forwarded-client-cert", b"By=x"),
            (b"Connection", b"close, X-Drop, host, Content-Length"),
            (b"X-Drop", b"1"),
            (b"Content-Length", b"3"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Expect", b"100-continue"),
            (b"Keep-Alive", b"x"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"Upgrade", b"h2c"),
            (b"Forwarded", b"for=x"),
        ]
    )
    assert rh.forwarded_lines() == b"X-Keep: 1\r\n"
    assert split_request_headers([(b"X-A", b"1")]).forwarded_lines() == b"X-A: 1\r\n"
    assert rh.underscored == [b"X_Client_Subject"]
    assert rh.hosts == [b"a"] and rh.content_length == b"3"
    assert rh.transfer_encoding == [b"chunked"] and rh.expect == [b"100-continue"]
    assert rh.xfcc == [b"By=x"] and rh.upgrade is True


@pytest.mark.parametrize(
    ("value", "cleaned"),
    [
        ("ok", "ok"),
        ("a\r\nb", "a\\0D\\0Ab"),
        ("nul\x00", "nul\\00"),
        ("ü", "\\C3\\BC"),
    ],
)
def test_clean(value: str, cleaned: str) -> None:
    assert clean(value) == cleaned


PEER = PeerIdentity(
    subject="CN=c,O=O",
    sha256="ab" * 32,
    uri=("spiffe://td/a", "spiffe://td/x;By=y,Hash=0"),
    dns=("a.test", "b\r\n.test"),
)


def test_xfcc_element_quotes_delimiters_and_escapes_controls() -> None:
    expected = (
        "By=spiffe://td/proxy;Hash=" + "ab" * 32 + ';Subject="CN=c,O=O";URI=spiffe://td/a;'
        'URI="spiffe://td/x;By=y,Hash=0";DNS=a.test;DNS="b\\\\0D\\\\0A.test"'
    )
    assert xfcc_element(PEER, "spiffe://td/proxy").decode() == expected
    assert xfcc_element(PEER, None).startswith(b"Hash=")


def test_simple_headers() -> None:
    assert dict(simple_headers(PEER)) == {
        "X-Client-Subject": "CN=c,O=O",
        "X-Client-Cert-Sha256": "ab" * 32,
        "X-Client-SPIFFE-ID": "spiffe://td/a",
        "X-Client-DNS": 'a.test,"b\\\\0D\\\\0A.test"',  # quoted as in XFCC (INT-032)
        "X-Client-Verified": "SUCCESS",
    }
    assert simple_headers(None) == [("X-Client-Verified", "NONE")]
    plain = PeerIdentity(subject="CN=c", sha256="cd" * 32, uri=("https://e/x",))
    assert [k for k, _ in simple_headers(plain)] == [
        "X-Client-Subject",
        "X-Client-Cert-Sha256",
        "X-Client-Verified",
    ]


@pytest.mark.parametrize(
    ("mode", "incoming", "line"),
    [
        ("sanitize_set", [b"By=up"], b"x-forwarded-client-cert: OURS\r\n"),
        ("sanitize_set", [], b"x-forwarded-client-cert: OURS\r\n"),
        (
            "append_forward",
            [b"By=up", b"Hash=1"],
            b"x-forwarded-client-cert: By=up,Hash=1,OURS\r\n",
        ),
        ("append_forward", [], b"x-forwarded-client-cert: OURS\r\n"),
        ("forward_only", [b"By=up"], b"x-forwarded-client-cert: By=up\r\n"),
        ("forward_only", [], b""),
        ("sanitize", [b"By=up"], b""),
    ],
)
def test_xfcc_modes(mode: str, incoming: list[bytes], line: bytes) -> None:
    block = IdentityBlock(b"", b"OURS", mode)  # type: ignore[arg-type]
    assert block.xfcc_line(incoming) == line


def test_identity_block_for_anonymous_has_no_xfcc() -> None:
    block = identity_block(None, ("xfcc", "simple"), "sanitize_set", None)
    assert block.xfcc_line([b"By=spoof"]) == b""
    assert block.lines == b"X-Client-Verified: NONE\r\n"
    assert identity_block(PEER, ("simple",), "sanitize_set", None).xfcc is None
    assert identity_block(PEER, ("xfcc",), "sanitize_set", None).lines == b""


def test_access_log_lines_are_valid_json() -> None:
    import asyncio
    import io
    import json as _json

    from cryptography.hazmat.primitives import serialization

    from mtls_proxy.cli import pki
    from mtls_proxy.core.identity import identity_from_der
    from mtls_proxy.telemetry.logs import AccessLog

    leaf = pki.issue(pki.make_ca("log root"), "client", 'a"b')
    peer = identity_from_der(leaf.cert.public_bytes(serialization.Encoding.DER))

    async def run() -> str:
        out = io.StringIO()
        for fmt in ("json", "text"):
            log = AccessLog(fmt, out)
            conn = log.connection_fields(peer, "127.0.0.1", 5555, "TLSv1.3", None, None)
            log.request(conn, "GET", "/\u202e\x00", 200, 200, "allow", None, 1.5, 0, 2, True)
            await asyncio.sleep(0)
        return out.getvalue()

    lines = asyncio.run(run()).splitlines()
    rec = _json.loads(lines[0])
    assert rec["msg"] == "access" and rec["peer"] == 'CN=a\\"b' and rec["path"] == "/\u202e\x00"
    assert rec["status"] == 200 and rec["rule"] is None and rec["aborted"] is True
    assert rec["duration_ms"] == 1.5 and rec["time"].endswith("Z") and rec["cipher"] is None
    assert lines[0].isascii()
    assert " INFO mtls_proxy.access: access client=127.0.0.1 client_port=5555 " in lines[1]
    assert " status=200 " in lines[1] and lines[1].isascii()


def test_request_metrics_exposition() -> None:
    from prometheus_client import generate_latest

    from mtls_proxy.telemetry.metrics import Metrics

    m = Metrics()
    m.request("allow", 200, 0.003)
    m.request("allow", 204, 100.0)
    m.request("deny", 403)
    text = generate_latest(m.registry).decode()
    assert 'mtls_proxy_requests_total{code="2xx",decision="allow"} 2.0' in text
    assert 'mtls_proxy_requests_total{code="4xx",decision="deny"} 1.0' in text
    assert 'mtls_proxy_request_duration_seconds_bucket{le="0.0025"} 0.0' in text
    assert 'mtls_proxy_request_duration_seconds_bucket{le="0.005"} 1.0' in text
    assert 'mtls_proxy_request_duration_seconds_bucket{le="30.0"} 1.0' in text
    assert 'mtls_proxy_request_duration_seconds_bucket{le="+Inf"} 2.0' in text
    assert "mtls_proxy_request_duration_seconds_count 2.0" in text
    assert "mtls_proxy_request_duration_seconds_sum 100.003" in text


def test_normalize_name_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtls_proxy.core import headers

    assert normalize_name(b"X_Cached") == normalize_name(b"X_Cached") == b"x-cached"
    monkeypatch.setattr(headers, "NAME_CACHE_MAX", 0)
    assert normalize_name(b"X-Never-Cached-Name") == b"x-never-cached-name"
    assert b"X-Never-Cached-Name" not in headers.NAME_CACHE


@pytest.mark.parametrize("action", ["drop", "reject", "allow"])
def test_lookalikes_are_never_interpreted_or_forwarded(action: UnderscoreAction) -> None:
    """INT-001/INT-005: an underscore spelling of a protected name is dropped and never read
    as the field it resembles; other underscore names follow the action."""
    rh = split_request_headers(
        [
            (b"Content-Length", b"5"),
            (b"Content_Length", b"0"),
            (b"Transfer_Encoding", b"chunked"),
            (b"Keep_Alive", b"x"),
            (b"X_Client_Subject", b"CN=forged"),
            (b"X_Forwarded_Prefix", b"/p"),
            (b"X-Original-URL", b"/admin"),
            (b"X-Forwarded-Anything", b"1"),
            (b"x_custom", b"1"),
            (b"X-Keep", b"1"),
        ],
        action,
    )
    assert rh.content_length == b"5" and rh.transfer_encoding == []
    kept = [name for _, name, _ in rh.kept]
    assert kept == ([b"x_custom", b"X-Keep"] if action == "allow" else [b"X-Keep"])
    expected = [
        b"Content_Length",
        b"Transfer_Encoding",
        b"Keep_Alive",
        b"X_Client_Subject",
        b"X_Forwarded_Prefix",
    ]
    assert [n for n in rh.underscored if n != b"x_custom"] == expected
    assert (b"x_custom" in rh.underscored) == (action != "allow")


def test_classify() -> None:
    assert classify(b"Content-Length")[1] == headers.LENGTH
    assert classify(b"content_length")[1] == headers.LOOKALIKE
    assert classify(b"X_Y")[1] == headers.UNDERSCORE
    assert classify(b"X-Rewrite-URL")[1] == headers.DROP
    assert classify(b"x-original-anything")[1] == headers.DROP
    assert protected(b"x-forwarded-port") and not protected(b"x-forward")
