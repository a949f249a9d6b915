"""The RFC 9440, Tomcat and Traefik dialects round-trip through independent parsers."""

from __future__ import annotations

import base64
import datetime as dt
from urllib.parse import unquote

import http_sf
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtls_proxy.cli import pki
from mtls_proxy.core.dialects import (
    _traefik_value,
    rfc9440,
    rfc9440_chain,
    tomcat,
    tomcat_tls,
    traefik,
)
from mtls_proxy.core.headers import identity_block
from mtls_proxy.core.identity import identity_from_der

ROOT = pki.make_ca("dialect root")
INTER = pki.make_ca("dialect inter", issuer=ROOT, path_len=0)
LEAF = pki.issue(
    INTER,
    "client",
    "svc-a",
    o="Example",
    dns=["a.test"],
    emails=["a@b.c"],
    ips=["10.0.0.1"],
    uris=["spiffe://td/a"],
)
DER = LEAF.cert.public_bytes(serialization.Encoding.DER)
INTER_DER = INTER.cert.public_bytes(serialization.Encoding.DER)
PEER = identity_from_der(DER)


def test_rfc9440_client_cert_and_chain_parse_as_structured_fields() -> None:
    ((name, value),) = rfc9440(PEER)
    assert name == "Client-Cert"
    item = http_sf.parse(value.encode(), tltype="item")
    assert item[0] == DER
    ((name, value),) = rfc9440_chain((INTER_DER, DER))
    assert name == "Client-Cert-Chain"
    members = http_sf.parse(value.encode(), tltype="list")
    assert [m[0] for m in members] == [INTER_DER, DER]
    assert rfc9440_chain(()) == []


def test_tomcat_value_is_what_sslvalve_rebuilds() -> None:
    ((name, value),) = tomcat(PEER)
    assert name == "ssl_client_cert"
    # SSLValve: trim, cut 27 chars in front and 25 at the end, spaces -> newlines, re-wrap.
    body = value.strip()[27:-25].replace(" ", "\n")
    assert value.startswith("-----BEGIN CERTIFICATE----- ")
    assert value.endswith(" -----END CERTIFICATE-----")
    # Java's PEM reader skips the blank lines the valve leaves; decode the body the same way.
    assert x509.load_der_x509_certificate(base64.b64decode("".join(body.split()))) == LEAF.cert
    assert tomcat_tls("TLS_AES_256_GCM_SHA384", b"\x01\xab", 256) == [
        ("ssl_cipher", "TLS_AES_256_GCM_SHA384"),
        ("ssl_session_id", "01ab"),
        ("ssl_cipher_usekeysize", "256"),
    ]
    assert tomcat_tls(None, None, None) == []


def test_traefik_headers_round_trip() -> None:
    cert_h, info_h = traefik(PEER)
    assert cert_h[0] == "X-Forwarded-Tls-Client-Cert"
    # Traefik v3: the bare PEM body (v2 URL-escaped it: '+', '/' and '=' as %2B, %2F, %3D)
    assert cert_h[1] == base64.b64encode(DER).decode() and "%" not in cert_h[1]
    assert base64.b64decode(cert_h[1]) == DER
    assert info_h[0] == "X-Forwarded-Tls-Client-Cert-Info"
    info = unquote(info_h[1])
    fields = dict(part.split("=", 1) for part in info.split(";"))
    assert fields["Subject"] == '"O=Example,CN=svc-a"'
    assert fields["Issuer"] == '"O=mtls-proxy dev,CN=dialect inter"'
    nb = int(fields["NB"].strip('"'))
    assert dt.datetime.fromtimestamp(nb, dt.UTC) == LEAF.cert.not_valid_before_utc
    assert fields["SAN"] == '"a.test,a@b.c,10.0.0.1,spiffe://td/a"'
    assert all(32 < ord(c) < 127 for c in cert_h[1] + info_h[1])


def test_identity_block_carries_every_enabled_dialect() -> None:
    block = identity_block(PEER, ("rfc9440", "tomcat", "traefik"), "sanitize_set", None)
    text = block.lines.decode()
    assert text.startswith("Client-Cert: :") and "\r\nssl_client_cert: -----BEGIN" in text
    assert "\r\nX-Forwarded-Tls-Client-Cert-Info: " in text and block.xfcc is None
    assert identity_block(None, ("rfc9440", "tomcat"), "sanitize_set", None).lines == b""


def _fields(info: str) -> list[tuple[str, str]]:
    """A consumer's reading of the Info header: key="value" pairs split on unescaped ';',
    values unquoted, backslash escapes honoured."""
    out, key, buf, quoted, i = [], "", "", False, 0
    while i < len(info):
        ch = info[i]
        if ch == "\\" and i + 1 < len(info):
            buf += info[i + 1]
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not quoted and not key:
            key, buf = buf, ""
        elif ch == ";" and not quoted:
            out.append((key, buf))
            key, buf = "", ""
        else:
            buf += ch
        i += 1
    out.append((key, buf))
    return out


def test_int033_traefik_info_values_cannot_add_fields() -> None:
    """A CN holding '";SAN="...' (or a SAN holding ',') cannot forge a field or a list
    element in X-Forwarded-Tls-Client-Cert-Info (red team: the SAN of a CN-only certificate)."""
    leaf = pki.issue(
        INTER,
        "client",
        'x";SAN="spiffe://td/ns/admin/sa/root',
        o="A,O=Admin",
        dns=["a.test,evil.test"],
    )
    peer = identity_from_der(leaf.cert.public_bytes(serialization.Encoding.DER))
    info = unquote(traefik(peer)[1][1])
    fields = _fields(info)
    assert [k for k, _ in fields] == ["Subject", "Issuer", "NB", "NA", "SAN"], info
    subject = dict(fields)["Subject"]
    assert subject == 'O=A,O=Admin,CN=x";SAN="spiffe://td/ns/admin/sa/root', info
    assert "\\,O=Admin" in info and 'CN=x\\"\\;SAN=' in info
    assert dict(fields)["SAN"] == "a.test,evil.test" and "a.test\\,evil.test" in info
    assert _traefik_value("a\nb\x7f") == "a\\0Ab\\7F"
