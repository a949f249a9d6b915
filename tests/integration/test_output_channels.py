"""Certificate values on the output channels (escape.py): a SAN holding a line break, ESC or a
bidi control cannot forge a text log record or a line of ``mtls-proxy explain``."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtls_proxy.cli import pki
from tests.helpers import Pki, Upstream, connect, proxy_cmd, read_response

FORGED_RECORD = (
    "2099-01-01T00:00:00.000Z INFO mtls_proxy.access: client=10.0.0.1 peer_sha256=00 "
    'peer="CN=admin" spiffe_id=spiffe://test.local/ns/admin method=GET path=/admin '
    "status=200 decision=allow"
)
# What a raw certificate value must never put on a terminal or in a log line.
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _client_with_sans(issuer: pki.Issued, sans: list[x509.GeneralName]) -> pki.Issued:
    """A client certificate with SAN values that x509's constructors would refuse: written as
    they are (IA5String bytes), as a hostile CA or a sloppy one can issue them."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-hostile")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return pki.Issued(cert, key, (issuer.cert, *issuer.chain))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_int060_lf_in_a_spiffe_id_does_not_forge_a_text_log_record(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """INT-060: --log-format text writes one record per request; the SAN's LF is escaped."""
    uri = "spiffe://test.local/ns/x\n" + FORGED_RECORD
    hostile = pki.issue(pki.load_issuer(tp.dir), "client", "client-hostile", uris=[uri])
    pki.write_pair(tmp_path, "hostile", hostile)
    port = _free_port()
    proc = subprocess.Popen(
        proxy_cmd(
            *("serve", "--listen", f"127.0.0.1:{port}", "--admin", "off"),
            *("--upstream", f"http://127.0.0.1:{upstream.port}", "--allow-all"),
            *("--cert", tp.crt("server"), "--key", tp.key("server"), "--cacert", tp.ca),
            *("--log-format", "text"),
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    pump = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    pump.start()
    try:
        ctx = ssl.create_default_context(cafile=tp.ca)
        ctx.load_cert_chain(str(tmp_path / "hostile.crt"), str(tmp_path / "hostile.key"))
        deadline = time.monotonic() + 20
        while not any(" ready" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        statuses = []
        for path in ("/one", "/two"):
            with connect(port, ctx) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                statuses.append(read_response(s, bytearray())[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        pump.join(5)
    log = "".join(lines)
    access = [line for line in log.splitlines() if " INFO mtls_proxy.access: " in line]
    assert len(access) == len(statuses) == 2, log  # one record per request, no forged one
    assert not any(line.startswith("2099-") for line in log.splitlines()), log
    for line in access:
        assert 'spiffe_id="spiffe://test.local/ns/x\\x0a2099-01-01' in line, line
        assert "path=/one" in line or "path=/two" in line
    assert not RAW.search(log.replace("\n", "")), log


def test_int061_explain_prints_no_raw_control_or_bidi_from_a_san(tp: Pki, tmp_path: Path) -> None:
    """INT-061: SANs with CR, ESC and U+202E cannot print a fake ``decision:`` line."""
    fake = "decision:     ALLOWED (rule admin) for GET /admin"
    uri = f"spiffe://test.local/ns/x\r{fake}\x1b[2K\u202e"
    dns = f"a.test\r\n{fake}\x1b]0;title\x07\u202e\u2066"
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier._init_without_validation(uri),
        x509.DNSName._init_without_validation(dns),
    ]
    hostile = _client_with_sans(pki.load_issuer(tp.dir), sans)
    cert = tmp_path / "hostile.crt"
    cert.write_bytes(hostile.cert_pem())
    assert "\u202e".encode() in hostile.cert.public_bytes(serialization.Encoding.DER)
    r = subprocess.run(
        proxy_cmd(
            *("explain", "--cert", str(cert), "--cacert", tp.ca),
            *("--upstream", "http://127.0.0.1:9", "--allow-uri", "spiffe://test.local/ok"),
        ),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=60,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    out = r.stdout
    assert not RAW.search(out.replace("\n", "")), repr(out)
    # splitlines() breaks at CR, VT, FF, U+2028 ... as a terminal or a reader might.
    decisions = [line for line in out.splitlines() if line.lstrip().startswith("decision:")]
    assert len(decisions) == 1 and "DENIED 403" in decisions[0], repr(out)
    assert "SAN uri:" in out and "\\x0ddecision:" in out and "\\x1b[2K\\u202e" in out
    assert "SAN dns:" in out and "\\x0d\\x0adecision:" in out and "\\u2066" in out
