"""Every dialect through the real proxy, and the identity-size limit failing closed."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import unquote

import http_sf
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers import Pki, Upstream, client_ctx, get, run_proxy


def test_all_dialects_reach_the_upstream(tp: Pki, upstream: Upstream, loop: str) -> None:
    spoof = (
        "Client-Cert: :AAAA:\r\nClient-Cert-Chain: :AAAA:\r\nssl_cipher: NULL\r\n"
        "X-Forwarded-Tls-Client-Cert: x\r\nX_Forwarded_Tls_Client_Cert_Info: x\r\n"
    )
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--identity-headers",
        "xfcc,simple,rfc9440,tomcat,traefik",
        loop=loop,
    ) as p:
        assert get(p.port, client_ctx(tp, "good"), headers=spoof)[0] == 200
    seen = upstream.seen[0]
    der = x509.load_pem_x509_certificates(Path(tp.crt("good")).read_bytes())[0].public_bytes(
        serialization.Encoding.DER
    )
    assert http_sf.parse(seen.one("client-cert").encode(), tltype="item")[0] == der
    # Client-Cert-Chain lists what the client sent after its leaf: the intermediate.
    inter = x509.load_pem_x509_certificates(Path(tp.crt("good")).read_bytes())[1]
    (chain,) = http_sf.parse(seen.one("client-cert-chain").encode(), tltype="list")[:1]
    assert chain[0] == inter.public_bytes(serialization.Encoding.DER)
    assert seen.one("ssl_client_cert").startswith("-----BEGIN CERTIFICATE----- ")
    assert seen.one("ssl_cipher").startswith("TLS_")
    assert int(seen.one("ssl_cipher_usekeysize")) >= 128
    assert base64.b64decode(unquote(seen.one("x-forwarded-tls-client-cert"))) == der
    assert 'Subject="O=Example Corp,CN=client-good"' in unquote(
        seen.one("x-forwarded-tls-client-cert-info")
    )
    assert seen.get("x_forwarded_tls_client_cert_info") == []
    assert len(seen.get("x-forwarded-client-cert")) == 1


def test_identity_headers_over_the_limit_fail_closed(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--identity-headers",
        "xfcc,tomcat",
        "--max-identity-header-bytes",
        "300",
    ) as p:
        status, _, body = get(p.port, client_ctx(tp, "good"))
    assert status == 431 and b"identity_headers_too_large" in body
    assert upstream.seen == []
    assert any("max-identity-header-bytes" in line for line in p.logs)
