"""Config validation: precedence, conversions and error messages that name the key."""

from __future__ import annotations

import pytest

from mtls_proxy.core.config import Address, load_config, parse_address, parse_upstream, unknown_env
from mtls_proxy.core.errors import ConfigError

BASE = {
    "upstream": "http://127.0.0.1:8080",
    "cert": "s.crt",
    "key": "s.key",
    "cacert": "ca.crt",
    "allow-cn": ["x"],
}


def problems(**kw: object) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(**kw)  # type: ignore[arg-type]
    return exc.value.problems


def test_defaults() -> None:
    c = load_config(flags=BASE)
    assert c.listen == Address("0.0.0.0", 8443) and c.admin == Address("127.0.0.1", 9901)
    assert c.tls.client_auth == "require" and c.tls.min_tls_version == "1.2"
    assert c.identity_headers == ("xfcc", "simple") and c.xfcc_mode == "sanitize_set"
    assert (c.handshake_timeout, c.upstream_timeout, c.idle_timeout) == (10.0, 30.0, 60.0)
    assert (c.max_connections, c.max_header_bytes, c.shutdown_grace) == (10000, 65536, 15.0)
    assert c.log_format == "json" and c.workers == 1
    assert load_config(flags={**BASE, "workers": "3"}).workers == 3


def test_precedence_flag_over_env_over_file() -> None:
    text = "listen: 127.0.0.1:1000\nidle_timeout: 5\nadmin: off\ntls:\n  client_auth: want\n"
    env = {"MTLS_PROXY_LISTEN": "127.0.0.1:2000", "MTLS_PROXY_IDLE_TIMEOUT": "7"}
    c = load_config(
        text=text, filename="f.yaml", env=env, flags={**BASE, "listen": "127.0.0.1:3000"}
    )
    assert c.listen.port == 3000  # flag
    assert c.idle_timeout == 7.0  # env
    assert c.admin is None  # file
    assert c.tls.client_auth == "optional"  # file, alias normalised
    assert c.source("idle-timeout") == "MTLS_PROXY_IDLE_TIMEOUT"
    assert c.source("admin") == "f.yaml: admin"


def test_file_only_config_with_policy_rules() -> None:
    text = """
upstream: unix:/run/app.sock
tls: {cert: a, key: b, cacert: c, min_tls_version: "1.3"}
policy:
  audit: true
  allow:
    - uri: spiffe://td/ns/*/sa/web
    - {cn: batch, o: Example}
"""
    c = load_config(text=text, filename="f.yaml")
    assert c.upstream.scheme == "unix" and c.upstream.path == "/run/app.sock"
    assert c.tls.min_tls_version == "1.3"
    assert [r.name for r in c.policy.rules] == ["uri=spiffe://td/ns/*/sa/web", "cn=batch,o=Example"]
    assert c.policy.audit is True


def test_env_allow_lists_and_secrets() -> None:
    env = {"MTLS_PROXY_ALLOW_CN": "a, b", "MTLS_PROXY_KEY_PASSWORD": "${PW}", "PW": "s3cret"}
    c = load_config(env=env, flags={k: v for k, v in BASE.items() if k != "allow-cn"})
    assert [r.name for r in c.policy.rules] == ["cn=a", "cn=b"]
    assert c.tls.key_password == "s3cret"
    assert (
        "environment variable NOPE is not set"
        in problems(flags={**BASE, "key-password": "${NOPE}"})[0]
    )


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"text": "listen: [1", "filename": "f.yaml"}, "f.yaml: not valid YAML"),
        ({"text": "- a", "filename": "f.yaml"}, "f.yaml: the top level must be a mapping"),
        (
            {"text": "upstrem: x", "filename": "f.yaml"},
            "f.yaml: unknown key 'upstrem' (did you mean 'upstream'?)",
        ),
        (
            {"text": "tls: {cacrt: x}", "filename": "f.yaml"},
            "unknown key tls.'cacrt' (did you mean 'cacert'?)",
        ),
        ({"text": "tls: x", "filename": "f.yaml"}, "f.yaml: tls must be a mapping"),
        ({"text": "policy: {allow: x}", "filename": "f.yaml"}, "policy.allow: must be a list"),
        (
            {"text": "policy: {allow: [x]}", "filename": "f.yaml"},
            "policy.allow[0]: a rule must be a mapping",
        ),
        (
            {"text": "policy: {allow: [{cn: ''}]}", "filename": "f.yaml"},
            "policy.allow[0]: cn must be",
        ),
        (
            {"text": "policy: {audit: 3}", "filename": "f.yaml"},
            "f.yaml: policy.audit: must be true or false",
        ),
        (
            {"text": "policy: {routes: [{path_prefix: admin, allow: []}]}", "filename": "f.yaml"},
            "f.yaml: policy.routes[0].path_prefix: must be a path starting with /",
        ),
        (
            {"text": "policy: {routes: {a: 1}}", "filename": "f.yaml"},
            "f.yaml: policy.routes: must be a list",
        ),
        (
            {"flags": {"policy": "p.yaml", "allow-cn": ["x"]}},
            "--policy: a policy file holds the whole policy; move the rules given in --allow-cn",
        ),
        ({"flags": {"crl-check": "all"}}, "--crl-check: "),
        ({"flags": {"listen": "x"}}, "--listen: expected HOST:PORT"),
        ({"flags": {"listen": "h:99999"}}, "port out of range"),
        ({"flags": {"upstream": "ftp://x"}}, "--upstream: expected http://"),
        ({"flags": {"upstream": "unix:rel.sock"}}, "must be absolute"),
        ({"flags": {"upstream": "http://h:0"}}, "port out of range"),
        ({"flags": {"client-auth": "maybe"}}, "--client-auth: must be one of"),
        ({"flags": {"idle-timeout": "0"}}, "--idle-timeout: must be > 0"),
        ({"flags": {"idle-timeout": "abc"}}, "--idle-timeout: must be a number"),
        ({"flags": {"max-connections": "1.5"}}, "--max-connections: must be a number"),
        ({"flags": {"access-log": "maybe"}}, "--access-log: must be true or false"),
        (
            {"text": "access_log: [1]", "filename": "f.yaml"},
            "f.yaml: access_log: must be true or false",
        ),
        ({"text": "workers: true", "filename": "f.yaml"}, "f.yaml: workers: must be a number"),
        ({"text": "listen: {a: 1}", "filename": "f.yaml"}, "f.yaml: listen: must be a string"),
        ({"text": "identity_headers: 5", "filename": "f.yaml"}, "identity_headers: must be a list"),
        ({"flags": {"identity-headers": "xfcc,nope"}}, "unknown dialect 'nope'"),
        ({"flags": {"workers": "0"}}, "--workers: must be > 0"),
        ({"flags": {"keystore": "k.p12"}}, "give either --keystore or --cert/--key"),
        ({"flags": {"truststore": "t.p12"}}, "give either --truststore or --cacert"),
        (
            {"flags": {"crl": "c.pem", "client-auth": "none", "allow-anonymous": True}},
            "--crl: a CRL needs client certificates",
        ),
        ({"flags": {"cert": ""}}, "--cert: must not be empty"),
        ({"flags": {"allow-all": True}}, "--allow-all cannot be combined"),
        ({"flags": {"allow-anonymous": True}}, "--allow-anonymous needs --client-auth optional"),
        ({"flags": {"client-auth": "none"}}, "--client-auth none requests no certificate"),
        (
            {"flags": {"h2-initial-stream-window": "2147483648"}},
            "--h2-initial-stream-window: must be 1 to 2147483647 (got 2147483648)",
        ),
        (
            {"text": "h2_initial_connection_window: 1000", "filename": "f.yaml"},
            "f.yaml: h2_initial_connection_window: must be 65535 to 2147483647",
        ),
        (
            {"flags": {"upstream": "https://u:443", "upstream-protocol": "auto"}},
            "--upstream-protocol: h2c is cleartext HTTP/2",
        ),
        ({"flags": {"upstream-protocol": "h3"}}, "--upstream-protocol: must be one of"),
        ({"flags": {"mode": "tcp"}}, "--upstream: --mode tcp relays bytes"),
        ({"flags": {"upstream": "tcp://db:5432"}}, "--upstream: tcp:// is for --mode tcp"),
        ({"flags": {"upstream": "tcp://db"}}, "tcp://HOST:PORT needs the port"),
        ({"flags": {"proxy-protocol": "conn"}}, "--proxy-protocol: needs --mode tcp"),
    ],
)
def test_invalid_values_name_the_source(kw: dict[str, object], needle: str) -> None:
    flags = {**BASE, **kw.pop("flags", {})}  # type: ignore[dict-item]
    if "policy" in str(kw.get("text")):
        del flags["allow-cn"]  # flag rules would replace the file's
    found = problems(flags=flags, **kw)
    assert any(needle in p for p in found), found


def test_small_conversions() -> None:
    c = load_config(
        text="",
        filename="empty.yaml",
        flags={**BASE, "access-log": "off", "admin": "off", "key-password": "pw"},
    )
    assert c.access_log is False and c.admin is None and c.tls.key_password == "pw"
    assert c.config_file == "empty.yaml"
    found = problems(flags={**BASE, "allow-cn": None, "allow-uri": ["nope"]})
    assert any(p.startswith("--allow-uri: uri:") for p in found)


def test_required_options_and_no_rules() -> None:
    found = problems(flags={})
    assert any("--upstream is required" in p for p in found)
    assert any("--cert and --key (or --keystore, or --cert-dir) are required" in p for p in found)
    assert any("--cacert (or --truststore, or --cert-dir) is required" in p for p in found)
    assert any("no access rules" in p for p in found)


def test_client_auth_none_with_anonymous_needs_no_cacert() -> None:
    c = load_config(
        flags={
            "upstream": "http://h:1",
            "cert": "a",
            "key": "b",
            "client-auth": "none",
            "allow-anonymous": True,
        }
    )
    assert c.tls.cacert is None and c.policy.has_anonymous


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        (":8443", Address("0.0.0.0", 8443)),
        ("[::1]:9901", Address("::1", 9901)),
        ("localhost:0", Address("localhost", 0)),
    ],
)
def test_parse_address(text: str, addr: Address) -> None:
    assert parse_address(text) == addr
    assert str(parse_address("[::1]:1")) == "[::1]:1"


@pytest.mark.parametrize(
    ("text", "host", "port", "scheme"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1", 8080, "http"),
        ("http://app", "app", 80, "http"),
        ("https://app/", "app", 443, "https"),
        ("http://[::1]:81", "::1", 81, "http"),
    ],
)
def test_parse_upstream(text: str, host: str, port: int, scheme: str) -> None:
    u = parse_upstream(text)
    assert (u.host, u.port, u.scheme) == (host, port, scheme)
    assert u.host_header == f"{host}:{port}"


def test_example_config_is_valid() -> None:
    from pathlib import Path

    path = Path(__file__).parents[2] / "config" / "example.yaml"
    c = load_config(text=path.read_text(), filename=str(path))
    assert len(c.policy.rules) == 3 and c.upstream.port == 8080
    # Every option appears in the example, at least as a comment.
    from mtls_proxy.core.config import OPTIONS

    text = path.read_text()
    for opt in OPTIONS:
        if opt.kind != "allow":
            assert opt.path[-1] in text, opt.path


def test_cert_dir_and_stores_need_no_pem_paths() -> None:
    c = load_config(flags={"upstream": "http://h:1", "cert-dir": "/etc/mtls", "allow-cn": ["x"]})
    assert c.tls.cert_dir == "/etc/mtls" and c.tls.cert is None and c.tls.cacert is None
    c = load_config(
        flags={
            "upstream": "http://h:1",
            "keystore": "k.p12",
            "truststore": "t.jks",
            "keystore-password": "a",
            "truststore-password": "b",
            "keystore-alias": "app",
            "allow-cn": ["x"],
        }
    )
    assert (c.tls.keystore, c.tls.truststore, c.tls.keystore_alias) == ("k.p12", "t.jks", "app")


def test_unknown_env_warns_once_per_variable_with_a_suggestion() -> None:
    env = {
        "MTLS_PROXY_LISTN": "x",
        "MTLS_PROXY_LISTEN": "0.0.0.0:1",
        "MTLS_PROXY_CONFIG": "c.yaml",
        "MTLS_PROXY_WORKER_FD": "3",
        "MTLS_PROXY_ZZZZZZZZ": "1",
        "HOME": "/",
    }
    assert unknown_env(env) == [
        "MTLS_PROXY_LISTN: unknown environment variable, ignored "
        "(did you mean 'MTLS_PROXY_LISTEN'?)",
        "MTLS_PROXY_ZZZZZZZZ: unknown environment variable, ignored",
    ]


def test_upstream_without_a_scheme_is_one_problem_with_a_hint() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            flags={"upstream": "127.0.0.1:8080", "cert": "c", "key": "k", "cacert": "ca"},
            env={"MTLS_PROXY_ALLOW_ALL": "1"},
        )
    assert exc.value.problems == [
        "--upstream: expected http://host:port, https://host:port, tcp://host:port (--mode tcp) "
        "or unix:/path (got '127.0.0.1:8080'); did you mean http://127.0.0.1:8080?"
    ]


def _comment_of(text: str, key: str) -> str:
    """The comment lines just above top-level *key* in example.yaml, its inline comment and the
    comment lines that continue it."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    above = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        above.insert(0, line)
    tail = [lines[at].partition("#")[2]]
    for line in lines[at + 1 :]:
        if not (line.startswith(" ") and line.strip().startswith("#")):
            break
        tail.append(line)
    return " ".join([*above, *tail])


def test_example_yaml_comments_say_what_the_code_does() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "config" / "example.yaml").read_text()
    workers = _comment_of(text, "workers")
    # workers.py serves one port with N processes (SO_REUSEPORT); no "only 1" limit any more.
    assert "only 1" not in workers and "SO_REUSEPORT" in workers
    reload = _comment_of(text, "reload_interval")
    # reloader.py watches the files' directories whatever reload_interval says; 0 adds no polling.
    assert "only on SIGHUP" not in reload and "watched" in reload and "SIGHUP" in reload


def test_http2_options_and_yaml_booleans_for_on_off() -> None:
    """YAML 1.1 reads a bare on/off as a boolean: `http2: on` still means "on"."""
    c = load_config(text="http2: on\nupstream_protocol: h2c\n", filename="f.yaml", flags=BASE)
    assert (c.http2, c.upstream_protocol, c.h2_library) == ("on", "h2c", "auto")
    assert load_config(text="http2: off\n", filename="f.yaml", flags=BASE).http2 == "off"
    d = load_config(flags=BASE)
    assert (d.http2, d.upstream_protocol, d.h2_max_concurrent_streams) == ("off", "http1", 100)
    assert (d.h2_initial_stream_window, d.h2_initial_connection_window) == (65536, 1048576)
    assert (d.h2_reset_budget, d.h2_connection_max_streams) == (100, 10000)


def test_tcp_mode() -> None:
    c = load_config(
        flags={**BASE, "mode": "tcp", "upstream": "tcp://db:5432", "proxy-protocol": "tls"}
    )
    assert (c.mode, c.proxy_protocol) == ("tcp", "tls")
    assert (c.upstream.scheme, c.upstream.host, c.upstream.port) == ("tcp", "db", 5432)


def test_trace_context_and_otlp_endpoint() -> None:
    d = load_config(flags=BASE)
    assert (d.trace_context, d.otlp_endpoint) == ("forward", None)
    for given, url in [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),  # a collector's base URL
        ("https://otel.example:4318/", "https://otel.example:4318/v1/traces"),
        ("http://c:4318/custom/traces", "http://c:4318/custom/traces"),  # a path: as it is
        ("off", None),
    ]:
        c = load_config(flags={**BASE, "otlp-endpoint": given, "trace-context": "create"})
        assert (c.otlp_endpoint, c.trace_context) == (url, "create"), given
    c = load_config(text='otlp_endpoint: "off"\ntrace_context: off\n', filename="f", flags=BASE)
    assert (c.otlp_endpoint, c.trace_context) == (None, "off")
    for bad in ("127.0.0.1:4318", "grpc://c:4317", "http://", "http://c:4318/a b"):
        with pytest.raises(ConfigError) as exc:
            load_config(env={"MTLS_PROXY_OTLP_ENDPOINT": bad}, flags=BASE)
        assert exc.value.problems == [
            f"MTLS_PROXY_OTLP_ENDPOINT: must be an http:// or https:// URL, or off (got {bad!r})"
        ]
    with pytest.raises(ConfigError, match="trace-context: must be one of off, forward, create"):
        load_config(flags={**BASE, "trace-context": "on"})
