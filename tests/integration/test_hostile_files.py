"""Hostile material files against the real proxy: a FIFO, /dev/zero, oversized or endless files,
2,000 duplicate routes, duplicate YAML keys, YAML errors near secrets and a read that never
returns. Each is a counted, reported reload failure; none blocks a later reload or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from tests.helpers import (
    ALLOWED_URI,
    Pki,
    Proxy,
    Upstream,
    client_ctx,
    get,
    handshake_rejected,
    make_test_pki,
    proxy_cmd,
    run_proxy,
)
from tests.integration.test_reload import wait_reload

ALLOW_GOOD = f"allow: [{{uri: '{ALLOWED_URI}'}}]\n"
ALLOW_NOBODY = "allow: [{cn: nobody}]\n"
FAILURES = 'mtls_proxy_reloads_total{result="failure"}'


@pytest.fixture
def own(tmp_path: Path) -> Pki:
    """A PKI of the test's own: revocations write DIR/crl.pem, files may be replaced."""
    return make_test_pki(tmp_path / "pki")


def status(p: Proxy) -> dict[str, object]:
    return dict(json.loads(p.admin_get("/status")[1]))


def wait_error(p: Proxy, *needles: str) -> str:
    """Wait until /status reports a failed reload whose error holds every needle."""
    deadline = time.monotonic() + 10
    last: object = None
    while time.monotonic() < deadline:
        last = status(p)["last_reload"]
        if isinstance(last, dict) and not last["ok"]:
            error = str(last["error"])
            if all(n in error for n in needles):
                return error
        time.sleep(0.05)
    raise AssertionError(f"no failed reload with {needles}; last_reload: {last}")


def handlers_installed(p: Proxy) -> None:
    """The proxy logs "ready" just before run() installs its SIGHUP handler (a SIGHUP in that
    window kills it); the admin listener answers only after, so one request closes the window."""
    assert p.admin_get("/healthz")[0] == 200


def replace(path: Path, make: str | Path | None = None) -> None:
    """Put something else at *path*: text, a symlink to a Path, or (None) a FIFO."""
    path.unlink()
    if make is None:
        os.mkfifo(path)
    elif isinstance(make, Path):
        path.symlink_to(make)
    else:
        path.write_text(make)


def sigterm_exits_promptly(p: Proxy) -> None:
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    rc = p.proc.wait(8)
    assert rc == 0 and time.monotonic() - t0 < 5


def test_int040_fifo_policy_or_crl_does_not_block_later_reloads_or_sigterm(
    own: Pki, upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    """INT-040: a FIFO at the policy or CRL path used to block the reload thread in open()
    forever: every later reload waited behind it (a revocation was never applied) and SIGTERM
    waited for the thread. It is now refused at once, and the next good files apply."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_GOOD)
    crl = pki.revoke(own.dir, "other")
    up = f"http://127.0.0.1:{upstream.port}"
    args = ("--crl", str(crl), "--policy", str(policy))
    with run_proxy(own, up, *args, default_policy=False, loop=loop) as p:
        good = client_ctx(own, "good")
        assert get(p.port, good)[0] == 200
        replace(policy)  # a FIFO
        p.proc.send_signal(signal.SIGHUP)
        error = wait_error(p, f"--policy: {policy}: is a FIFO (named pipe), not a regular file")
        assert "cannot" not in error
        replace(policy, ALLOW_GOOD)
        replace(crl)
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, f"--crl: {crl}: is a FIFO (named pipe), not a regular file")
        assert get(p.port, good)[0] == 200  # the old material and policy still serve
        crl.unlink()
        pki.revoke(own.dir, "good")  # the revocation that must not be lost
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1, "success")
        assert status(p)["last_reload"]["ok"] is True  # type: ignore[index]
        assert handshake_rejected(p.port, good)
        assert p.metric(FAILURES) >= 2
        sigterm_exits_promptly(p)


def test_int041_dev_zero_and_oversized_files_are_refused_with_memory_bounded(
    own: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """INT-041: a symlink to /dev/zero and oversized files were read whole (hundreds of MB, then
    an uncounted MemoryError). Now: refused by file type or size, a reason in /status, and the
    process's peak memory barely moves (at most one cap's worth is ever read)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_GOOD)
    crl = pki.revoke(own.dir, "other")
    cacert = tmp_path / "ca.crt"
    cacert.write_bytes(Path(own.ca).read_bytes())
    args = [
        "--cert",
        own.crt("server"),
        "--key",
        own.key("server"),
        "--cacert",
        str(cacert),
        "--crl",
        str(crl),
        "--policy",
        str(policy),
    ]
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(own, up, *args, default_policy=False, extra_cert_args=False) as p:
        handlers_installed(p)
        good = client_ctx(own, "good")
        before = p.rss_kb("VmHWM")
        saved = crl.read_bytes()
        replace(crl, Path("/dev/zero"))
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, f"--crl: {crl}: is a character device, not a regular file")
        replace(crl, saved.decode())
        big = tmp_path / "big-ca.crt"
        with big.open("wb") as f:
            f.truncate(50 * 1024 * 1024)
        replace(cacert, big)
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, f"--cacert: {cacert}: larger than the 16 MiB limit for a CA bundle file")
        replace(cacert, Path(own.ca))
        # /proc files say size 0 and are endless: the read stops at the cap.
        replace(policy, Path("/proc/self/pagemap"))
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, f"--policy: {policy}: larger than the 1 MiB limit for a policy file")
        assert get(p.port, good)[0] == 200
        assert p.metric(FAILURES) >= 3
        replace(policy, ALLOW_GOOD)
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1, "success")
        assert p.rss_kb("VmHWM") - before < 32 * 1024
        assert get(p.port, good)[0] == 200


def test_int042_two_thousand_duplicate_routes_are_refused_in_linear_memory(
    tp: Pki, tmp_path: Path
) -> None:
    """INT-042: 2,000 copies of one route in a 14 KB file made ~2,000,000 messages (~1 GB). The
    check is linear now, and the report names a few duplicates and counts the rest."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("allow: [{cn: a}]\nroutes:\n" + "  - {path_prefix: /a, allow: []}\n" * 2000)
    assert policy.stat().st_size < 80 * 1024
    cmd = proxy_cmd(
        "check",
        "--upstream",
        "http://127.0.0.1:9",
        *tp.material(),
        "--policy",
        str(policy),
    )
    errfile = tmp_path / "stderr.txt"
    with errfile.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    # os.wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix in earlier children).
    deadline = time.monotonic() + 120
    while True:
        pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(wstatus)
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("check did not finish")
        time.sleep(0.05)
    text = errfile.read_text()
    assert proc.returncode == 2, text[:2000]
    assert f"{policy}: routes[1]: routes[0] already routes * /a" in text
    assert f"{policy}: routes: 1989 more routes repeat an earlier one" in text
    assert len(text) < 4000
    assert usage.ru_maxrss < 200 * 1024  # KiB; before: ~1 GB


def test_int042_duplicate_routes_reload_peak_memory(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """INT-042: the same file at reload: refused, and the process's peak memory stays put."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_GOOD)
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        handlers_installed(p)
        before = p.rss_kb("VmHWM")
        policy.write_text(ALLOW_GOOD + "routes:\n" + "  - {path_prefix: /a, allow: []}\n" * 2000)
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, "routes[1]: routes[0] already routes * /a", "1989 more routes")
        assert p.rss_kb("VmHWM") - before < 64 * 1024  # before: ~1 GB


def test_int043_duplicate_yaml_key_is_an_error_naming_the_line(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """INT-043: `routes:` twice silently dropped the first list (its deny rules with it)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_GOOD)
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        handlers_installed(p)
        policy.write_text(
            ALLOW_GOOD + "routes:\n  - {path_prefix: /admin, allow: []}\nroutes: []\n"
        )
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, f"{policy}: line 4, column 1: duplicate key 'routes' (first at line 2)")
        assert get(p.port, client_ctx(tp, "good"), "/admin")[0] == 200  # the old policy
    config = tmp_path / "c.yaml"
    config.write_text(f"upstream: {up}\ntls:\n  cacert: {tp.ca}\n  cacert: /etc/hostname\n")
    r = subprocess.run(
        proxy_cmd(
            "check",
            "--config",
            str(config),
            "--cert",
            tp.crt("server"),
            "--key",
            tp.key("server"),
            "--allow-cn",
            "x",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{config}: line 4, column 3: duplicate key 'cacert' (first at line 3)" in r.stderr


def test_int044_yaml_error_never_echoes_a_password_or_the_file(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """INT-044: PyYAML's message quotes the offending line: a `key_password:` line with an
    unterminated quote printed the password. Errors now name file, line, column and problem."""
    secret = "hunter2-correct-horse"
    config = tmp_path / "c.yaml"
    config.write_text(f'upstream: http://127.0.0.1:9\ntls:\n  key_password: "{secret}\n')
    r = subprocess.run(
        proxy_cmd("check", "--config", str(config), "--allow-cn", "x"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{config}: not valid YAML at line 4, column 1" in r.stderr
    assert secret not in r.stderr and "hunter" not in r.stderr
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_GOOD)
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False) as p:
        handlers_installed(p)
        policy.write_text(f"allow: [{{sha256: @{secret}}}]\n")
        p.proc.send_signal(signal.SIGHUP)
        error = wait_error(p, f"{policy}: not valid YAML at line 1, column ")
        assert secret not in error and "@" not in error
        deadline = time.monotonic() + 5  # the log line travels through a pipe
        while not any("reload failed" in line for line in p.logs):
            assert time.monotonic() < deadline, "no 'reload failed' log line"
            time.sleep(0.05)
        assert not any(secret in line for line in p.logs)


INJECT = """\
# Test-only fault injection (INT-045): a read that never returns, as on a hung NFS or FUSE
# mount, for any file next to which a `<file>.stuck` marker exists; the reload deadline is 1 s.
import os
import threading

import mtls_proxy.material.loader as loader

_real = loader.read_file


def read_file(path, key, what):
    if path is not None and os.path.exists(path + ".stuck"):
        threading.Event().wait()
    return _real(path, key, what)


loader.read_file = read_file
import mtls_proxy.server.reloader as reloader  # noqa: E402 -- after the patch (tls.py imports it)

reloader.RELOAD_TIMEOUT = 1.0
"""


def test_int045_stuck_reload_does_not_block_the_next_reload_or_shutdown(
    tp: Pki, upstream: Upstream, tmp_path: Path, loop: str
) -> None:
    """INT-045: a reload whose read never returns is abandoned at its deadline and counted as
    a failure with its reason in /status; the next reload applies; SIGTERM during a stuck
    reload exits at once (the reading thread is a daemon nobody joins)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_GOOD)
    marker = tmp_path / "policy.yaml.stuck"
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, up, "--policy", str(policy), default_policy=False, loop=loop, env=env) as p:
        good = client_ctx(tp, "good")
        assert get(p.port, good)[0] == 200
        marker.touch()
        p.proc.send_signal(signal.SIGHUP)
        wait_error(p, "reading the files took longer than 1 s")
        assert p.metric(FAILURES) >= 1
        marker.unlink()
        policy.write_text(ALLOW_NOBODY)
        p.proc.send_signal(signal.SIGHUP)
        wait_reload(p, 1, "success")
        assert status(p)["last_reload"]["ok"] is True  # type: ignore[index]
        assert get(p.port, good)[0] == 403  # the new policy applies
        marker.touch()
        p.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)  # the reload is now stuck in its read
        sigterm_exits_promptly(p)
