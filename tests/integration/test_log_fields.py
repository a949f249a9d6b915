"""Issue 14 item 4: every log line keeps its fields (real proxy, real TLS clients)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtls_proxy.cli import pki
from mtls_proxy.core.identity import rfc2253
from mtls_proxy.telemetry.logs import AccessLog
from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Proxy,
    Upstream,
    client_ctx,
    connect,
    get,
    handshake_rejected,
    read_response,
    run_proxy,
)

POLICY = f"""
allow:
  - uri: {ALLOWED_URI}
routes:
  - path_prefix: /admin
    allow:
      - cn: client-other
"""


def _access(p: Proxy, n: int) -> list[dict[str, object]]:
    """The access records, once *n* of them are written (they leave in batches)."""
    deadline = time.monotonic() + 5
    while True:
        recs = [r for r in p.records() if r.get("msg") == "access"]
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


def test_a_denied_request_has_one_record_the_access_record_with_its_reason(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        good = client_ctx(tp, "good")
        assert get(p.port, good, "/admin/x")[0] == 403
        assert get(p.port, good, "/ok")[0] == 200
        denied, allowed = _access(p, 2)
        records = p.records()
    assert denied["decision"] == "deny" and denied["status"] == 403
    assert "route * /admin" in str(denied["reason"])
    assert allowed["decision"] == "allow" and allowed["reason"] is None
    # The access record is the only record of the denial.
    assert not [r for r in records if "denied" in str(r.get("msg"))], records


def test_an_audited_request_logs_its_reason_in_the_access_record_only(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "audit: true\n")
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        assert get(p.port, client_ctx(tp, "good"), "/admin")[0] == 200
        (rec,) = _access(p, 1)
        records = p.records()
    assert rec["decision"] == "audit" and "route * /admin" in str(rec["reason"])
    assert not [r for r in records if "audit:" in str(r.get("msg"))], records


def test_the_access_record_reason_is_escaped_in_text_and_json() -> None:
    async def run(fmt: str) -> str:
        out = io.StringIO()
        log = AccessLog(fmt, out)
        conn = log.connection_fields(None, "127.0.0.1")
        args = ("GET", "/", 403, 0, "deny", None, 1.0, 0, 0, False)
        log.request(conn, *args, reason='no rule "x"\nmatched')
        log.request(conn, *args[:4], "allow", "r", 1.0, 0, 0, False, reason=None)
        await asyncio.sleep(0)
        return out.getvalue()

    denied, allowed = (json.loads(line) for line in asyncio.run(run("json")).splitlines())
    assert denied["reason"] == 'no rule "x"\nmatched' and allowed["reason"] is None
    text = asyncio.run(run("text")).splitlines()
    assert len(text) == 2
    assert ' reason="no rule \\"x\\"\\x0amatched" ' in text[0], text[0]
    assert " reason=- " in text[1] and " upstream_status=- " in text[1], text[1]


def _failed(p: Proxy, n: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while True:
        recs = [r for r in p.records() if r.get("msg") == "handshake failed"]
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


@pytest.mark.parametrize("tls13", [True, False])
def test_handshake_failed_names_the_presented_leaf_sni_and_version(
    tp: Pki, upstream: Upstream, loop: str, tls13: bool
) -> None:
    leaf = x509.load_pem_x509_certificate(Path(tp.crt("expired")).read_bytes())
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        handshake_rejected(p.port, client_ctx(tp, "expired", tls13=tls13))
        handshake_rejected(p.port, client_ctx(tp, None, tls13=tls13))
        expired, anonymous = _failed(p, 2)
        logs = "".join(p.logs)
    version = "TLSv1.3" if tls13 else "TLSv1.2"
    assert expired["reason"] == "expired" and expired["sni"] == "localhost"
    assert expired["tls_version"] == version
    assert expired["peer_sha256"] == hashlib.sha256(tp.der("expired")).hexdigest()
    assert expired["peer"] == rfc2253(leaf.subject) == "CN=client-expired"
    assert expired["peer_issuer"] == rfc2253(leaf.issuer)
    assert anonymous["reason"] == "no_certificate" and anonymous["sni"] == "localhost"
    assert anonymous["tls_version"] == version and "peer_sha256" not in anonymous
    assert "BEGIN" not in logs and "PRIVATE" not in logs


def test_access_records_carry_request_id_client_port_tls_sni_and_upstream_ms(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        with connect(p.port, client_ctx(tp, "good", tls13=True)) as s:
            port = s.getsockname()[1]
            cipher = s.cipher()
            buf = bytearray()
            for extra in (
                "",
                "X-Request-Id: client.id-1\r\nx-request-id: two\r\n",
                "X-Request-Id: ok_2\r\n",
            ):
                s.sendall(f"GET /r HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode())
                assert read_response(s, buf)[0] == 200
        recs = _access(p, 3)
    sent = [seen.one("x-request-id") for seen in upstream.seen]
    assert [r["request_id"] for r in recs] == sent
    assert sent[2] == "ok_2"  # the client's, valid and alone: forwarded, no second copy
    ours = sent[:2]  # the proxy's (the second request sent two): one prefix per connection
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ours) and ours[0] != ours[1]
    assert ours[0][:12] == ours[1][:12]
    for r in recs:
        assert r["client_port"] == port and r["tls_version"] == "TLSv1.3"
        assert r["cipher"] == cipher[0] and r["sni"] == "localhost"
        assert isinstance(r["upstream_ms"], float) and 0 <= r["upstream_ms"] <= r["duration_ms"]


def test_a_denied_request_has_a_request_id_and_no_upstream_ms(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        assert get(p.port, client_ctx(tp, "other"), "/x")[0] == 403
        (rec,) = _access(p, 1)
    assert rec["upstream_ms"] is None and len(str(rec["request_id"])) == 16
    assert not upstream.seen


def test_an_upstream_error_record_names_the_upstream_the_kind_and_the_request(
    tp: Pki, loop: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        with run_proxy(tp, dead, loop=loop) as p:
            assert get(p.port, client_ctx(tp, "good"), "/x", "X-Request-Id: trace-7\r\n")[0] == 502
            (rec,) = _access(p, 1)
            (err,) = [r for r in p.records() if str(r.get("msg")).startswith("upstream")]
    assert err["msg"] == "upstream error" and err["upstream"] == dead
    assert err["kind"] == "connect" and err["stage"] == "head" and err["error"]
    assert err["request_id"] == rec["request_id"] == "trace-7"


def test_a_worker_restart_is_logged_with_fields(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--workers", "2") as p:
        ready = next(r for r in p.records() if r.get("msg") == "ready")
        victim = ready["workers"][0]  # type: ignore[index]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(r.get("msg") == "worker restarted" for r in p.records()):
                break
            time.sleep(0.1)
        records = p.records()
    (exited,) = [r for r in records if r.get("msg") == "worker exited; restarting"]
    (restarted,) = [r for r in records if r.get("msg") == "worker restarted"]
    assert exited["worker"] == 0 and exited["pid"] == victim
    assert exited["signal"] == "SIGKILL" and exited["exit_code"] is None
    assert restarted["worker"] == 0 and restarted["pid"] != victim and restarted["ready"] is True


def _expired(
    tp: Pki, tmp_path: Path, name: str, dns: list[str] | None = None, ou: list[str] | None = None
) -> tuple[str, bytes]:
    """An expired client leaf (so the handshake fails) written as NAME in *tmp_path*."""
    now = dt.datetime.now(dt.UTC)
    leaf = pki.issue(
        pki.load_issuer(tp.dir),
        "client",
        f"client-{name}",
        not_before=now - dt.timedelta(days=3),
        not_after=now - dt.timedelta(days=1),
        dns=dns or [],
        ou=ou or [],
    )
    pki.write_pair(tmp_path, name, leaf)
    return name, leaf.cert.public_bytes(serialization.Encoding.DER)


def test_handshake_failed_keeps_the_hash_of_a_huge_leaf_and_cuts_its_names(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """A leaf of tens of KB (many SANs, a huge subject) or too large to keep at all: the record
    always has peer_sha256; peer and peer_issuer are cut to 1024 characters and end in '...'."""
    names = [f"host{i:04d}-{'a' * 50}.example.test" for i in range(600)]
    cases = [
        _expired(tp, tmp_path, "many-sans", dns=names),  # ~45 KB, a short subject
        _expired(tp, tmp_path, "huge-subject", ou=[f"{'u' * 60}{i}" for i in range(600)]),
        _expired(tp, tmp_path, "too-large", dns=names + names[:400]),  # over 64 KiB: not kept
    ]
    assert 40_000 < len(cases[0][1]) < 65_536 < len(cases[2][1])
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        for name, _ in cases:
            ctx = client_ctx(tp, None)
            ctx.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
            handshake_rejected(p.port, ctx)
        many, huge, large = _failed(p, 3)
    for rec, (_, der) in zip((many, huge, large), cases, strict=True):
        assert rec["reason"] == "expired", rec
        assert rec["peer_sha256"] == hashlib.sha256(der).hexdigest(), rec
    assert many["peer"] == "CN=client-many-sans"
    peer = str(huge["peer"])
    assert len(peer) == 1024 + 3 and peer.endswith("...") and peer.startswith("CN=client-huge")
    assert (
        huge["peer_issuer"] == many["peer_issuer"] == rfc2253(pki.load_issuer(tp.dir).cert.subject)
    )
    assert large["peer"] is None and large["peer_issuer"] is None  # never parsed


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n", 400),  # llhttp refuses it
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),  # a line
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-N: 1\r\n" * 120 + b"\r\n", 431),  # --max-headers
        (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", 408),  # the head never ends: --header-timeout
    ],
    ids=["bad-header", "long-line", "too-many", "long-target", "pipelined", "slow-head"],
)
def test_a_request_refused_while_its_head_is_parsed_has_one_access_record(
    tp: Pki, upstream: Upstream, loop: str, payload: bytes, status: int
) -> None:
    """As nginx logs its 400s: the access record, with the peer, the client, a request id and
    the reason; and no second record of the same refusal."""
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--header-timeout", "0.5", loop=loop) as p:
        with connect(p.port, client_ctx(tp, "good")) as s:
            port = s.getsockname()[1]
            s.sendall(payload)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        n = 2 if payload.count(b"GET") == 2 else 1
        recs = _access(p, n)
        time.sleep(0.2)  # a second record of the same refusal would be written by now
        records = p.records()
    assert answer.rsplit(b"HTTP/1.1 ", 1)[1][:3] == str(status).encode()
    assert len(recs) == n and [r for r in records if r.get("msg") == "access"] == recs
    rec = recs[-1]
    assert rec["status"] == status and rec["decision"] == "deny" and rec["reason"]
    assert rec["peer_sha256"] == hashlib.sha256(tp.der("good")).hexdigest()
    assert rec["peer"] and rec["client"] == "127.0.0.1" and rec["client_port"] == port
    assert len(str(rec["request_id"])) == 16 and rec["upstream_status"] is None
    others = [r for r in records if r.get("msg") not in ("access", "ready", "stopped")]
    assert not [r for r in others if "request" in str(r.get("msg"))], others
