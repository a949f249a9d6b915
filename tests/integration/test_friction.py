"""Issue 14 item 5, the friction list: each rough edge of the CLI, run as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from tests.helpers import ALLOWED_URI, Pki, proxy_cmd


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        proxy_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env
    )


def material(tp: Pki) -> list[str]:
    return ["--cert", tp.crt("server"), "--key", tp.key("server"), "--cacert", tp.ca]


def test_upstream_without_a_scheme_is_one_error_with_a_hint(tp: Pki) -> None:
    r = run("check", "--upstream", "127.0.0.1:8080", *material(tp), "--allow-uri", ALLOWED_URI)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    assert "--upstream" in errors[0] and "did you mean http://127.0.0.1:8080?" in errors[0]
    assert "is required" not in r.stderr


def test_unknown_environment_variable_is_a_warning_with_a_suggestion(tp: Pki) -> None:
    env = {
        **os.environ,
        "MTLS_PROXY_IDLE_TIMOUT": "5",
        "MTLS_PROXY_BOGUS": "1",
        "MTLS_PROXY_CONFIG": "",  # known (the config file), never warned about
    }
    r = run(
        "check",
        "--upstream",
        "http://127.0.0.1:9",
        *material(tp),
        "--allow-uri",
        ALLOWED_URI,
        env=env,
    )
    assert r.returncode == 0, r.stderr  # a warning: the exit code is unchanged
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2, r.stderr
    assert "MTLS_PROXY_BOGUS" in warnings[0]
    assert "MTLS_PROXY_IDLE_TIMOUT" in warnings[1]
    assert "did you mean 'MTLS_PROXY_IDLE_TIMEOUT'?" in warnings[1]
    assert "MTLS_PROXY_CONFIG" not in r.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("busy", ["--listen", "--admin"])
def test_address_in_use_names_the_option_and_the_address(tp: Pki, busy: str, workers: str) -> None:
    """With --workers 2 the master bound the admin port after starting its workers: the bare
    errno, and the workers lived on (a caller reading stderr waited for ever)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        ports = {"--listen": "127.0.0.1:0", "--admin": "127.0.0.1:0", busy: addr}
        r = run(
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            *material(tp),
            "--allow-all",
            *(item for pair in ports.items() for item in pair),
            "--workers",
            workers,
            timeout=30,
        )
    assert r.returncode == 1, r.stderr  # docs/cli.md: 1 = could not start
    assert f"mtls-proxy: error: {busy} {addr}: address already in use" in r.stderr, r.stderr
    assert "Errno" not in r.stderr


def test_demo_on_a_busy_port_says_which_and_exits() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("demo", "--port", str(port), timeout=60)  # it used to hang, deaf to Ctrl-C
    assert r.returncode == 1, r.stderr
    assert f"demo --port {port}: 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "--port 0 for a free one" in r.stderr
    assert "certificates left" not in r.stderr


def test_demo_port_0_picks_a_free_port_and_the_curl_commands_use_it() -> None:
    proc = subprocess.Popen(
        proxy_cmd("demo", "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop." in line:
                break
        text = "".join(lines)
        m = re.search(r"proxy on https://localhost:(\d+)", text)
        assert m is not None, text
        port = int(m.group(1))
        assert port not in (0, 8443)
        curls = [line for line in lines if "curl " in line]
        assert len(curls) == 3 and all(f"https://localhost:{port}/hello" in c for c in curls)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens there
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check(tp: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    return run("check", "--upstream", "http://127.0.0.1:9", "--allow-all", *args)


def test_one_pem_with_certificate_and_key_as_cert_is_enough(tp: Pki, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(Path(tp.crt("server")).read_bytes() + Path(tp.key("server")).read_bytes())
    r = _check(tp, "--cert", str(both), "--cacert", tp.ca)
    assert r.returncode == 0, r.stderr
    r = _check(tp, "--cert", tp.crt("server"), "--cacert", tp.ca)  # no key anywhere
    assert r.returncode == 2
    assert f"--cert: {tp.crt('server')}: holds no private key, and no --key was given" in r.stderr


def test_a_der_certificate_as_cert_is_named_with_the_conversion(tp: Pki, tmp_path: Path) -> None:
    der = tmp_path / "server.cer"
    der.write_bytes(tp.der("server"))
    r = _check(tp, "--cert", str(der), "--key", tp.key("server"), "--cacert", tp.ca)
    assert r.returncode == 2
    assert f"--cert: {der}: a DER (binary) certificate; PEM is needed" in r.stderr
    assert f"openssl x509 -inform der -in {der} -out {der}.pem" in r.stderr


@pytest.mark.parametrize("fmt", ["p12", "jks"])
def test_a_store_without_its_password_says_no_password_was_given(
    tp: Pki, tmp_path: Path, fmt: str
) -> None:
    out = pki.export(tp.dir, "server", fmt, "S3cret", tmp_path / fmt)
    r = _check(tp, "--keystore", str(out / f"keystore.{fmt}"), "--cacert", tp.ca)
    assert r.returncode == 2
    assert "password-protected and no password was given (--keystore-password)" in r.stderr
    r = _check(
        tp,
        "--cert",
        tp.crt("server"),
        "--key",
        tp.key("server"),
        "--truststore",
        str(out / f"truststore.{fmt}"),
    )
    assert r.returncode == 2
    assert "password-protected and no password was given (--truststore-password)" in r.stderr
    r = _check(
        tp,
        "--keystore",
        str(out / f"keystore.{fmt}"),
        "--keystore-password",
        "wrong",
        "--cacert",
        tp.ca,
    )
    assert r.returncode == 2 and "wrong password" in r.stderr


def test_pki_issue_refuses_days_below_1(tmp_path: Path) -> None:
    assert run("pki", "init", str(tmp_path)).returncode == 0
    for days in ("-1", "0"):
        r = run("pki", "issue", "client", "c", "--dir", str(tmp_path), "--days", days)
        assert r.returncode == 2, r.stderr
        assert "--days: must be at least 1" in r.stderr
        assert not (tmp_path / "c.crt").exists()


def test_pki_export_of_a_client_prints_client_side_properties(tmp_path: Path) -> None:
    assert run("pki", "init", str(tmp_path)).returncode == 0
    for kind, name in (("client", "app"), ("server", "srv")):
        assert run("pki", "issue", kind, name, "--dir", str(tmp_path)).returncode == 0
    r = run("pki", "export", "app", "--dir", str(tmp_path), "--password", "pw")
    assert r.returncode == 0, r.stderr
    store = tmp_path.resolve() / "app-export"
    assert "server.ssl" not in r.stdout
    assert f"spring.ssl.bundle.jks.mtls.keystore.location=file:{store}/keystore.p12" in r.stdout
    assert "spring.ssl.bundle.jks.mtls.key.alias=app" in r.stdout
    assert f"-Djavax.net.ssl.keyStore={store}/keystore.p12" in r.stdout
    assert f"-Djavax.net.ssl.trustStore={store}/truststore.p12" in r.stdout
    r = run("pki", "export", "app", "--dir", str(tmp_path), "--format", "pem")
    assert r.returncode == 0, r.stderr
    assert "server.ssl" not in r.stdout and "spring.ssl.bundle.pem.mtls.keystore" in r.stdout
    r = run("pki", "export", "srv", "--dir", str(tmp_path), "--password", "pw")
    assert "server.ssl.client-auth=need" in r.stdout and "javax.net.ssl" not in r.stdout


def _crl_serials(path: Path) -> set[int]:
    from cryptography import x509

    blocks = path.read_bytes().split(b"-----END X509 CRL-----")[:-1]
    return {
        r.serial_number
        for b in blocks
        for r in x509.load_pem_x509_crl(b + b"-----END X509 CRL-----\n")
    }


def test_pki_crl_re_signs_and_check_warns_near_next_update(tmp_path: Path) -> None:
    import datetime as dt

    d = str(tmp_path)
    assert run("pki", "init", d).returncode == 0
    for kind, name in (("server", "srv"), ("client", "gone")):
        assert run("pki", "issue", kind, name, "--dir", d, "--dns", "localhost").returncode == 0
    assert run("pki", "revoke", "gone", "--dir", d).returncode == 0
    revoked = _crl_serials(tmp_path / "crl.pem")
    assert len(revoked) == 1
    args = ["--upstream", "http://127.0.0.1:9", "--allow-all"]
    args += ["--cert", f"{d}/srv.crt", "--key", f"{d}/srv.key", "--cacert", f"{d}/ca.crt"]
    args += ["--crl", f"{d}/crl.pem"]

    r = run("pki", "crl", "--dir", d, "--days", "1")
    assert r.returncode == 0, r.stderr
    assert "1 revoked certificate(s), next update in 1 day(s)" in r.stdout
    assert _crl_serials(tmp_path / "crl.pem") == revoked  # the same entries, re-signed
    r = run("check", *args)
    assert r.returncode == 0, r.stderr  # a warning, not a failure
    assert f"--crl: {d}/crl.pem: the CRL nextUpdate" in r.stderr
    assert "is less than 24 h away" in r.stderr and "mtls-proxy pki crl --dir DIR" in r.stderr

    assert run("pki", "crl", "--dir", d, "--days", "30").returncode == 0
    r = run("check", *args)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr

    pki.refresh_crls(tmp_path, 1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    r = run("check", *args)
    assert r.returncode == 0 and "has passed" in r.stderr, r.stderr
    assert run("pki", "crl", "--dir", d, "--days", "0").returncode == 2
