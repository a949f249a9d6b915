"""Issue 14 item 1: ``mtls-proxy explain`` gives the answer a handshake gives, reason included.

Every certificate of the fixture zoos (tests/security/test_tls.py build_zoo, tests/helpers.py
make_test_pki, plus our own ``pki``'s CN-only and revoked clients) is put, under several listener
configurations, through three verdicts that must be identical:

* ``explain --client-cert`` (subprocess; the chain alone),
* ``explain --client-cert --client-key`` (subprocess; a whole in-memory handshake),
* a real TLS client against ``serve`` (subprocess): accepted = the upstream answered 200
  (--allow-all), refused = the reason label that moved in mtls_proxy_handshakes_total.

Then a subset of the C2SP x509-limbo vectors (tests/data/x509-limbo) goes through ``explain`` and
a ``serve`` whose CA bundle is swapped by SIGHUP for each vector; the two must agree. A bundle the
listener refuses to load (anchors.py rule 1) must be one explain refuses too (exit 2).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtls_proxy.cli import main as cli
from mtls_proxy.cli import pki
from mtls_proxy.core.config import load_config
from mtls_proxy.material.verify import (
    VerifierError,
    certificate_records,
    check_chain,
    listener_context,
)
from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    alert_name,
    make_test_pki,
    proxy_cmd,
    refused_after_handshake,
    run_proxy,
)
from tests.security import certs as c
from tests.security.test_tls import Zoo, build_zoo

LIMBO = Path(__file__).parent.parent / "data" / "x509-limbo" / "limbo-client-subset.json"
_FAILED = re.compile(r'^mtls_proxy_handshakes_total\{reason="(\w+)",result="failed"\} (\S+)$')
_RELOADS = re.compile(r'^mtls_proxy_reloads_total\{result="(\w+)"\} (\S+)$')


# -- the three verdicts ----------------------------------------------------------------------
def explain_verdict(
    config: Sequence[str], crt: str, key: str | None = None, in_process: bool = False
) -> str:
    """'accepted', 'refused:<reason>', or 'error' (exit 2: the configuration was refused).

    *in_process* calls the same entry point (cli.main) without the interpreter's start-up."""
    args = ["explain", "--client-cert", crt, *(["--client-key", key] if key else []), *config]
    if in_process:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
        stdout, stderr = out.getvalue(), err.getvalue()
    else:
        r = subprocess.run(proxy_cmd(*args), capture_output=True, text=True, timeout=60)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    if code == 2:
        return "error"
    lines = [x for x in stdout.splitlines() if x.startswith("handshake:")]
    assert len(lines) == 1, stdout + stderr
    m = re.match(r"handshake:\s+(accepted|refused, reason (\w+))", lines[0])
    assert m is not None, lines[0]
    if m.group(2) is None:
        return "accepted"
    # What the client reads: "client reads: TLS alert unknown_ca" or "client reads: HTTP 403".
    reads = [
        x.split(":", 1)[1].strip() for x in stdout.splitlines() if x.startswith("client reads:")
    ]
    alert = reads[0].removeprefix("TLS alert ") if reads else "nothing"
    return f"refused:{m.group(2)}:{alert}"


def _failures(proxy: Proxy) -> dict[str, float]:
    out = {}
    for line in proxy.admin_get("/metrics")[1].splitlines():
        m = _FAILED.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def handshake_verdict(proxy: Proxy, server_ca: str, crt: str, key: str, tls12: bool = False) -> str:
    """A real client against the listener: 'accepted' or 'refused:<counted reason>'."""
    before = _failures(proxy)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(server_ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client imposes nothing: the listener decides
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(crt, key)
    except ssl.SSLError:
        return "client-cannot-load"
    out = b""
    alert = "nothing"
    try:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"GET / HTTP/1.1\r\nHost: parity.test\r\nConnection: close\r\n\r\n")
            while chunk := s.recv(65536):
                out += chunk
    except ssl.SSLError as exc:
        alert = alert_name(exc).lower()
    except OSError:
        pass
    if out.startswith(b"HTTP/1.1 200"):
        return "accepted"
    # Refused by a check after the handshake: a 403 naming the reason, counted the same way.
    assert not out or refused_after_handshake(out), out[:200]
    if out:
        alert = "HTTP 403"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the counter moves as the listener closes
        after = _failures(proxy)
        moved = [r for r, n in after.items() if n > before.get(r, 0)]
        if moved:
            assert len(moved) == 1, moved
            return f"refused:{moved[0]}:{alert}"
        time.sleep(0.02)
    raise AssertionError("refused, but no handshake failure was counted")


# -- the zoo ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """One listener configuration and the client certificates put through it."""

    name: str
    server_ca: str  # what the test client verifies the listener with
    config: list[str]  # options given to serve and to explain alike
    clients: dict[str, tuple[str, str]]  # label -> (cert, key)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("parity-zoo"))


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return our_pki(tmp_path_factory.mktemp("parity-pki"))


def our_pki(d: Path) -> Pki:
    """make_test_pki plus a CN-only client of our own pki, a revoked one, and CRL files: both
    CAs' (fresh), both CAs' past their nextUpdate, the intermediate's only."""
    tp = make_test_pki(d)
    issuer = pki.load_issuer(tp.dir)
    pki.write_pair(tp.dir, "cnonly", pki.issue(issuer, "client", "cn-only-client"))
    pki.write_pair(tp.dir, "revoked", pki.issue(issuer, "client", "revoked-client"))
    pki.revoke(tp.dir, "revoked")
    fresh = (tp.dir / "crl.pem").read_bytes()
    first = fresh.index(b"-----END X509 CRL-----") + len(b"-----END X509 CRL-----\n")
    (tp.dir / "inter-crl.pem").write_bytes(fresh[:first])  # pki.revoke writes it first
    pki.revoke(tp.dir, "revoked", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=8))
    (tp.dir / "stale-crl.pem").write_bytes((tp.dir / "crl.pem").read_bytes())
    (tp.dir / "crl.pem").write_bytes(fresh)
    return tp


def _setups(zoo: Zoo, tp: Pki, tmp: Path) -> list[Setup]:
    inter_only = tmp / "inter-only.crt"
    inter_only.write_bytes(c.pem(zoo.inter.cert))
    zoo_server = ["--cert", zoo.files["server"][0], "--key", zoo.files["server"][1]]
    all_zoo = {k: v for k, v in zoo.files.items() if k != "server"}

    def pick(*labels: str) -> dict[str, tuple[str, str]]:
        return {k: zoo.files[k] for k in labels}

    ours_server = ["--cert", tp.crt("server"), "--key", tp.key("server"), "--cacert", tp.ca]
    names = (
        "good",
        "other",
        "expired",
        "server_eku",
        "evil",
        "quote",
        "direct",
        "good_leaf_only",
        "rogue",
        "cnonly",
        "revoked",
    )
    pki_clients = {n: (tp.crt(n), tp.key(n)) for n in names}
    crl = str(tp.dir / "crl.pem")
    stale = str(tp.dir / "stale-crl.pem")
    inter_crl = str(tp.dir / "inter-crl.pem")  # no CRL of the root: chain mode fails closed
    few = {n: pki_clients[n] for n in ("good", "direct", "revoked", "cnonly")}
    return [
        Setup("zoo", zoo.ca, [*zoo_server, "--cacert", zoo.ca], all_zoo),
        Setup(
            "zoo strict",
            zoo.ca,
            [*zoo_server, "--cacert", zoo.ca, "--strict-client-certs"],
            pick("good", "via_int", "no_eku", "ca_true", "expired"),
        ),
        Setup(
            "zoo TLS 1.3 only",
            zoo.ca,
            [*zoo_server, "--cacert", zoo.ca, "--min-tls-version", "1.3"],
            pick("good", "expired", "serverauth_only", "via_int_not_sent"),
        ),
        *(
            Setup(
                f"zoo intermediate-only bundle, anchors {mode}",
                zoo.ca,
                [*zoo_server, "--cacert", str(inter_only), "--trust-anchors", mode],
                pick(
                    "good",
                    "via_int",
                    "via_int_not_sent",
                    "via_int_junk",
                    "pathlen_violation",
                    "nc_violation",
                ),
            )
            for mode in ("any", "roots")
        ),
        Setup("pki", tp.ca, ours_server, pki_clients),
        Setup("pki crl chain", tp.ca, [*ours_server, "--crl", crl], pki_clients),
        Setup("pki crl leaf", tp.ca, [*ours_server, "--crl", crl, "--crl-check", "leaf"], few),
        Setup("pki root crl missing", tp.ca, [*ours_server, "--crl", inter_crl], few),
        Setup(
            "pki root crl missing, leaf mode",
            tp.ca,
            [*ours_server, "--crl", inter_crl, "--crl-check", "leaf"],
            few,
        ),
        Setup("pki stale crl reject", tp.ca, [*ours_server, "--crl", stale], few),
        *(
            Setup(
                f"pki intermediate-only bundle, crl leaf, {expired}",
                tp.ca,
                [
                    *ours_server[:4],
                    *("--cacert", str(tp.dir / "intermediate.crt"), "--crl", crl_file),
                    *("--crl-check", "leaf", "--crl-expired", expired),
                ],
                few,
            )
            for crl_file, expired in ((crl, "reject"), (stale, "allow"))
        ),
        Setup(
            "pki stale crl allow",
            tp.ca,
            [*ours_server, "--crl", stale, "--crl-expired", "allow"],
            few,
        ),
    ]


@dataclass
class Row:
    setup: str
    label: str
    keyless: str
    keyed: str
    listener: str


def run_zoo(zoo: Zoo, tp: Pki, tmp: Path, up: Upstream) -> list[Row]:
    rows = []
    url = f"http://127.0.0.1:{up.port}"
    with ThreadPoolExecutor(2) as pool:  # explain runs while the listener is tried
        for s in _setups(zoo, tp, tmp):
            config = [*s.config, "--upstream", url, "--allow-all"]
            asked = {
                label: (
                    pool.submit(explain_verdict, config, crt),
                    pool.submit(explain_verdict, config, crt, key),
                )
                for label, (crt, key) in s.clients.items()
            }
            with run_proxy(tp, url, *s.config, "--allow-all", extra_cert_args=False) as p:
                for label, (crt, key) in s.clients.items():
                    listener = handshake_verdict(p, s.server_ca, crt, key)
                    keyless, keyed = (f.result() for f in asked[label])
                    rows.append(Row(s.name, label, keyless, keyed, listener))
    return rows


def test_explain_gives_the_listeners_verdict_and_reason_for_every_zoo_certificate(
    zoo: Zoo, ours: Pki, tmp_path: Path, upstream: Upstream
) -> None:
    rows = run_zoo(zoo, ours, tmp_path, upstream)
    differ = [r for r in rows if not r.keyless == r.keyed == r.listener]
    assert not differ, "\n".join(map(str, differ))
    assert len(rows) >= 80
    seen = {":".join(r.listener.split(":")[:2]) for r in rows}  # without the alert
    # The comparison covers every kind of answer the listener gives a presented certificate.
    assert {
        "accepted",
        "refused:unknown_ca",
        "refused:expired",
        "refused:revoked",
        "refused:bad_certificate",
        "refused:protocol",
        "refused:other",
    } <= seen, seen
    by = {(r.setup, r.label): r.listener for r in rows}
    # The two disagreements found in issue 14, now one answer each:
    assert by[("pki", "cnonly")] == "accepted"  # CN-only: was UNTRUSTED in explain
    assert by[("zoo intermediate-only bundle, anchors any", "via_int")] == "accepted"
    roots = by[("zoo intermediate-only bundle, anchors roots", "via_int")]
    assert roots == "refused:unknown_ca:unknown_ca"


# -- x509-limbo ------------------------------------------------------------------------------
def _limbo_cases() -> list[dict[str, object]]:
    return list(json.loads(LIMBO.read_text())["testcases"])


def _reloads(proxy: Proxy) -> dict[str, float]:
    out = {}
    for line in proxy.admin_get("/metrics")[1].splitlines():
        m = _RELOADS.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _reload(proxy: Proxy) -> str:
    """SIGHUP and wait: 'success' or 'failure'."""
    before = _reloads(proxy)
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _reloads(proxy)
        for result in ("success", "failure"):
            if after.get(result, 0) > before.get(result, 0):
                return result
        time.sleep(0.02)
    raise AssertionError("no reload was counted")


@dataclass
class LimboRow:
    id: str
    expected: str
    keyless: str
    listener_tls12: str  # what the keyless answer is: a client that presents the chain
    keyed: str
    listener: str  # the same client stack as explain --client-key


def run_limbo(tp: Pki, tmp: Path, up: Upstream) -> list[LimboRow]:
    bundle, chain, key = tmp / "limbo-ca.pem", tmp / "limbo-chain.pem", tmp / "limbo-key.pem"
    bundle.write_bytes(Path(tp.ca).read_bytes())
    base = ["--cert", tp.crt("server"), "--key", tp.key("server"), "--cacert", str(bundle)]
    url = f"http://127.0.0.1:{up.port}"
    config = [*base, "--upstream", url, "--allow-all"]
    rows = []
    with run_proxy(tp, url, *base, "--allow-all", extra_cert_args=False) as p:
        for case in _limbo_cases():
            bundle.write_text("".join(case["trusted_certs"]))  # type: ignore[arg-type]
            chain.write_text(
                str(case["peer_certificate"]) + "".join(case["untrusted_intermediates"])  # type: ignore[arg-type]
            )
            key.write_text(str(case["peer_certificate_key"]))
            loaded = _reload(p)
            keyless = explain_verdict(config, str(chain), in_process=True)
            keyed = explain_verdict(config, str(chain), str(key), in_process=True)
            if loaded == "failure":  # the listener kept its old trust: nothing to shake hands with
                listener = listener12 = "error"
            else:
                listener = handshake_verdict(p, tp.ca, str(chain), str(key))
                listener12 = handshake_verdict(p, tp.ca, str(chain), str(key), tls12=True)
            if listener == "client-cannot-load":  # OpenSSL's client cannot present it
                assert keyed == "error", case["id"]  # and explain --client-key says so
                continue
            rows.append(
                LimboRow(
                    str(case["id"]),
                    str(case["expected_result"]),
                    keyless,
                    listener12,
                    keyed,
                    listener,
                )
            )
    return rows


@pytest.mark.filterwarnings(
    "ignore:Parsed a serial number:cryptography.utils.CryptographyDeprecationWarning"
)
def test_x509_limbo_vectors_get_the_same_verdict_from_explain_and_the_listener(
    ours: Pki, tmp_path: Path, upstream: Upstream
) -> None:
    rows = run_limbo(ours, tmp_path, upstream)

    def same(explained: str, seen: str) -> bool:
        # A client that fails on its own (e.g. OpenSSL's decode_error on a vector's malformed
        # key) reads no alert: then only the verdict and reason are compared.
        if ":not an alert" in seen:
            return explained.rsplit(":", 1)[0] == seen.split(":not an alert", 1)[0]
        return explained == seen

    differ = [
        r for r in rows if not (same(r.keyless, r.listener_tls12) and same(r.keyed, r.listener))
    ]
    assert not differ, "\n".join(map(str, differ))
    assert len(rows) >= 0.95 * len(_limbo_cases())
    outcomes = {r.listener.split(":")[0] for r in rows}
    # Refused rows carry the alert the client read, and explain named the same one.
    assert all(r.listener.count(":") >= 2 for r in rows if r.listener.startswith("refused"))
    assert {"accepted", "refused", "error"} <= outcomes, outcomes
    # A TLS 1.3 client cannot sign with a DSA or P-192 key: it sends no certificate.
    by = {r.id: r for r in rows}
    dsa = by["webpki::forbidden-dsa-leaf"]
    assert (dsa.keyless, dsa.listener) == (
        "refused:bad_certificate:unsupported_certificate",
        "refused:no_certificate:certificate_required",
    )


# -- the verifier's own edges ----------------------------------------------------------------
def test_a_long_chain_goes_out_in_records_of_at_most_16_kib() -> None:
    data = certificate_records([b"\x30" * 40000, b"\x30" * 100])
    sizes = []
    while data:
        assert data[0] == 22 and data[1:3] == b"\x03\x03"
        size = int.from_bytes(data[3:5], "big")
        sizes.append(size)
        data = data[5 + size :]
    assert max(sizes) == 16384 and sum(sizes) == 4 + 3 + 3 + 40000 + 3 + 100


def test_the_verifier_says_so_when_the_listener_asks_no_certificate(ours: Pki) -> None:
    flags = {"cert": "-", "key": "-", "upstream": "http://x:1"}
    cfg = load_config(flags={**flags, "client-auth": "none", "allow-anonymous": True})
    ctx, _ = listener_context(cfg, [], [])
    with pytest.raises(VerifierError, match="unexpected server flight"):
        check_chain(ctx, [ours.der("good")])
