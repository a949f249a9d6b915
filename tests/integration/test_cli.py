"""`check`, `serve` refusing bad input with exit 2, `demo --self-test`, and `pki`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import ALLOWED_URI, Pki, proxy_cmd


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        proxy_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env
    )


def base(tp: Pki, cert: str = "server", key: str = "server") -> list[str]:
    return [
        "--upstream",
        "http://127.0.0.1:9",
        "--cert",
        tp.crt(cert),
        "--key",
        tp.key(key),
        "--cacert",
        tp.ca,
    ]


def test_check_ok_prints_a_summary(tp: Pki) -> None:
    r = run("check", *base(tp), "--allow-uri", ALLOWED_URI, "--allow-cn", "batch")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "CN=localhost" in out and "not_after:" in out and "sha256:" in out
    assert "trusted CAs:       1" in out
    assert "rules:             2" in out and f"uri={ALLOWED_URI}" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"--cert": "/nonexistent/tls.crt"}, "/nonexistent/tls.crt: file not found"),
        ({"--key": "KEY:good"}, "does not match the certificate"),
        ({"--cert": "KEY:server"}, "not a PEM certificate file"),
        ({"--cacert": "KEY:server"}, "not a PEM certificate file"),
        ({"--allow-uri": "not a uri"}, "--allow-uri"),
        ({"--allow-uri": "spiffe://x/**/y"}, "'**' is only allowed as the last path segment"),
        ({"--allow-all": None, "--allow-cn": "x"}, "--allow-all cannot be combined"),
        ({"--listen": "nope"}, "--listen: expected HOST:PORT"),
        ({"--client-auth": "sometimes"}, "--client-auth: must be one of"),
        ({"--identity-headers": "xfcc,bogus"}, "unknown dialect 'bogus'"),
        ({"--idle-timeout": "0"}, "--idle-timeout: must be > 0"),
    ],
    ids=[
        "missing-file",
        "key-mismatch",
        "not-a-cert",
        "ca-not-a-cert",
        "bad-uri",
        "bad-glob",
        "allow-all-and-cn",
        "bad-listen",
        "bad-client-auth",
        "bad-dialect",
        "zero-timeout",
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_bad_input_exits_2_naming_the_problem(
    tp: Pki, command: str, args: dict[str, str | None], needle: str
) -> None:
    opts: dict[str, str | None] = {
        "--upstream": "http://127.0.0.1:9",
        "--cert": tp.crt("server"),
        "--key": tp.key("server"),
        "--cacert": tp.ca,
        "--listen": "127.0.0.1:0",
        "--admin": "off",
    }
    if not any(k.startswith("--allow") for k in args):
        opts["--allow-cn"] = "x"
    for k, v in args.items():
        opts[k] = (
            v.replace("KEY:good", tp.key("good")).replace("KEY:server", tp.key("server"))
            if v
            else v
        )
    argv = [x for k, v in opts.items() for x in ((k, v) if v is not None else (k,))]
    r = run(command, *argv, timeout=20)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
    # The private key never leaks into an error message.
    key_body = Path(tp.key("server")).read_text().splitlines()[1]
    assert key_body not in r.stderr and "PRIVATE KEY" not in r.stderr


def test_unknown_config_key_names_file_and_key(tp: Pki, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream: http://127.0.0.1:9\ntls:\n  cacrt: /x\nlisten_addr: 1\n")
    r = run("check", "--config", str(cfg), *base(tp)[2:], "--allow-cn", "x")
    assert r.returncode == 2
    assert f"{cfg}: unknown key tls.'cacrt' (did you mean 'cacert'?)" in r.stderr
    assert f"{cfg}: unknown key 'listen_addr' (did you mean 'listen'?)" in r.stderr


def test_encrypted_key_with_password_from_file(tp: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(tp.key("server")).read_bytes(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    argv = [
        "--upstream",
        "http://127.0.0.1:9",
        "--cert",
        tp.crt("server"),
        "--key",
        str(enc),
        "--cacert",
        tp.ca,
        "--allow-cn",
        "x",
    ]
    assert run("check", *argv, "--key-password", f"file:{pw}").returncode == 0
    r = run("check", *argv, "--key-password", "wrong")
    assert r.returncode == 2 and "wrong --key-password" in r.stderr
    r = run("check", *argv)
    assert r.returncode == 2 and "the key is encrypted" in r.stderr


def test_demo_self_test_passes() -> None:
    r = run("demo", "--self-test", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[PASS]") == 3 and "demo self-test: OK" in r.stdout


def test_pki_init_and_issue(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert run("pki", "init", str(d)).returncode == 0
    r = run(
        "pki",
        "issue",
        "client",
        "svc",
        "--dir",
        str(d),
        "--uri",
        "spiffe://x/y",
        "--dns",
        "svc.local",
        "--ou",
        "team",
    )
    assert r.returncode == 0, r.stderr
    assert (d / "svc.key").stat().st_mode & 0o777 == 0o600
    v = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(d / "ca.crt"),
            "-untrusted",
            str(d / "intermediate.crt"),
            "-purpose",
            "sslclient",
            str(d / "svc.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert v.returncode == 0, v.stdout + v.stderr


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("mtls-proxy ")


def test_client_http_refuses_the_pure_python_http_parser(tp: Pki) -> None:
    """docs/security.md, DEP-02: the pure-Python parsers give weaker verdicts; never serve with
    them. `client --http` parses the local app's requests with aiohttp (serve no longer loads
    it: its admin port is adminhttp.py, on llhttp)."""
    import os

    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    r = run(
        "client",
        *("--listen", "127.0.0.1:0", "--target", "localhost:1", "--admin", "off", "--http"),
        *("--cert", tp.crt("good"), "--key", tp.key("good"), "--cacert", tp.ca),
        timeout=30,
        env=env,
    )
    assert r.returncode == 1
    assert "refusing to start: aiohttp's pure-Python HTTP parser is in use" in r.stderr


def test_a_chain_in_the_wrong_order_is_refused(tp: Pki, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(Path(tp.crt("server")).read_bytes())[0]
    bad = tmp_path / "server.crt"
    bad.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, leaf)))
    args = base(tp)
    args[args.index("--cert") + 1] = str(bad)
    r = run("check", *args, "--allow-uri", ALLOWED_URI)
    assert r.returncode == 2
    assert f"--cert: {bad}: certificate 2 (CN=localhost) did not issue certificate 1" in r.stderr


@pytest.mark.parametrize("command", ["serve", "check", "explain", "client", "demo", "pki"])
def test_every_subcommand_prints_its_help(command: str) -> None:
    """A help text with a literal % ("30 % less") made argparse raise TypeError for serve."""
    r = subprocess.run(proxy_cmd(command, "--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: mtls-proxy {command}")
