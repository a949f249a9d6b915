"""handshakes.py: the ClientHello and Certificate parsers and the capture callback."""

from __future__ import annotations

import contextvars
import logging
import ssl

import pytest

from mtls_proxy import handshakes
from mtls_proxy.handshakes import Seen, certificate_leaf, client_hello_sni, leaf_fields
from mtls_proxy.logs import TextFormatter


def _client_hello(sni: str | None) -> bytes:
    """A real ClientHello, as the server reads it (its 4-byte handshake header first)."""
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    if sni is None:
        ctx.check_hostname = False
        obj = ctx.wrap_bio(ssl.MemoryBIO(), out)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    record = out.read()
    return record[5 : 5 + int.from_bytes(record[3:5], "big")]


def test_client_hello_sni() -> None:
    assert client_hello_sni(_client_hello("api.example.test")) == "api.example.test"
    assert client_hello_sni(_client_hello(None)) is None
    with pytest.raises(ValueError, match="truncated"):
        client_hello_sni(_client_hello("a.test")[:40])


def test_client_hello_sni_other_name_type_and_raw_bytes() -> None:
    hello = _client_hello("abc.test")
    at = hello.index(b"abc.test")
    assert client_hello_sni(hello[: at - 3] + b"\x01" + hello[at - 2 :]) is None
    forged = hello[:at] + b"a\nb\xff.tes" + hello[at + 8 :]
    assert client_hello_sni(forged) == "a\nb\\xff.tes"


def test_certificate_leaf() -> None:
    der = b"\x30\x03\x02\x01\x01"
    entry = len(der).to_bytes(3, "big") + der
    tls12 = b"\x0b\x00\x00\x00" + len(entry).to_bytes(3, "big") + entry
    assert certificate_leaf(tls12, tls13=False) == der
    tls13 = b"\x0b\x00\x00\x00\x00" + (len(entry) + 2).to_bytes(3, "big") + entry + b"\x00\x00"
    assert certificate_leaf(tls13, tls13=True) == der
    assert certificate_leaf(b"\x0b\x00\x00\x04\x00\x00\x00\x00", tls13=True) is None
    with pytest.raises(ValueError, match="bad certificate entry"):
        certificate_leaf(tls12[:-1], tls13=False)


def test_leaf_fields_of_garbage_is_the_hash_alone() -> None:
    out = leaf_fields(b"not a certificate")
    assert out["peer"] is None and out["peer_issuer"] is None and len(str(out["peer_sha256"])) == 64


def test_seen_fields() -> None:
    seen = Seen()
    assert seen.fields() == {"sni": None, "tls_version": None}
    seen.version, seen.sni = 0x7F1C, "x"
    assert seen.fields() == {"sni": "x", "tls_version": "0x7f1c"}


def test_the_callback_captures_only_in_a_watched_handshake_and_never_raises() -> None:
    hello = _client_hello("a.test")
    on = handshakes._on_message
    on(None, "read", 0x0303, 22, 1, hello)  # no Seen set: nothing to do

    def run() -> Seen:
        seen = Seen()
        handshakes.SEEN.set(seen)
        on(None, "write", 0x0303, 22, 1, hello)  # written: ignored
        on(None, "read", 0x0303, 256, 22, b"\x16\x03\x03")  # a record header: ignored
        on(None, "read", 0x0303, 22, 1, hello)
        on(None, "read", 0x0304, 22, 11, b"\x0b\x00")  # malformed: swallowed
        on(None, "read", 0x0304, 22, 15, b"\x0f")  # CertificateVerify: the version
        seen.done = True
        on(None, "read", 0x0303, 22, 1, _client_hello("b.test"))  # after the handshake
        return seen

    seen = contextvars.copy_context().run(run)
    assert seen.sni == "a.test" and seen.version == 0x0304 and seen.leaf is None


def test_watch_installs_once() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    handshakes.watch(ctx)
    handshakes.watch(ctx)
    assert ctx.__dict__["_mtls_watched"] is True


def test_hostile_fields_stay_on_one_text_line() -> None:
    record = logging.LogRecord(
        "mtls_proxy.server", logging.INFO, "", 0, "handshake failed", (), None
    )
    record.__dict__.update({"sni": "a\nb", "peer": "CN=x\u202e\r\n2099-01-01 forged"})
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u202e" not in line
    assert "sni=a\\x0ab" in line and "\\u202e" in line
