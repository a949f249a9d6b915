"""Deployment artefacts, checked: the Dockerfile's rules and labels, the image's command line and
healthcheck run as the image runs them (non-root, read-only root filesystem), the systemd unit
(verified, and its ExecStart run as a DynamicUser would run it, the key read through a
credentials directory), and a sidecar in network namespaces. The Kubernetes overlays are
tests/integration/test_kubernetes.py's."""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from mtls_proxy import __version__
from tests.helpers import ALLOWED_URI, Pki, run_upstream

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
    images = {base.split()[0] for base in froms}
    assert len(images) == 1, f"both stages on the same base: {froms}"
    (image,) = images
    tag = image.split(":", 1)[1]
    assert image.startswith("python:") and tag[0].isdigit() and tag.count(".") == 2, image
    assert tag.endswith("-slim-bookworm") and "latest" not in image
    user = instructions("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert instructions("EXPOSE") == ["8443 9901"]
    health = instructions("HEALTHCHECK")[-1]
    assert "/healthz" in health and "curl" not in health and "wget" not in health
    assert "MTLS_PROXY_ADMIN" in health and "9901/healthz" not in health  # follows the variable
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["mtls-proxy"]
    assert json.loads(instructions("CMD")[-1]) == ["serve"]
    env = dockerfile().envs
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # The admin port listens on all interfaces in the image (README "Deploy" says why).
    assert env["MTLS_PROXY_ADMIN"] == "0.0.0.0:9901"
    copied = [Path(t).name for value in instructions("COPY") for t in value.split()]
    assert copied, "the build copies its sources"
    for name in copied:
        assert not name.endswith((".key", ".pem", ".crt", ".p12", ".jks", ".env")), name
        assert name not in ("secrets", ".git", "certs"), name
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*" and "!mtls_proxy/" in ignore


def test_dockerfile_oci_labels() -> None:
    """org.opencontainers.image.* labels that agree with the package and the base."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    labels = {
        k.removeprefix("org.opencontainers.image."): v
        for k, v in dockerfile().labels.items()
        if k.startswith("org.opencontainers.image.")
    }
    assert labels["title"] == project["name"]
    assert labels["description"] == project["description"]
    assert labels["version"] == __version__
    assert labels["licenses"] == project["license"]
    assert labels["base.name"] == f"docker.io/library/{instructions('FROM')[-1].split()[0]}"


# -- processes run as the image and the unit run them -------------------------------------------
IMAGE_UID = 65532  # the Dockerfile's USER
SERVICE_UID = 61234  # one of the UIDs systemd's DynamicUser= allocates (61184-65519)


@functools.cache
def can_isolate() -> bool:
    """Root, with mount namespaces and setpriv: processes can run as another UID on a
    read-only root filesystem."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return False
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -o remount,ro,bind /"],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def confined(argv: list[str], uid: int, read_only: list[Path]) -> list[str]:
    """*argv* as UID/GID *uid* without supplementary groups, in a private mount namespace whose
    root filesystem and *read_only* paths are mounted read-only (what `docker run --read-only`
    and ProtectSystem=strict give)."""
    binds = "".join(
        f'mount --bind "{p}" "{p}" && mount -o remount,ro,bind "{p}" && ' for p in read_only
    )
    script = (
        f"{binds}mount -o remount,ro,bind / && "
        f'exec setpriv --reuid {uid} --regid {uid} --clear-groups -- "$@"'
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def shared_dir(prefix: str) -> Path:
    """A fresh directory other UIDs can traverse (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    deadline, line = time.monotonic() + 20, ""
    while time.monotonic() < deadline and '"msg": "ready"' not in line:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
    assert '"msg": "ready"' in line, line


@pytest.fixture(scope="module")
def image_venv() -> Iterator[Path]:
    """The image's install steps: build the wheel, install it (and only it, with jh2, the HTTP/2
    library the image adds) into a fresh venv, readable by the image's UID."""
    d = shared_dir("mtls-image-")
    try:
        wheels = d / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
            check=True,
            timeout=300,
        )
        venv = d / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        wheel = next(wheels.glob("mtls_proxy-*.whl"))
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", str(wheel), "jh2"],
            check=True,
            timeout=600,
        )
        yield venv
    finally:
        shutil.rmtree(d)


def test_image_command_line_and_healthcheck(image_venv: Path, tp: Pki) -> None:
    """The image's command line and HEALTHCHECK, run as the image runs them: UID 65532 on a
    read-only root filesystem (when this machine can confine a process; else unconfined, and
    the install is still checked for writes)."""
    material = shared_dir("mtls-image-tls-")
    try:
        for name, src in (("tls.crt", tp.crt("server")), ("tls.key", tp.key("server"))):
            shutil.copy(src, material / name)
        shutil.copy(tp.ca, material / "ca.crt")
        os.chown(material / "tls.key", IMAGE_UID, IMAGE_UID)
        (material / "tls.key").chmod(0o400)
        for name in ("tls.crt", "ca.crt"):
            (material / name).chmod(0o444)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_PROXY_")}
        env.update(dockerfile().envs)
        listen, admin, nothing = free_port(), free_port(), free_port()
        env.update(
            HOME="/",
            MTLS_PROXY_LISTEN=f"127.0.0.1:{listen}",
            MTLS_PROXY_ADMIN=f"0.0.0.0:{admin}",  # as the image has it, on a free port
            MTLS_PROXY_UPSTREAM="http://127.0.0.1:9",
            MTLS_PROXY_CERT_DIR=str(material),
            MTLS_PROXY_ALLOW_URI=ALLOWED_URI,
            PATH=f"{image_venv / 'bin'}:{env['PATH']}",
        )

        def run_as_image(argv: list[str]) -> list[str]:
            return confined(argv, IMAGE_UID, [image_venv.parent]) if can_isolate() else argv

        before = sorted((p, p.stat().st_mtime_ns) for p in image_venv.rglob("*"))
        argv = json.loads(instructions("ENTRYPOINT")[-1]) + json.loads(instructions("CMD")[-1])
        proc = subprocess.Popen(
            run_as_image(argv), env=env, cwd="/", stderr=subprocess.PIPE, text=True
        )
        try:
            wait_ready(proc)
            health = instructions("HEALTHCHECK")[-1]
            check = run_as_image(json.loads(health[health.index("CMD") + 3 :].strip()))

            def healthy(admin_env: str) -> bool:
                r = subprocess.run(
                    check, env={**env, "MTLS_PROXY_ADMIN": admin_env}, timeout=20, cwd="/"
                )
                return r.returncode == 0

            # The healthcheck follows MTLS_PROXY_ADMIN: healthy where the admin port is,
            # unhealthy where nothing listens.
            assert healthy(f"0.0.0.0:{admin}")
            assert healthy(f"127.0.0.1:{admin}")
            assert not healthy(f"0.0.0.0:{nothing}")
            assert healthy("off")
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
        # Nothing was written into the install (confined: it could not have been).
        assert sorted((p, p.stat().st_mtime_ns) for p in image_venv.rglob("*")) == before
    finally:
        shutil.rmtree(material)


# -- systemd -------------------------------------------------------------------------------------
UNIT = ROOT / "deploy" / "systemd" / "mtls-proxy.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "mtls-proxy.env"


def unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def test_systemd_unit_and_readme_install_into_a_venv() -> None:
    """No bare `pip install` (Debian 12 refuses it, PEP 668): a venv under /opt/mtls-proxy, in
    the unit and in the README; the key reaches the DynamicUser through LoadCredential=."""
    unit = UNIT.read_text()
    readme = (ROOT / "README.md").read_text()
    for text in (unit, readme):
        assert "python3 -m venv /opt/mtls-proxy" in text
        assert "/opt/mtls-proxy/bin/pip install" in text
    (exec_start,) = unit_values("ExecStart")
    assert exec_start == "/opt/mtls-proxy/bin/mtls-proxy serve --cert-dir %d"
    credentials = dict(v.split(":", 1) for v in unit_values("LoadCredential"))
    assert set(credentials) == {"tls.crt", "tls.key", "ca.crt"}
    assert unit_values("DynamicUser") == ["yes"]
    # The environment file leaves the material to the credentials (--cert-dir fills only what
    # nothing else sets).
    lines = [ln for ln in ENV_FILE.read_text().splitlines() if ln and not ln.startswith("#")]
    keys = [ln.split("=", 1)[0] for ln in lines]
    assert keys and all(k.startswith("MTLS_PROXY_") for k in keys)
    assert not {"MTLS_PROXY_CERT", "MTLS_PROXY_KEY", "MTLS_PROXY_CACERT"} & set(keys)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(image_venv: Path, tmp_path: Path) -> None:
    unit = UNIT.read_text()
    for key in (
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
    ):
        assert key in unit
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (etc / "tls" / name).write_text("placeholder\n")
    shutil.copy(ENV_FILE, etc / "mtls-proxy.env")
    local = tmp_path / "mtls-proxy.service"
    local.write_text(
        unit.replace("/opt/mtls-proxy", str(image_venv)).replace("/etc/mtls-proxy", str(etc))
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "mtls-proxy.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.skipif(not can_isolate(), reason="needs root, unshare and setpriv")
def test_systemd_service_reads_its_key_through_credentials(image_venv: Path, tp: Pki) -> None:
    """The unit's ExecStart, its environment file and its LoadCredential= files, laid out as
    systemd does for a DynamicUser service: the key at its configured path is root's 0600 file,
    unreadable by the service's UID; the copy in the credentials directory (0400, owned by that
    UID) is what the proxy serves with, on a read-only root filesystem."""
    base = shared_dir("mtls-systemd-")
    try:
        etc = base / "etc" / "mtls-proxy"
        (etc / "tls").mkdir(parents=True)
        etc.chmod(0o755)
        (etc / "tls").chmod(0o755)  # even traversable, the key is out of the service's reach
        for name, src in (
            ("tls.crt", tp.crt("server")),
            ("tls.key", tp.key("server")),
            ("ca.crt", tp.ca),
        ):
            shutil.copy(src, etc / "tls" / name)
        (etc / "tls" / "tls.key").chmod(0o600)
        # What systemd makes of LoadCredential=: /run/credentials/mtls-proxy.service, 0500, with
        # one 0400 file per credential, all owned by the service's UID.
        creds = base / "run" / "credentials" / "mtls-proxy.service"
        creds.mkdir(parents=True)
        (base / "run").chmod(0o755)
        (base / "run" / "credentials").chmod(0o755)
        for value in unit_values("LoadCredential"):
            name, path = value.split(":", 1)
            target = creds / name
            shutil.copy(path.replace("/etc/mtls-proxy", str(etc)), target)
            os.chown(target, SERVICE_UID, SERVICE_UID)
            target.chmod(0o400)
        os.chown(creds, SERVICE_UID, SERVICE_UID)
        creds.chmod(0o500)

        env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(creds)}
        for line in ENV_FILE.read_text().splitlines():
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k] = v
        listen, admin = free_port(), free_port()
        env.update(
            MTLS_PROXY_LISTEN=f"127.0.0.1:{listen}",
            MTLS_PROXY_ADMIN=f"127.0.0.1:{admin}",
            MTLS_PROXY_ALLOW_URI=ALLOWED_URI,
        )
        (exec_start,) = unit_values("ExecStart")
        argv = [
            w.replace("%d", str(creds)).replace("/opt/mtls-proxy", str(image_venv))
            for w in shlex.split(exec_start)
        ]

        # Without the credentials, the service's UID cannot read the key.
        direct = [*argv[:-2], "--cert-dir", str(etc / "tls")]
        direct[1] = "check"
        r = subprocess.run(
            confined(direct, SERVICE_UID, [image_venv.parent]),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and "tls.key" in r.stderr, r.stdout + r.stderr

        with run_upstream() as up:
            env["MTLS_PROXY_UPSTREAM"] = f"http://127.0.0.1:{up.port}"
            proc = subprocess.Popen(
                confined(argv, SERVICE_UID, [image_venv.parent]),
                env=env,
                cwd="/",
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_ready(proc)
                out = subprocess.run(
                    [
                        "curl",
                        "-sS",
                        "--max-time",
                        "10",
                        "--cacert",
                        tp.ca,
                        "--cert",
                        tp.crt("good"),
                        "--key",
                        tp.key("good"),
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code} %{ssl_verify_result}",
                        f"https://localhost:{listen}/",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert out.stdout == "200 0", out.stderr
                assert len(up.seen) == 1
            finally:
                proc.terminate()
                assert proc.wait(20) == 0
    finally:
        shutil.rmtree(base)


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
