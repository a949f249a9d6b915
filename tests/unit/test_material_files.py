"""Hostile material files: only regular files are read, each kind under a size cap, YAML with
duplicate keys is refused, YAML errors never echo the file, and policy checks stay linear."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from mtls_proxy.core.config import load_config
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.policyspec import load_yaml, parse_policy_file
from mtls_proxy.material.contexts import upstream_context
from mtls_proxy.material.loader import DetachedLoads, read_file

MIB = 1024 * 1024
BASE = {
    "upstream": "http://127.0.0.1:8080",
    "cert": "s.crt",
    "key": "s.key",
    "cacert": "ca.crt",
    "allow-cn": ["x"],
}


def refused(call: Callable[[], object], within: float = 5.0) -> str:
    """The ConfigError message of *call*, run in a daemon thread: a read that blocks (a FIFO)
    fails the test instead of hanging it."""
    out: list[BaseException | object] = []
    t = threading.Thread(target=lambda: out.append(_catch(call)), daemon=True)
    t.start()
    t.join(within)
    assert out, f"still blocked after {within} s"
    result = out[0]
    assert isinstance(result, ConfigError), f"expected a ConfigError, got {result!r}"
    return str(result)


def _catch(call: Callable[[], object]) -> BaseException | object:
    try:
        return call()
    except Exception as exc:  # the test inspects whatever was raised
        return exc


# -- INT-040 / INT-041: only regular files ------------------------------------------------------
def test_int040_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """INT-040: opening a FIFO for reading blocks until a writer comes; it is refused at once."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    msg = refused(lambda: read_file(str(fifo), "--policy", "policy"))
    assert msg == f"--policy: {fifo}: is a FIFO (named pipe), not a regular file"


def test_int041_a_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    """INT-041: /dev/zero never ends; a character device is not a material file."""
    link = tmp_path / "crl.pem"
    link.symlink_to("/dev/zero")
    msg = refused(lambda: read_file(str(link), "--crl", "CRL"))
    assert msg == f"--crl: {link}: is a character device, not a regular file"


def test_a_socket_and_a_directory_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        assert "is a socket, not a regular file" in refused(
            lambda: read_file(str(path), "--cacert", "CA bundle")
        )
    assert refused(lambda: read_file(str(tmp_path), "--cert", "certificate")) == (
        f"--cert: {tmp_path}: is a directory, expected a certificate file"
    )


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    """Kubernetes secret mounts are symlinks (tls.crt -> ..data/tls.crt -> ..2024_x/tls.crt)."""
    real = tmp_path / "..2024_01" / "tls.crt"
    real.parent.mkdir()
    real.write_bytes(b"pem")
    (tmp_path / "..data").symlink_to("..2024_01")
    (tmp_path / "tls.crt").symlink_to("..data/tls.crt")
    assert read_file(str(tmp_path / "tls.crt"), "--cert", "certificate") == b"pem"


@pytest.mark.parametrize(
    ("what", "limit", "name"),
    [
        ("policy", 1 * MIB, "1 MiB limit for a policy file"),
        ("config", 1 * MIB, "1 MiB limit for a config file"),
        ("CA bundle", 16 * MIB, "16 MiB limit for a CA bundle file"),
        ("CRL", 16 * MIB, "16 MiB limit for a CRL file"),
        ("certificate", 1 * MIB, "1 MiB limit for a certificate file"),
        ("private key", 1 * MIB, "1 MiB limit for a private key file"),
        ("keystore", 1 * MIB, "1 MiB limit for a keystore file"),
    ],
)
def test_int041_each_kind_has_a_size_cap(tmp_path: Path, what: str, limit: int, name: str) -> None:
    """INT-041: a file over its kind's cap is refused before it is read (sparse files here)."""
    path = tmp_path / "f"
    with path.open("wb") as f:
        f.truncate(limit)
    assert len(read_file(str(path), "--x", what)) == limit
    with path.open("wb") as f:
        f.truncate(limit + 1)
    assert (
        refused(lambda: read_file(str(path), "--x", what)) == f"--x: {path}: larger than the {name}"
    )


def test_int041_a_file_whose_size_lies_is_read_up_to_the_cap_only() -> None:
    """INT-041: /proc files say size 0 and can be endless (pagemap: 8 bytes per page of the
    address space); the read stops one chunk past the cap, with memory to match."""
    tracemalloc.start()
    try:
        msg = refused(lambda: read_file("/proc/self/pagemap", "--policy", "policy"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg == "--policy: /proc/self/pagemap: larger than the 1 MiB limit for a policy file"
    assert peak < 4 * MIB


# -- INT-042: linear policy checks --------------------------------------------------------------
def test_int042_two_thousand_duplicate_routes_are_refused_in_linear_memory() -> None:
    """INT-042: 2,000 copies of one route (a 14 KB file) made ~2,000,000 messages (~1 GB). Each
    duplicate is found through a dict; the first few are named, the rest counted."""
    text = "allow: [{cn: a}]\nroutes:\n" + "  - {path_prefix: /a, allow: []}\n" * 2000
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as exc:
            parse_policy_file(text, "p.yaml", "require")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    problems = exc.value.problems
    assert problems[0] == "p.yaml: routes[1]: routes[0] already routes * /a"
    assert problems[-1] == "p.yaml: routes: 1989 more routes repeat an earlier one"
    assert len(problems) == 11
    assert peak < 32 * MIB  # measured ~10 MB, the YAML nodes included; before: >1 GB


def test_int042_duplicates_by_method_and_distinct_routes() -> None:
    text = (
        "allow: [{cn: a}]\nroutes:\n"
        + "".join(
            f"  - {{path_prefix: /r{i}, methods: [GET, POST], allow: []}}\n" for i in range(2000)
        )
        + "  - {path_prefix: /r7, methods: [PUT, POST, GET], allow: []}\n"
        + "  - {path_prefix: /r7, allow: []}\n"  # the catch-all beside method routes: fine
    )
    with pytest.raises(ConfigError) as exc:
        parse_policy_file(text, "p.yaml", "require")
    assert exc.value.problems == ["p.yaml: routes[2000]: routes[7] already routes GET,POST /r7"]
    ok = parse_policy_file(text.rsplit("  - {path_prefix: /r7, methods", 1)[0], "p.yaml", "require")
    assert len(ok.routes) == 2000


# -- INT-043: duplicate YAML keys -----------------------------------------------------------------
def test_int043_a_duplicate_key_in_a_policy_file_names_the_line() -> None:
    """INT-043: `routes:` twice silently dropped the first list."""
    text = "allow: [{cn: a}]\nroutes:\n  - {path_prefix: /a, allow: []}\nroutes: []\n"
    with pytest.raises(ConfigError) as exc:
        parse_policy_file(text, "p.yaml", "require")
    assert str(exc.value) == (
        "p.yaml: line 4, column 1: duplicate key 'routes' (first at line 2); "
        "a key may appear once in a mapping"
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "upstream: http://a:1\nupstream: http://b:1\n",
            "line 2, column 1: duplicate key 'upstream'",
        ),
        ("tls:\n  cert: a\n  key: b\n  cert: c\n", "line 4, column 3: duplicate key 'cert'"),
        ("policy: {allow: [{cn: a, cn: b}]}\n", "line 1, column 26: duplicate key 'cn'"),
        ("1: a\n0x1: b\n", "line 2, column 1: duplicate key 1"),  # the same int, two spellings
    ],
)
def test_int043_a_duplicate_key_in_the_config_file_names_the_line(text: str, line: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(text=text, filename="c.yaml", flags=BASE)
    assert f"c.yaml: {line}" in str(exc.value)


def test_merge_keys_may_still_be_overridden() -> None:
    """`<<: *base` then an explicit key is YAML's override, not a duplicate."""
    data = load_yaml("base: &b {x: 1, y: 2}\nover:\n  <<: *b\n  y: 3\n", "f.yaml")
    assert data == {"base": {"x": 1, "y": 2}, "over": {"x": 1, "y": 3}}


def test_aliases_that_expand_without_bound_are_refused() -> None:
    """Aliases cost nothing to parse but everything to walk (a billion laughs: 10^9 strings)."""
    text = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    msg = refused(lambda: load_yaml(text, "f.yaml"))
    assert msg == "f.yaml: aliases expand to more than 1000000 values"


def test_deep_nesting_is_a_config_error() -> None:
    msg = refused(lambda: load_yaml("a: " + "[" * 20000 + "]" * 20000, "f.yaml"))
    assert msg.startswith("f.yaml: ")


# -- INT-044: YAML errors never echo the file ------------------------------------------------------
SECRET = "hunter2-correct-horse"


@pytest.mark.parametrize(
    "text",
    [
        f'tls:\n  key_password: "{SECRET}\n',  # unterminated quote
        f"tls:\n  key_password: @{SECRET}\n",  # a character that cannot start a token
        f"tls:\n  keystore_password: {SECRET}\n\tcert: x\n",  # a tab
        f"tls:\n  key_password: !{SECRET} x\n",  # an unknown tag
        f'tls:\n  key_password: "{SECRET}\\q"\n',  # a bad escape
        f"tls: {{key_password: {SECRET}]\n",
    ],
)
def test_int044_a_yaml_error_never_echoes_a_password(text: str) -> None:
    """INT-044: PyYAML's message quotes the offending line (the password with it)."""
    with pytest.raises(ConfigError) as exc:
        load_config(text=text, filename="c.yaml", flags=BASE)
    msg = str(exc.value)
    assert msg.startswith("c.yaml: not valid YAML at line "), msg
    for part in (SECRET, "hunter", "@", "\\q", "key_password"):
        assert part not in msg


def test_int044_a_policy_yaml_error_names_file_line_and_column_only() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_policy_file(f"allow: [{{cn: '{SECRET}}}]\n", "p.yaml", "require")
    assert str(exc.value) == (
        "p.yaml: not valid YAML at line 2, column 1: found unexpected end of stream "
        "(while scanning a quoted scalar)"
    )


# -- INT-045: loads under a deadline, in threads nobody waits for ---------------------------------
def test_int045_a_stuck_load_is_abandoned_and_the_next_one_runs() -> None:
    """INT-045: a load past the deadline fails; its thread is a daemon, left behind (counted),
    and a later load runs in a thread of its own."""
    release = threading.Event()
    loads = DetachedLoads(timeout=0.2, max_stuck=2)

    async def scenario() -> list[str]:
        out = []
        for _ in range(3):
            try:
                await loads.run(release.wait)
            except ConfigError as exc:
                out.append(str(exc))
        out.append(str(await loads.run(lambda: "fresh")) if loads.stuck < 2 else "")
        return out

    started = time.monotonic()
    msgs = asyncio.run(scenario())
    assert time.monotonic() - started < 3
    assert (
        msgs[0]
        == msgs[1]
        == (
            "reading the files took longer than 0.2 s (a hung mount or a blocking file?); "
            "abandoned, still serving the previous material"
        )
    )
    assert msgs[2] == "2 earlier reloads are still stuck reading files; not starting another"
    assert loads.stuck == 2
    assert all(t.daemon for t in threading.enumerate() if t.name == "mtls-proxy-load")
    release.set()
    deadline = time.monotonic() + 5
    while loads.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loads.stuck == 0
    assert asyncio.run(loads.run(lambda: 42)) == 42


def test_int045_errors_of_a_detached_load_reach_the_caller() -> None:
    loads = DetachedLoads(timeout=5, max_stuck=2)

    def boom() -> None:
        raise ConfigError("--policy: p.yaml: bad")

    with pytest.raises(ConfigError, match=r"p\.yaml: bad"):
        asyncio.run(loads.run(boom))


def test_int041_the_upstream_ca_bundle_is_read_like_other_material(tmp_path: Path) -> None:
    """INT-041: --upstream-cacert went to OpenSSL by path (a FIFO blocked startup)."""
    fifo = tmp_path / "up-ca.crt"
    os.mkfifo(fifo)
    assert refused(lambda: upstream_context(str(fifo))) == (
        f"--upstream-cacert: {fifo}: is a FIFO (named pipe), not a regular file"
    )
    empty = tmp_path / "empty.crt"
    empty.touch()  # not the system trust store instead
    assert refused(lambda: upstream_context(str(empty))).endswith("the file is empty")
    good = tmp_path / "ca.crt"
    good.write_bytes(pki.make_ca("upstream root").cert_pem())
    assert len(upstream_context(str(good)).get_ca_certs()) == 1
