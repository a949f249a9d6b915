"""handshakes.py: the ClientHello and Certificate parsers and the capture callback."""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import logging
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtls_proxy.dataplane import handshakes
from mtls_proxy.dataplane.handshakes import Seen, certificate_leaf, client_hello_sni, leaf_fields
from mtls_proxy.telemetry.logs import TextFormatter


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
    assert client_hello_sni(forged) == "a\nb\xff.tes"  # one character per byte, unescaped
    typed = hello[:at] + b"a\\xff.ts" + hello[at + 8 :]  # the text a\xff.ts, as typed
    assert client_hello_sni(typed) == "a\\xff.ts"


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


def _self_signed(ou: list[str]) -> bytes:
    """A self-signed certificate (its issuer is its subject) with these OUs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "big")]
        + [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in ou]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_leaf_fields_cut_a_long_subject_and_issuer_and_keep_the_hash() -> None:
    der = _self_signed([f"unit-{i:03d}-" + "x" * 40 for i in range(100)])
    out = leaf_fields(der)
    assert out["peer_sha256"] == hashlib.sha256(der).hexdigest()
    for key in ("peer", "peer_issuer"):
        value = str(out[key])
        assert len(value) == 1024 + 3 and value.endswith("...") and value.startswith("OU=unit-099-")
    short = leaf_fields(_self_signed(["a"]))
    assert short["peer"] == short["peer_issuer"] == "OU=a,CN=big"


def test_cut() -> None:
    cut = handshakes.cut
    assert cut("x" * 1024) == "x" * 1024
    assert cut("x" * 1025) == "x" * 1024 + "..."
    assert cut("CN=a...") == "CN=a..."  # shorter than any cut value: not read as one


def test_a_leaf_too_large_to_keep_is_hashed_as_it_passes() -> None:
    der = b"\x30" + b"\x00" * (64 * 1024)
    entry = len(der).to_bytes(3, "big") + der
    msg = b"\x0b\x00\x00\x00\x00" + len(entry).to_bytes(3, "big") + entry

    def run(data: bytes) -> Seen:
        seen = Seen()
        handshakes.SEEN.set(seen)
        handshakes._on_message(None, "read", 0x0304, 22, 11, data)
        return seen

    seen = contextvars.copy_context().run(run, msg)
    assert seen.leaf is None and seen.leaf_sha256 == hashlib.sha256(der).hexdigest()
    assert seen.fields()["peer_sha256"] == seen.leaf_sha256
    assert seen.fields()["peer"] is None and seen.fields()["peer_issuer"] is None
    small = contextvars.copy_context().run(run, msg[:5] + b"\x00\x00\x09\x00\x00\x04" + der[:4])
    assert small.leaf == der[:4] and small.leaf_sha256 is None


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
