"""docs/security.md, TLS: TLS handshake and X.509 cases (TLS-001 .. TLS-047).

A rejected client never reaches HTTP: it reads the TLS alert that names the reason (TLS 1.3
reports it on the first read, after the client's Finished), the upstream sees nothing, the proxy
keeps serving, and the handshake counter of the expected reason moves (MET-01)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
from cryptography.x509.oid import NameOID

from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    alert_name,
    refused_after_handshake,
    run_proxy,
    run_upstream,
)
from tests.security import certs as c
from tests.security.certs import DAY, NOW, Cert


@dataclass
class Zoo:
    d: Path
    root: Cert
    inter: Cert
    evil: Cert
    files: dict[str, tuple[str, str]]

    @property
    def ca(self) -> str:
        return str(self.d / "ca.crt")


def build_zoo(d: Path) -> Zoo:
    root = c.ca(c.name("Test Root CA"))
    inter = c.ca(c.name("Test Intermediate CA"), root, pathlen=0)
    evil = c.ca(c.name("Evil Root CA"))
    expired_root = c.ca(c.name("Expired Root CA"), nb=NOW - 10 * DAY, na=NOW - DAY)
    (d / "ca.crt").write_bytes(c.pem(root.cert) + c.pem(expired_root.cert))
    srv = c.server(root)
    files = {"server": c.write(d, "server", srv)}
    self_key = c.ec_key()
    selfsigned = c.ca(c.name("client"), key=self_key)
    spoof_root = c.ca(c.name("Test Root CA"))
    expired_inter = c.ca(c.name("Expired Intermediate"), root, pathlen=0, na=NOW - DAY)
    inter2 = c.ca(c.name("Test Sub-Intermediate CA"), inter)
    nc_inter = c.ca(
        c.name("NC Intermediate"),
        root,
        nc=x509.NameConstraints(
            permitted_subtrees=[
                x509.DNSName("allowed.test"),
                x509.UniformResourceIdentifier(".allowed.test"),
            ],
            excluded_subtrees=None,
        ),
    )
    ncdn_inter = c.ca(
        c.name("NCDN Intermediate"),
        root,
        nc=x509.NameConstraints(
            permitted_subtrees=[
                x509.DirectoryName(
                    x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Allowed Org")])
                )
            ],
            excluded_subtrees=None,
        ),
    )
    sp = [x509.UniformResourceIdentifier(c.SPIFFE)]
    zoo = {
        "good": c.leaf(root),
        "selfsigned": Cert(selfsigned.cert, self_key),
        "untrusted": c.leaf(evil),
        "untrusted_with_root": c.leaf(evil, chain=[evil]),
        "spoofed_issuer": c.leaf(spoof_root),
        "expired": c.leaf(root, nb=NOW - 10 * DAY, na=NOW - DAY),
        "notyetvalid": c.leaf(root, nb=NOW + DAY, na=NOW + 10 * DAY),
        "expired_intermediate": c.leaf(expired_inter, chain=[expired_inter]),
        "expired_root": c.leaf(expired_root),
        "serverauth_only": c.leaf(root, eku=(EKU.SERVER_AUTH,)),
        "codesigning": c.leaf(root, eku=(EKU.CODE_SIGNING,)),
        "any_eku": c.leaf(root, eku=(x509.ObjectIdentifier("2.5.29.37.0"),)),
        "no_eku": c.leaf(root, eku=()),
        "ku_certsign_only": c.leaf(root, key_usage=c.ku(sign=False, certsign=True)),
        "ca_true": c.leaf(root, ca_flag=True),
        "unknown_critical": c.leaf(
            root,
            extra=[
                (
                    x509.UnrecognizedExtension(
                        x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"
                    ),
                    True,
                )
            ],
        ),
        "via_int_not_sent": c.leaf(inter),
        "via_int": c.leaf(inter, chain=[inter]),
        "via_int_junk": c.leaf(inter, chain=[inter, evil]),
        "pathlen_violation": c.leaf(inter2, chain=[inter2, inter]),
        "nc_ok": c.leaf(
            nc_inter, sans=[x509.DNSName("svc.allowed.test"), *sp[:0]], chain=[nc_inter]
        ),
        "nc_violation": c.leaf(nc_inter, sans=[x509.DNSName("svc.evil.test")], chain=[nc_inter]),
        "ncdn_violation": c.leaf(
            ncdn_inter,
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Org"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "client"),
                ]
            ),
            chain=[ncdn_inter],
        ),
        "rsa1024": c.leaf(root, key=rsa.generate_private_key(65537, 1024)),  # noqa: S505 -- TLS-029
        "rsa2048": c.leaf(root, key=rsa.generate_private_key(65537, 2048)),
    }
    for label, cert in zoo.items():
        files[label] = c.write(d, label, cert)
    root_crt, root_key = c.write(d, "root", root)
    files["sha1"] = c.sha1_leaf(d, Path(root_crt), Path(root_key))
    junk = [
        c.ca(
            x509.Name(
                [
                    *(
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x" * 60)
                        for _ in range(60)
                    ),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"junk{i}"),
                ]
            )
        )
        for i in range(40)
    ]
    files["oversized"] = c.write(d, "oversized", c.leaf(root, chain=junk))
    return Zoo(d, root, inter, evil, files)


@dataclass
class TlsRig:
    zoo: Zoo
    proxy: Proxy
    upstream: Upstream

    def ctx(self, label: str | None, *, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.zoo.ca)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # permissive: the server's decision is observed
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if label:
            crt, key = self.zoo.files[label]
            ctx.load_cert_chain(crt, key)
        return ctx

    def request(self, ctx: ssl.SSLContext, sni: str | None = "localhost") -> bytes:
        """Handshake, write a request, read: the response bytes, or b'' when refused."""
        try:
            raw = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=5)
            with ctx.wrap_socket(raw, server_hostname=sni) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
                return out
        except (ssl.SSLError, ConnectionError, TimeoutError):
            return b""

    def refusal(self, ctx: ssl.SSLContext) -> str:
        """Handshake, write a request, read: the alert the proxy sent (its name), or how else
        the connection ended. Fails if a response came back."""
        try:
            raw = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=5)
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n")
                data = s.recv(65536)  # TLS 1.3: the alert comes after the client's Finished
        except ssl.SSLError as exc:
            return alert_name(exc)
        except (ConnectionError, TimeoutError) as exc:
            return type(exc).__name__
        raise AssertionError(f"expected a refusal, got {data[:200]!r}")

    def failures(self, reason: str) -> float:
        prefix = f'mtls_proxy_handshakes_total{{reason="{reason}",result="failed"}}'
        for line in self.proxy.admin_get("/metrics")[1].splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def trig(zoo: Zoo) -> Iterator[TlsRig]:
    with run_upstream() as up:
        crt, key = zoo.files["server"]
        with run_proxy(
            Pki(zoo.d),
            f"http://127.0.0.1:{up.port}",
            "--cert",
            crt,
            "--key",
            key,
            "--cacert",
            zoo.ca,
            extra_cert_args=False,
        ) as p:
            yield TlsRig(zoo, p, up)


T12, T13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
# (id, client fixture, TLS version, expected handshake-failure reason, the TLS alert the client
# reads: its name in OpenSSL's error reason, SSLV3_/TLSV1_ALERT_<name>)
REJECTED: list[tuple[str, str | None, ssl.TLSVersion | None, str, str]] = [
    ("TLS-001", None, T13, "no_certificate", "CERTIFICATE_REQUIRED"),  # 116
    ("TLS-002", None, T12, "no_certificate", "HANDSHAKE_FAILURE"),  # 40
    ("TLS-003", "selfsigned", None, "unknown_ca", "UNKNOWN_CA"),  # 48
    ("TLS-004", "untrusted", None, "unknown_ca", "UNKNOWN_CA"),
    ("TLS-005", "untrusted_with_root", None, "unknown_ca", "UNKNOWN_CA"),
    ("TLS-006", "spoofed_issuer", None, "unknown_ca", "UNKNOWN_CA"),
    ("TLS-007", "expired", None, "expired", "CERTIFICATE_EXPIRED"),  # 45
    ("TLS-008", "notyetvalid", None, "expired", "BAD_CERTIFICATE"),  # 42
    ("TLS-009 intermediate", "expired_intermediate", None, "expired", "CERTIFICATE_EXPIRED"),
    ("TLS-009 root", "expired_root", None, "expired", "CERTIFICATE_EXPIRED"),
    ("TLS-010", "serverauth_only", None, "bad_certificate", "UNSUPPORTED_CERTIFICATE"),  # 43
    ("TLS-011", "codesigning", None, "bad_certificate", "UNSUPPORTED_CERTIFICATE"),
    ("TLS-012", "any_eku", None, "bad_certificate", "UNSUPPORTED_CERTIFICATE"),
    ("TLS-014", "ku_certsign_only", None, "bad_certificate", "UNSUPPORTED_CERTIFICATE"),
    ("TLS-016", "unknown_critical", None, "bad_certificate", "CERTIFICATE_UNKNOWN"),  # 46
    ("TLS-017", "via_int_not_sent", None, "unknown_ca", "UNKNOWN_CA"),
    ("TLS-020", "pathlen_violation", None, "bad_certificate", "UNKNOWN_CA"),
    ("TLS-021 violation", "nc_violation", None, "bad_certificate", "CERTIFICATE_UNKNOWN"),
    ("TLS-022", "ncdn_violation", None, "bad_certificate", "CERTIFICATE_UNKNOWN"),
    ("TLS-028", "sha1", None, "bad_certificate", "BAD_CERTIFICATE"),
    ("TLS-029", "rsa1024", None, "bad_certificate", "BAD_CERTIFICATE"),
    ("TLS-041", "oversized", None, "protocol", "ILLEGAL_PARAMETER"),  # 47
]


@pytest.mark.parametrize(
    ("label", "version", "reason", "alert"),
    [r[1:] for r in REJECTED],
    ids=[r[0] for r in REJECTED],
)
def test_rejected_at_the_handshake(
    trig: TlsRig, label: str | None, version: ssl.TLSVersion | None, reason: str, alert: str
) -> None:
    before_seen = len(trig.upstream.seen)
    before = trig.failures(reason)
    assert trig.refusal(trig.ctx(label, version=version)) == alert
    assert len(trig.upstream.seen) == before_seen
    assert trig.failures(reason) == before + 1
    assert trig.request(trig.ctx("good")).startswith(b"HTTP/1.1 200")  # still serving


ACCEPTED = [
    ("TLS-013 no EKU (default)", "no_eku"),
    ("TLS-015 CA:TRUE leaf (default)", "ca_true"),
    ("TLS-018", "via_int"),
    ("TLS-019", "via_int_junk"),
    ("TLS-021 satisfied", "nc_ok"),
    ("TLS-030 rsa2048", "rsa2048"),
    ("TLS-030 p256", "good"),
]


@pytest.mark.parametrize("label", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted(trig: TlsRig, label: str) -> None:
    ctx = trig.ctx(label)
    out = trig.request(ctx)
    if label == "nc_ok":  # its only SAN is a DNS name: trusted, then refused by the policy
        assert out.startswith(b"HTTP/1.1 403")
        return
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    leaf = x509.load_pem_x509_certificates(Path(trig.zoo.files[label][0]).read_bytes())[0]
    import hashlib

    from cryptography.hazmat.primitives import serialization

    sha = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert trig.upstream.seen[-1].one("x-client-cert-sha256") == sha  # the leaf, never the chain


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TLS 1.0/1.1 clients, on purpose
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls031_old_protocol_versions_are_refused(trig: TlsRig, version: ssl.TLSVersion) -> None:
    before = trig.failures("protocol")
    ctx = trig.ctx("good", version=version)
    assert trig.request(ctx) == b""
    assert trig.failures("protocol") == before + 1  # the server refused it, not our client


def test_tls032_both_versions_work_and_cbc_only_tls12_is_refused(trig: TlsRig) -> None:
    for v in (T12, T13):
        assert trig.request(trig.ctx("good", version=v)).startswith(b"HTTP/1.1 200")
    cbc = trig.ctx("good", version=T12)
    cbc.set_ciphers("AES128-SHA256:ECDHE-ECDSA-AES128-SHA256:@SECLEVEL=0")
    assert trig.request(cbc) == b""


def _s_client(trig: TlsRig, *args: str, stdin: bytes = b"") -> str:
    crt, key = trig.zoo.files["good"]
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{trig.proxy.port}",
            "-CAfile",
            trig.zoo.ca,
            "-cert",
            crt,
            "-key",
            key,
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=20,
    )
    return (r.stdout + r.stderr).decode("latin-1")


def test_tls033_tls034_client_renegotiation_is_refused(trig: TlsRig) -> None:
    out = _s_client(trig, "-tls1_2", stdin=b"R\n")
    assert "RENEGOTIATING" in out and "Verify return code" in out
    assert "no renegotiation" in out or "handshake failure" in out or "alert" in out, out[-800:]
    assert trig.request(trig.ctx("good")).startswith(b"HTTP/1.1 200")


def test_tls035_sni_absent_or_other_is_served(trig: TlsRig) -> None:
    for sni in (None, "evil.test"):
        ctx = trig.ctx("good")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        assert trig.request(ctx, sni=sni).startswith(b"HTTP/1.1 200")


def test_tls036_resumed_session_keeps_the_identity(trig: TlsRig) -> None:
    ctx = trig.ctx("good", version=T13)
    raw = socket.create_connection(("127.0.0.1", trig.proxy.port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
        session = s.session
    raw = socket.create_connection(("127.0.0.1", trig.proxy.port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(b"GET /again HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
        assert s.session_reused
    assert trig.upstream.seen[-1].target == "/again"
    assert trig.proxy.metric("mtls_proxy_tls_sessions_resumed_total") >= 1  # MET-06
    assert trig.upstream.seen[-1].one("x-client-spiffe-id") == c.SPIFFE


def test_tls040_early_data_is_not_accepted(trig: TlsRig, tmp_path: Path) -> None:
    sess = tmp_path / "s.pem"
    _s_client(trig, "-tls1_3", "-sess_out", str(sess), stdin=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    req = tmp_path / "req.txt"
    req.write_bytes(b"GET /early HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    before = len(trig.upstream.seen)
    out = _s_client(trig, "-tls1_3", "-sess_in", str(sess), "-early_data", str(req))
    assert "Early data was accepted" not in out
    assert sum(s.target == "/early" for s in trig.upstream.seen[before:]) <= 1


def test_tls044_h2_is_never_selected_and_prior_knowledge_h2_gets_400(trig: TlsRig) -> None:
    ctx = trig.ctx("good")
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", trig.proxy.port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.selected_alpn_protocol() is None  # no overlap: no ALPN, HTTP/1.1
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    before = len(trig.upstream.seen)
    raw = socket.create_connection(("127.0.0.1", trig.proxy.port), timeout=5)
    with trig.ctx("good").wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        out = s.recv(65536)
    assert out.startswith((b"HTTP/1.1 400", b"HTTP/1.1 505"))
    assert len(trig.upstream.seen) == before


def test_tls045_plaintext_and_garbage_are_closed(trig: TlsRig) -> None:
    before = trig.failures("protocol")
    for payload in (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", bytes(range(256)) * 4):
        with socket.create_connection(("127.0.0.1", trig.proxy.port), timeout=5) as s:
            s.sendall(payload)
            try:
                data = s.recv(65536)
            except ConnectionError:
                data = b""
            assert not data.startswith(b"HTTP/")
    assert trig.failures("protocol") >= before + 2


def test_tls047_failures_do_not_disturb_good_clients(trig: TlsRig) -> None:
    bad = ["selfsigned", "expired", "serverauth_only", None]
    reasons = {
        "selfsigned": "unknown_ca",
        "expired": "expired",
        "serverauth_only": "bad_certificate",
        None: "no_certificate",
    }
    before = {r: trig.failures(r) for r in reasons.values()}
    for i in range(48):
        label = bad[i % 4]
        assert trig.request(trig.ctx(label, version=T13)) == b""
        assert trig.request(trig.ctx("good")).startswith(b"HTTP/1.1 200")
    for r in reasons.values():
        assert trig.failures(r) == before[r] + 12, r


# -- cases that need their own proxy configuration ------------------------------------------
def _own_proxy(
    zoo: Zoo, up: Upstream, *args: str, cacert: str | None = None
) -> Callable[[], object]:
    crt, key = zoo.files["server"]
    return lambda: run_proxy(
        Pki(zoo.d),
        f"http://127.0.0.1:{up.port}",
        "--cert",
        crt,
        "--key",
        key,
        "--cacert",
        cacert or zoo.ca,
        *args,
        extra_cert_args=False,
    )


def test_tls013_015_strict_client_certs_refuses_no_eku_and_ca_leaves(
    zoo: Zoo, upstream: Upstream
) -> None:
    with _own_proxy(zoo, upstream, "--strict-client-certs")() as p:  # type: ignore[attr-defined]
        rig = TlsRig(zoo, p, upstream)
        for label in ("no_eku", "ca_true"):
            # After the handshake: no alert can name the reason, a 403 does (never forwarded).
            assert refused_after_handshake(rig.request(rig.ctx(label))) == "bad_certificate"
        # TLS-043: every good fixture still passes with the strict checks on.
        for label in ("good", "via_int", "rsa2048"):
            assert rig.request(rig.ctx(label)).startswith(b"HTTP/1.1 200"), label
        assert rig.failures("bad_certificate") == 2


@pytest.mark.parametrize(
    ("mode", "accepted"),
    [("any", True), ("roots", False)],
    ids=["anchors any (default): trusted", "anchors roots: root needed"],
)
def test_tls017b_an_intermediate_alone_as_trust_anchor(
    zoo: Zoo, upstream: Upstream, tmp_path: Path, mode: str, accepted: bool
) -> None:
    """An intermediate alone in the CA bundle anchors its clients with --trust-anchors any (the
    default: Java PKIX, Go), not with roots (OpenSSL's classic rule). Either way a client of
    another CA under the same root is refused: trusting the intermediate is not trusting its
    root."""
    only_inter = tmp_path / "inter.crt"
    only_inter.write_bytes(c.pem(zoo.inter.cert))
    args = () if mode == "any" else ("--trust-anchors", mode)
    with _own_proxy(zoo, upstream, *args, cacert=str(only_inter))() as p:  # type: ignore[attr-defined]
        rig = TlsRig(zoo, p, upstream)
        for label in ("via_int", "via_int_not_sent"):  # sent or not: the bundle holds it
            out = rig.request(rig.ctx(label))
            assert out.startswith(b"HTTP/1.1 200") if accepted else out == b"", (label, out)
        assert rig.request(rig.ctx("good")) == b""  # issued by the root itself
        assert rig.request(rig.ctx("nc_ok")) == b""  # another intermediate of the same root
        assert rig.failures("unknown_ca") == (2 if accepted else 4)
