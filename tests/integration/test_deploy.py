"""Deployment artefacts, checked: the image's command line, the Dockerfile's rules, the
Kubernetes overlays (rendered and schema-validated), the systemd unit, and a sidecar in network
namespaces."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.helpers import ALLOWED_URI, Pki

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


def instructions(name: str) -> list[str]:
    return [i["value"] for i in dockerfile().structure if i["instruction"] == name]


def test_dockerfile_rules() -> None:
    froms = instructions("FROM")
    assert len(froms) == 2  # multi-stage
    for base in froms:
        image = base.split()[0]
        tag = image.split(":", 1)[1]
        assert image.startswith("python:") and tag[0].isdigit() and tag.count(".") == 2, base
        assert "latest" not in image
    user = instructions("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert instructions("EXPOSE") == ["8443 9901"]
    health = instructions("HEALTHCHECK")[-1]
    assert "/healthz" in health and "curl" not in health and "wget" not in health
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["mtls-proxy"]
    assert json.loads(instructions("CMD")[-1]) == ["serve"]
    env = dockerfile().envs
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    copied = [Path(t).name for value in instructions("COPY") for t in value.split()]
    assert copied, "the build copies its sources"
    for name in copied:
        assert not name.endswith((".key", ".pem", ".crt", ".p12", ".jks", ".env")), name
        assert name not in ("secrets", ".git", "certs"), name
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*" and "!mtls_proxy/" in ignore


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's install steps: build the wheel, install it (and only it, with jh2, the HTTP/2
    library the image adds) into a fresh venv."""
    d = tmp_path_factory.mktemp("image")
    wheels = d / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    wheel = next(wheels.glob("mtls_proxy-*.whl"))
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel), "jh2"], check=True, timeout=600
    )
    return venv


def test_image_command_line_and_healthcheck(image_venv: Path, tp: Pki, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_PROXY_")}
    env.update(dockerfile().envs)
    listen, admin = free_port(), free_port()
    env.update(
        MTLS_PROXY_LISTEN=f"127.0.0.1:{listen}",
        MTLS_PROXY_ADMIN=f"127.0.0.1:{admin}",
        MTLS_PROXY_UPSTREAM="http://127.0.0.1:9",
        MTLS_PROXY_CERT=tp.crt("server"),
        MTLS_PROXY_KEY=tp.key("server"),
        MTLS_PROXY_CACERT=tp.ca,
        MTLS_PROXY_ALLOW_URI=ALLOWED_URI,
        PATH=f"{image_venv / 'bin'}:{env['PATH']}",
    )
    before = sorted(p for p in image_venv.rglob("*"))
    argv = json.loads(instructions("ENTRYPOINT")[-1]) + json.loads(instructions("CMD")[-1])
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        ready = ""
        while time.monotonic() < deadline and '"msg": "ready"' not in ready:
            ready = proc.stderr.readline()
        assert '"msg": "ready"' in ready, ready
        health = instructions("HEALTHCHECK")[-1]
        cmd = json.loads(health[health.index("CMD") + 3 :].strip())
        cmd = [c.replace("127.0.0.1:9901", f"127.0.0.1:{admin}") for c in cmd]
        assert subprocess.run(cmd, env=env, timeout=10).returncode == 0
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    # Read-only root filesystem: running wrote nothing into the install or the working dir.
    assert sorted(p for p in image_venv.rglob("*")) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(image_venv: Path, tmp_path: Path) -> None:
    unit = (ROOT / "deploy/systemd/mtls-proxy.service").read_text()
    for key in (
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
    ):
        assert key in unit
    env_file = tmp_path / "mtls-proxy.env"
    env_file.write_text((ROOT / "deploy/systemd/mtls-proxy.env").read_text())
    local = tmp_path / "mtls-proxy.service"
    local.write_text(
        unit.replace("/usr/local/bin/mtls-proxy", str(image_venv / "bin" / "mtls-proxy")).replace(
            "/etc/mtls-proxy/mtls-proxy.env", str(env_file)
        )
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "mtls-proxy.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
    # The env file is a valid configuration for the proxy (paths aside).
    for line in env_file.read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.split("=", 1)[0].startswith("MTLS_PROXY_")


# -- a sidecar in network namespaces -----------------------------------------------------------
def ns(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    pod, client = f"mtlspod{os.getpid()}", f"mtlscli{os.getpid()}"
    r = ns("netns", "add", pod, check=False)
    if r.returncode != 0:
        pytest.skip(f"network namespaces are not available here: {r.stderr.strip()}")
    try:
        ns("netns", "add", client)
        ns(
            "link",
            "add",
            f"vp{os.getpid() % 10000}",
            "type",
            "veth",
            "peer",
            "name",
            f"vc{os.getpid() % 10000}",
        )
        ns("link", "set", f"vp{os.getpid() % 10000}", "netns", pod)
        ns("link", "set", f"vc{os.getpid() % 10000}", "netns", client)
        for name, dev, addr in (
            (pod, f"vp{os.getpid() % 10000}", "10.231.0.1/24"),
            (client, f"vc{os.getpid() % 10000}", "10.231.0.2/24"),
        ):
            ns("-n", name, "addr", "add", addr, "dev", dev)
            ns("-n", name, "link", "set", dev, "up")
            ns("-n", name, "link", "set", "lo", "up")
        yield pod, client
    finally:
        ns("netns", "del", pod, check=False)
        ns("netns", "del", client, check=False)


def test_sidecar_in_network_namespaces(
    tp: Pki, namespaces: tuple[str, str], tmp_path: Path
) -> None:
    pod, client = namespaces
    app = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pod,
            sys.executable,
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (tmp_path / "index.html").write_text("hello from the app")
    proxy = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pod,
            sys.executable,
            "-m",
            "mtls_proxy",
            "serve",
            "--listen",
            "10.231.0.1:8443",
            "--upstream",
            "http://127.0.0.1:8080",
            *tp.material(),
            "--allow-uri",
            ALLOWED_URI,
            "--admin",
            "127.0.0.1:9901",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proxy.stderr is not None
        line = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and '"msg": "ready"' not in line:
            line = proxy.stderr.readline()
        assert '"msg": "ready"' in line, line

        def curl(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    client,
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "--cacert",
                    tp.ca,
                    "--resolve",
                    "localhost:8443:10.231.0.1",
                    *extra,
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )

        ok = curl("--cert", tp.crt("good"), "--key", tp.key("good"), "https://localhost:8443/")
        assert ok.returncode == 0 and ok.stdout == "hello from the app", ok.stderr
        denied = curl(
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cert",
            tp.crt("other"),
            "--key",
            tp.key("other"),
            "https://localhost:8443/",
        )
        assert denied.stdout == "403"
        # The app's own port is not reachable from outside the pod at all.
        direct = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                client,
                "curl",
                "-sS",
                "--max-time",
                "3",
                "http://10.231.0.1:8080/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert direct.returncode != 0
    finally:
        proxy.terminate()
        app.terminate()
        proxy.wait(20)
        app.wait(20)
