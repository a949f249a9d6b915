"""PKCS12/JKS keystores and truststores, --cert-dir, and `pki export` interop with keytool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ALLOWED_URI, Pki, Upstream, client_ctx, get, proxy_cmd, run_proxy

needs_keytool = pytest.mark.skipif(
    shutil.which("keytool") is None, reason="keytool (a JDK) is not installed; .ci/run installs it"
)


def mtls(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(proxy_cmd(*args), capture_output=True, text=True, timeout=timeout)


def _pki(*steps: tuple[str, ...]) -> None:
    for args in steps:
        r = mtls(*args)
        assert r.returncode == 0, (args, r.stderr)


def _export(name: str, d: Path, fmt: str) -> tuple[str, ...]:
    """`pki export` of NAME from D into D/FMT, with the password Spring Boot examples use."""
    return (
        "pki",
        "export",
        name,
        "--dir",
        str(d),
        "--format",
        fmt,
        "--password",
        "changeit",
        "--out",
        str(d / fmt),
    )


def keytool_genkey(path: Path, store_type: str, alias: str, dname: str) -> None:
    """An EC key pair made by keytool itself, as a Java team would."""
    r = subprocess.run(
        [
            "keytool",
            "-genkeypair",
            "-alias",
            alias,
            "-keyalg",
            "EC",
            "-groupname",
            "secp256r1",
            "-dname",
            dname,
            "-validity",
            "30",
            "-storetype",
            store_type,
            "-keystore",
            str(path),
            "-storepass",
            "changeit",
            "-keypass",
            "changeit",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return mtls("check", "--upstream", "http://127.0.0.1:9", "--allow-uri", ALLOWED_URI, *args)


@pytest.fixture(scope="module")
def stores(tp: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our PKI exported to every format, plus keytool- and openssl-made stores."""
    d = tmp_path_factory.mktemp("stores")
    shutil.copy(tp.crt("server"), d / "server.crt")
    shutil.copy(tp.key("server"), d / "server.key")
    shutil.copy(tp.ca, d / "ca.crt")
    for src in ("intermediate.crt", "intermediate.key"):
        shutil.copy(tp.dir / src, d / src)
    out: dict[str, Path] = {}
    for fmt in ("p12", "jks", "pem"):
        _pki(_export("server", d, fmt))
        out[fmt] = d / fmt
    # A legacy (RC2/3DES) PKCS12 as old tooling writes it.
    legacy = d / "legacy.p12"
    r = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-export",
            "-legacy",
            "-in",
            str(d / "server.crt"),
            "-inkey",
            str(d / "server.key"),
            "-out",
            str(legacy),
            "-passout",
            "pass:changeit",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode == 0:
        out["legacy"] = legacy
    (d / "empty.p12").write_bytes(b"")
    (d / "truncated.p12").write_bytes((out["p12"] / "keystore.p12").read_bytes()[:200])
    out["dir"] = d
    return out


def test_pkcs12_and_jks_keystores_serve_real_clients(
    tp: Pki, upstream: Upstream, stores: dict[str, Path]
) -> None:
    for fmt in ("p12", "jks"):
        args = [
            "--keystore",
            str(stores[fmt] / f"keystore.{fmt}"),
            "--keystore-password",
            "changeit",
            "--truststore",
            str(stores[fmt] / f"truststore.{fmt}"),
            "--truststore-password",
            "changeit",
        ]
        with run_proxy(
            tp,
            f"http://127.0.0.1:{upstream.port}",
            *args,
            default_policy=True,
            extra_cert_args=False,
        ) as p:
            assert get(p.port, client_ctx(tp, "good"))[0] == 200
            assert get(p.port, client_ctx(tp, "other"))[0] == 403


def test_format_is_chosen_by_content_and_passwords_from_env_or_file(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    disguised = tmp_path / "keystore.p12"  # a JKS under a .p12 name
    disguised.write_bytes((stores["jks"] / "keystore.jks").read_bytes())
    pw = tmp_path / "pw"
    pw.write_text("changeit\n")
    r = check(
        "--keystore",
        str(disguised),
        "--keystore-password",
        f"file:{pw}",
        "--cacert",
        str(stores["dir"] / "ca.crt"),
    )
    assert r.returncode == 0, r.stderr
    assert "CN=localhost" in r.stdout
    r = subprocess.run(
        proxy_cmd(
            "check",
            "--upstream",
            "http://127.0.0.1:9",
            "--allow-uri",
            ALLOWED_URI,
            "--keystore",
            str(stores["p12"] / "keystore.p12"),
            "--keystore-password",
            "${KS_PW}",
            "--truststore",
            str(stores["p12"] / "truststore.p12"),
            "--truststore-password",
            "${KS_PW}",
        ),
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "KS_PW": "changeit"},
    )
    assert r.returncode == 0, r.stderr
    assert "trusted CAs:       1" in r.stdout


def test_legacy_pkcs12_loads(stores: dict[str, Path]) -> None:
    if "legacy" not in stores:
        pytest.skip("this openssl cannot write -legacy PKCS12")
    r = check(
        "--keystore",
        str(stores["legacy"]),
        "--keystore-password",
        "changeit",
        "--cacert",
        str(stores["dir"] / "ca.crt"),
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("store", "password", "needle"),
    [
        ("p12/keystore.p12", "S3cr3t-x", "wrong password"),
        ("jks/keystore.jks", "S3cr3t-x", "wrong password"),
        ("empty.p12", "changeit", "the file is empty"),
        ("truncated.p12", "changeit", "truncated or corrupt"),
        ("p12/truststore.p12", "changeit", "contains no private key"),
        ("jks/truststore.jks", "changeit", "contains no private key"),
        ("pem/tls.crt", "changeit", "this is a PEM file"),
    ],
)
def test_bad_keystores_exit_2_naming_the_file(
    stores: dict[str, Path], store: str, password: str, needle: str
) -> None:
    path = stores["dir"] / store
    r = check(
        "--keystore",
        str(path),
        "--keystore-password",
        password,
        "--cacert",
        str(stores["dir"] / "ca.crt"),
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and str(path) in r.stderr
    assert "S3cr3t-x" not in r.stderr  # passwords never appear in messages


def test_truststore_without_certificates_is_refused(stores: dict[str, Path]) -> None:
    r = check(
        "--cert",
        str(stores["dir"] / "server.crt"),
        "--key",
        str(stores["dir"] / "server.key"),
        "--truststore",
        str(stores["p12"] / "keystore.p12"),
        "--truststore-password",
        "wrong",
    )
    assert r.returncode == 2 and "wrong password" in r.stderr


def test_cert_dir_picks_up_a_secret_mount(stores: dict[str, Path], tmp_path: Path) -> None:
    mount = tmp_path / "secret"
    mount.mkdir()
    for name in ("tls.crt", "tls.key", "ca.crt"):
        shutil.copy(stores["pem"] / name, mount / name)
    r = check("--cert-dir", str(mount))
    assert r.returncode == 0, r.stderr
    assert "cert-dir:          found ca.crt, tls.crt, tls.key" in r.stdout
    ks = tmp_path / "ks"
    ks.mkdir()
    shutil.copy(stores["p12"] / "keystore.p12", ks / "keystore.p12")
    shutil.copy(stores["p12"] / "truststore.p12", ks / "truststore.p12")
    r = check(
        "--cert-dir",
        str(ks),
        "--keystore-password",
        "changeit",
        "--truststore-password",
        "changeit",
    )
    assert r.returncode == 0, r.stderr
    r = check("--cert-dir", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not a directory" in r.stderr


@needs_keytool
def test_keytool_made_stores_load(tmp_path: Path, stores: dict[str, Path]) -> None:
    for typ, ext in (("JKS", "jks"), ("PKCS12", "p12")):
        path = tmp_path / f"kt.{ext}"
        keytool_genkey(path, typ, "app", "CN=localhost")
        res = check(
            "--keystore",
            str(path),
            "--keystore-password",
            "changeit",
            "--cacert",
            str(stores["dir"] / "ca.crt"),
        )
        assert res.returncode == 0, res.stderr
        assert "CN=localhost" in res.stdout


@needs_keytool
def test_exported_stores_are_what_keytool_expects(stores: dict[str, Path]) -> None:
    for fmt in ("p12", "jks"):
        ks = subprocess.run(
            [
                "keytool",
                "-list",
                "-keystore",
                str(stores[fmt] / f"keystore.{fmt}"),
                "-storepass",
                "changeit",
            ],
            capture_output=True,
            text=True,
        )
        ts = subprocess.run(
            [
                "keytool",
                "-list",
                "-keystore",
                str(stores[fmt] / f"truststore.{fmt}"),
                "-storepass",
                "changeit",
            ],
            capture_output=True,
            text=True,
        )
        assert "PrivateKeyEntry" in ks.stdout, ks.stdout + ks.stderr
        assert "trustedCertEntry" in ts.stdout, ts.stdout + ts.stderr
    assert (stores["p12"] / "keystore.p12").stat().st_mode & 0o777 == 0o600


def test_export_prints_spring_properties_and_revoke_writes_a_crl(tp: Pki, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert mtls("pki", "init", str(d)).returncode == 0
    assert (
        mtls(
            "pki",
            "issue",
            "client",
            "app",
            "--dir",
            str(d),
            "--uri",
            "spiffe://t/a",
            "--email",
            "a@b.c",
            "--ou",
            "team",
        ).returncode
        == 0
    )
    r = mtls("pki", "export", "app", "--dir", str(d), "--format", "p12", "--password", "pw1")
    assert r.returncode == 0, r.stderr
    # A client certificate: client-side properties (issue 14 item 5), never server.ssl.*
    assert "-Djavax.net.ssl.keyStoreType=PKCS12" in r.stdout and "server.ssl" not in r.stdout
    assert "spring.ssl.bundle.jks.mtls.truststore.location=file:" in r.stdout
    assert mtls("pki", "export", "app", "--dir", str(d), "--format", "jks").returncode == 2
    r = mtls("pki", "revoke", "app", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    crl = subprocess.run(
        ["openssl", "crl", "-in", str(d / "crl.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
    ).stdout
    serial = (
        subprocess.run(
            ["openssl", "x509", "-in", str(d / "app.crt"), "-noout", "-serial"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .split("=")[1]
    )
    assert serial.upper() in crl.replace(":", "").upper()
    v = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(d / "ca.crt"),
            "-untrusted",
            str(d / "intermediate.crt"),
            "-CRLfile",
            str(d / "crl.pem"),
            str(d / "app.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert v.returncode != 0 and "revoked" in (v.stdout + v.stderr)


@pytest.mark.parametrize(
    ("client", "extra", "code", "needle"),
    [
        ("good", ["--allow-uri", ALLOWED_URI], 0, "ALLOWED"),
        ("other", ["--allow-uri", ALLOWED_URI], 3, "DENIED 403"),
        ("rogue", ["--allow-all"], 3, "UNTRUSTED"),
        ("expired", ["--allow-all"], 3, "reason expired"),
        ("server_eku", ["--allow-all"], 3, "unsuitable certificate purpose"),
        ("good_leaf_only", ["--allow-all"], 3, "UNTRUSTED"),
    ],
)
def test_explain(tp: Pki, client: str, extra: list[str], code: int, needle: str) -> None:
    r = mtls(
        "explain",
        "--cert",
        tp.crt(client),
        "--cacert",
        tp.ca,
        "--upstream",
        "http://127.0.0.1:9",
        *extra,
    )
    assert r.returncode == code, r.stdout + r.stderr
    assert needle in r.stdout
    if client == "good":
        assert "subject:      CN=client-good,O=Example Corp" in r.stdout
        assert "spki pin:     sha256/" in r.stdout and ALLOWED_URI in r.stdout


def test_explain_with_a_truststore_and_bad_input(tp: Pki, stores: dict[str, Path]) -> None:
    r = mtls(
        "explain",
        "--cert",
        tp.crt("good"),
        "--truststore",
        str(stores["jks"] / "truststore.jks"),
        "--truststore-password",
        "changeit",
        "--upstream",
        "http://127.0.0.1:9",
        "--allow-uri",
        ALLOWED_URI,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = mtls(
        "explain",
        "--cert",
        tp.key("good"),
        "--cacert",
        tp.ca,
        "--upstream",
        "http://127.0.0.1:9",
        "--allow-all",
    )
    assert r.returncode == 2 and "not a PEM or DER certificate" in r.stderr


def test_openssl_reads_our_pkcs12(stores: dict[str, Path]) -> None:
    r = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-in",
            str(stores["p12"] / "keystore.p12"),
            "-passin",
            "pass:changeit",
            "-nodes",
            "-info",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "BEGIN PRIVATE KEY" in r.stdout and r.stdout.count("BEGIN CERTIFICATE") == 2


JAVA_CLIENT = """
import java.io.FileInputStream;
import java.net.URI;
import java.net.http.*;
import java.security.KeyStore;
import javax.net.ssl.*;

public class Call {
    public static void main(String[] a) throws Exception {
        char[] pw = "changeit".toCharArray();
        KeyStore ks = KeyStore.getInstance("PKCS12");
        ks.load(new FileInputStream(a[1]), pw);
        KeyStore ts = KeyStore.getInstance("JKS");
        ts.load(new FileInputStream(a[2]), pw);
        KeyManagerFactory kmf =
            KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(ks, pw);
        TrustManagerFactory tmf =
            TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(ts);
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        HttpClient c = HttpClient.newBuilder().sslContext(ctx)
            .version(HttpClient.Version.HTTP_1_1).build();
        HttpResponse<String> r = c.send(HttpRequest.newBuilder(URI.create(a[0])).build(),
                                        HttpResponse.BodyHandlers.ofString());
        System.out.println(r.statusCode());
        System.out.println(r.body());
    }
}
"""


def _java_call(
    tp: Pki, upstream: Upstream, tmp_path: Path, d: Path, keystore: Path, path: str, *policy: str
) -> subprocess.CompletedProcess[str]:
    """java.net.http.HttpClient with KEYSTORE and D's truststore, through a proxy serving D's
    `proxy` certificate and trusting D's CA."""
    src = tmp_path / "Call.java"
    src.write_text(JAVA_CLIENT)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{upstream.port}",
        "--cert",
        str(d / "proxy.crt"),
        "--key",
        str(d / "proxy.key"),
        "--cacert",
        str(d / "ca.crt"),
        *policy,
        extra_cert_args=False,
    ) as p:
        return subprocess.run(
            [
                "java",
                str(src),
                f"https://localhost:{p.port}{path}",
                str(keystore),
                str(d / "jks" / "truststore.jks"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


@needs_keytool
def test_java_httpclient_with_exported_stores_calls_through_the_proxy(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    d = tmp_path / "pki"
    _pki(
        ("pki", "init", str(d)),
        (
            "pki",
            "issue",
            "server",
            "proxy",
            "--dir",
            str(d),
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ),
        (
            "pki",
            "issue",
            "client",
            "javaapp",
            "--dir",
            str(d),
            "--uri",
            "spiffe://test.local/ns/java/sa/app",
        ),
        _export("javaapp", d, "p12"),
        _export("javaapp", d, "jks"),
    )
    r = _java_call(
        tp,
        upstream,
        tmp_path,
        d,
        d / "p12" / "keystore.p12",
        "/from-java",
        "--allow-uri",
        "spiffe://test.local/ns/java/sa/*",
    )
    assert r.returncode == 0, r.stderr
    status, body = r.stdout.split("\n", 1)
    assert status == "200"
    assert '"target": "/from-java"' in body
    assert upstream.seen[0].one("x-client-spiffe-id") == "spiffe://test.local/ns/java/sa/app"


@needs_keytool
def test_keystore_with_several_keys_needs_an_alias(tmp_path: Path, stores: dict[str, Path]) -> None:
    path = tmp_path / "two.jks"
    for alias, cn in (("first", "one.test"), ("second", "two.test")):
        keytool_genkey(path, "JKS", alias, f"CN={cn}")
    base = [
        "--keystore",
        str(path),
        "--keystore-password",
        "changeit",
        "--cacert",
        str(stores["dir"] / "ca.crt"),
    ]
    r = check(*base)
    assert r.returncode == 2 and "holds 2 keys (first, second)" in r.stderr
    r = check(*base, "--keystore-alias", "second")
    assert r.returncode == 0, r.stderr
    assert "CN=two.test" in r.stdout
    r = check(*base, "--keystore-alias", "third")
    assert r.returncode == 2 and "no key entry with alias 'third'" in r.stderr


def test_empty_truststore_is_refused(tmp_path: Path, stores: dict[str, Path]) -> None:
    import jks

    empty = tmp_path / "empty-trust.jks"
    empty.write_bytes(bytes(jks.KeyStore.new("jks", []).saves("changeit")))
    r = check(
        "--cert",
        str(stores["dir"] / "server.crt"),
        "--key",
        str(stores["dir"] / "server.key"),
        "--truststore",
        str(empty),
        "--truststore-password",
        "changeit",
    )
    assert r.returncode == 2 and "contains no trusted certificates" in r.stderr


@needs_keytool
def test_a_refused_java_client_reads_the_reason(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """Issue 14: Java's "Received fatal alert: unknown_ca", not "header parser received no
    bytes" (the alert is sent before the close, tlsconn.py)."""
    d, other = tmp_path / "pki", tmp_path / "other"
    _pki(
        ("pki", "init", str(d)),
        ("pki", "issue", "server", "proxy", "--dir", str(d), "--dns", "localhost"),
        ("pki", "init", str(other)),  # a CA the proxy does not trust
        ("pki", "issue", "client", "stranger", "--dir", str(other), "--uri", "spiffe://x/y"),
        _export("stranger", other, "p12"),
        _export("proxy", d, "jks"),
    )
    r = _java_call(tp, upstream, tmp_path, d, other / "p12" / "keystore.p12", "/")
    assert r.returncode != 0
    assert "Received fatal alert: unknown_ca" in r.stderr, r.stderr[-2000:]
    assert upstream.seen == []
