"""Allowed/denied clients, identity headers as the upstream sees them, handshake failures."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Upstream,
    client_ctx,
    get,
    handshake_rejected,
    request,
    run_proxy,
)


def openssl_subject(path: str) -> str:
    """The RFC 2253 subject as the openssl CLI prints it (an independent oracle)."""
    out = subprocess.run(
        ["openssl", "x509", "-in", path, "-noout", "-subject", "-nameopt", "RFC2253"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return out.removeprefix("subject=").rstrip("\n")


def der_sha256(path: str) -> str:
    der = subprocess.run(
        ["openssl", "x509", "-in", path, "-outform", "DER"], capture_output=True, check=True
    ).stdout
    return hashlib.sha256(der).hexdigest()


def test_allowed_client_gets_upstream_answer_and_identity(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        body = b"x" * 1000 + b"\x00\xff"
        raw = (
            b"POST /echo/path?q=1&r=%20x HTTP/1.1\r\nHost: api.internal:8443\r\n"
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\nX-Custom: kept\r\n\r\n"
            + body
        )
        status, headers, resp = request(p.port, client_ctx(tp, "good"), raw)
    assert status == 200
    echo = json.loads(resp)
    seen = upstream.seen[0]
    # Byte for byte: the body the client got is the one the upstream wrote.
    assert (
        resp
        == json.dumps(
            {
                "method": "POST",
                "target": "/echo/path?q=1&r=%20x",
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "headers": seen.headers,
            }
        ).encode()
    )
    assert echo["method"] == "POST" and seen.target == "/echo/path?q=1&r=%20x"
    assert seen.body_len == len(body) and seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.one("host") == "api.internal:8443"
    assert seen.one("x-custom") == "kept"
    assert seen.one("x-forwarded-for") == "127.0.0.1"
    assert seen.one("x-forwarded-proto") == "https"
    assert seen.one("x-forwarded-host") == "api.internal:8443"
    subject = openssl_subject(tp.crt("good"))
    sha = der_sha256(tp.crt("good"))
    assert subject == "CN=client-good,O=Example Corp"
    assert seen.one("x-forwarded-client-cert") == (
        f'By=spiffe://test.local/proxy;Hash={sha};Subject="{subject}";URI={ALLOWED_URI};'
        "DNS=client.test;DNS=alt.client.test"
    )
    assert seen.one("x-client-subject") == subject
    assert seen.one("x-client-cert-sha256") == sha
    assert seen.one("x-client-spiffe-id") == ALLOWED_URI
    assert seen.one("x-client-dns") == "client.test,alt.client.test"
    assert seen.one("x-client-verified") == "SUCCESS"
    # Response hop-by-hop headers from the upstream never reach the client.
    assert headers["x-upstream"] == "1"
    assert "x-hop" not in headers and "keep-alive" not in headers


def test_trusted_but_not_allowed_gets_403_json(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        status, headers, body = get(p.port, client_ctx(tp, "other"))
    assert status == 403
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["error"] == "forbidden" and doc["reason"]
    assert upstream.seen == []  # never forwarded


# The alert each client reads (ssl_verify_alarm_type in OpenSSL): the reason, not an empty reply.
REFUSED_WITH = {
    (None, True): "CERTIFICATE_REQUIRED",
    (None, False): "HANDSHAKE_FAILURE",
    ("rogue", None): "UNKNOWN_CA",
    ("expired", None): "CERTIFICATE_EXPIRED",
    ("server_eku", None): "UNSUPPORTED_CERTIFICATE",
    ("good_leaf_only", None): "UNKNOWN_CA",
}


@pytest.mark.parametrize("client", [None, "rogue", "expired", "server_eku", "good_leaf_only"])
@pytest.mark.parametrize("tls13", [True, False])
def test_untrusted_clients_fail_the_handshake_and_read_the_alert(
    tp: Pki, upstream: Upstream, loop: str, client: str | None, tls13: bool
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        how = handshake_rejected(p.port, client_ctx(tp, client, tls13=tls13))
        metrics = p.admin_get("/metrics")[1]
    expected = REFUSED_WITH.get((client, tls13)) or REFUSED_WITH[(client, None)]
    assert how == expected
    assert upstream.seen == []
    assert 'mtls_proxy_handshakes_total{reason="' in metrics
    expected = {
        None: "no_certificate",
        "rogue": "unknown_ca",
        "expired": "expired",
        "server_eku": "bad_certificate",
        "good_leaf_only": "unknown_ca",
    }[client]
    assert f'mtls_proxy_handshakes_total{{reason="{expected}",result="failed"}} 1.0' in metrics


def test_client_issued_by_root_directly_and_by_intermediate(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        assert get(p.port, client_ctx(tp, "direct"))[0] == 200
        assert get(p.port, client_ctx(tp, "good"))[0] == 200


def test_subject_with_crlf_and_quotes_is_escaped(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--allow-all") as p:
        assert get(p.port, client_ctx(tp, "evil"))[0] == 200
        assert get(p.port, client_ctx(tp, "quote"))[0] == 200
    evil, quote = upstream.seen
    assert evil.one("x-client-subject") == openssl_subject(tp.crt("evil"))
    assert evil.one("x-client-subject") == r"CN=evil\0D\0AX-Client-Subject: CN=admin"
    assert len(evil.get("x-client-subject")) == 1
    assert quote.one("x-client-subject") == openssl_subject(tp.crt("quote"))
    assert quote.one("x-client-subject") == r"CN=a\"b\,c\;d=e\\f,O=Org\, Inc."
    xfcc = quote.one("x-forwarded-client-cert")
    assert r'Subject="CN=a\"b\,c\;d=e\\f,O=Org\, Inc."' in xfcc
    assert 'URI="spiffe://test.local/a;By=spiffe://admin,Hash=00"' in xfcc
