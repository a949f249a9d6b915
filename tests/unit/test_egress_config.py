"""core/egress.py: `client`'s options, their errors, the listen rule and the remote checks."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtls_proxy.core.egress import (
    CLIENT_OPTIONS,
    PREFIX,
    RemoteCheck,
    is_local,
    load_client_config,
    parse_listen,
    parse_pin,
    parse_proxy,
)
from mtls_proxy.core.envvars import unknown_env
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import PeerIdentity
from mtls_proxy.core.wildcard import compile_dns, compile_uri

BASE = {"listen": "127.0.0.1:15001", "target": "svc.example:8443", "cert": "c.pem", "key": "k.pem"}
PIN = "sha256:" + base64.b64encode(hashlib.sha256(b"spki").digest()).decode()


def _load(text: str | None = None, env: dict[str, str] | None = None, **flags: object):  # type: ignore[no-untyped-def]
    merged = {**BASE, **flags} if text is None else flags
    return load_client_config(text=text, filename="c.yaml", env=env or {}, flags=merged)


def _problems(**flags: object) -> str:
    with pytest.raises(ConfigError) as e:
        _load(**flags)
    return "\n".join(e.value.problems)


def test_defaults_and_the_server_name_follows_the_target() -> None:
    cfg = _load()
    assert str(cfg.listen) == "127.0.0.1:15001"
    assert (cfg.target.host, cfg.target.port, cfg.server_name) == (
        "svc.example",
        8443,
        "svc.example",
    )
    assert cfg.first_hop == cfg.target
    assert cfg.tls.client_auth == "none" and cfg.verify.check_name
    assert cfg.admin is not None and cfg.admin.port == 9902
    assert not cfg.http and cfg.proxy is None and cfg.idle_timeout == 300.0
    assert cfg.sources["target"] == "--target"


def test_override_server_name_http_and_proxy() -> None:
    cfg = _load(
        **{"override-server-name": "payments", "http": True, "proxy": "socks5://10.0.0.1:1080"}
    )
    assert cfg.server_name == "payments" and cfg.http
    assert cfg.proxy is not None and cfg.proxy.kind == "socks5" and cfg.first_hop.port == 1080


def test_everything_from_the_environment_under_the_client_prefix() -> None:
    env = {
        f"{PREFIX}LISTEN": "unix:/run/egress.sock",
        f"{PREFIX}TARGET": "[::1]:443",
        f"{PREFIX}CERT_DIR": "/etc/tls",
        f"{PREFIX}VERIFY_DNS": "*.example.com, api.example.org",
        f"{PREFIX}VERIFY_SPKI_PIN": PIN,
    }
    cfg = load_client_config(env=env)
    assert cfg.listen.path == "/run/egress.sock" and str(cfg.listen) == "unix:/run/egress.sock"
    assert cfg.target.host == "::1" and [p.source for p in cfg.verify.dns] == [
        "*.example.com",
        "api.example.org",
    ]
    assert not cfg.verify.check_name  # a pin replaces the name check
    assert cfg.sources["target"] == f"{PREFIX}TARGET"


def test_a_config_file() -> None:
    text = (
        "listen: 127.0.0.1:1\ntarget: a.example:443\ntls: {cert: c, key: k, cacert: ca}\n"
        "verify: {cn: [api], uri: ['spiffe://x/*']}\nhttp: true\n"
    )
    cfg = _load(text)
    assert cfg.config_file == "c.yaml" and cfg.verify.cn == ("api",) and cfg.http
    assert cfg.tls.cacert == "ca"


def test_config_file_mistakes_are_named() -> None:
    with pytest.raises(ConfigError) as e:
        _load("listen: 127.0.0.1:1\ntarget: a:1\nupstream: x\nverify: [1]\ntls: {cret: c}\n")
    text = "\n".join(e.value.problems)
    assert "c.yaml: unknown key 'upstream'" in text
    assert "c.yaml: verify must be a mapping" in text
    assert "c.yaml: unknown key tls.'cret' (did you mean 'cert'?)" in text
    with pytest.raises(ConfigError) as e:
        _load("listen: 127.0.0.1:1\ntarget: a:1\nverify: {cn: [1, 2]}\ntls: {cert: c, key: k}\n")
    assert "c.yaml: verify.cn: must be a list of strings" in e.value.problems[0]


def test_required_options_name_the_flag_the_variable_and_an_example() -> None:
    with pytest.raises(ConfigError) as e:
        load_client_config(flags={"cert": "c", "key": "k"})
    text = "\n".join(e.value.problems)
    assert "--listen is required (e.g. --listen 127.0.0.1:15001" in text
    assert f"{PREFIX}TARGET" in text


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"listen": "0.0.0.0:15001"}, "reachable from other hosts"),
        ({"listen": "10.1.2.3:15001"}, "--unsafe-listen"),
        ({"listen": "egress.internal:15001"}, "reachable from other hosts"),
        ({"listen": "unix:relative.sock"}, "unix socket path must be absolute"),
        ({"listen": "nonsense"}, "expected HOST:PORT"),
        ({"target": ":8443"}, "--target: needs a host name or address"),
        ({"target": "svc"}, "expected HOST:PORT"),
        ({"target": "a\r\nb:443"}, "needs a host name or address and a port"),
        ({"target": "svc.example:0"}, "needs a host name or address and a port"),
        ({"target": "a b@c/d:443"}, "needs a host name or address and a port"),
        ({"override-server-name": "pay ments"}, "--override-server-name: not a host name"),
        ({"override-server-name": "a/b@c"}, "--override-server-name: not a host name"),
        ({"proxy": "ftp://p:1"}, "expected http://HOST:PORT or socks5://HOST:PORT"),
        ({"proxy": "http://:8080"}, "needs a host and a port"),
        ({"verify-spki-pin": ["md5:abc"]}, "expected sha256:BASE64"),
        ({"verify-spki-pin": ["sha256:AAAA"]}, "is 32 bytes, this is 3"),
        ({"verify-spki-pin": ["sha256:!!!="]}, "expected sha256:BASE64"),
        ({"verify-spki-pin": ["sha256:A"]}, "not base64"),
        ({"verify-uri": ["no-scheme"]}, "is not a URI pattern"),
        ({"verify-dns": ["a.*.example"]}, "--verify-dns"),
        ({"key": None, "cert": None}, "--disable-authentication to send no client certificate"),
        ({"keystore": "ks.p12"}, "give either --keystore or --cert/--key"),
        ({"cacert": "ca", "truststore": "ts.p12"}, "give either --truststore or --cacert"),
        ({"connect-timeout": "0"}, "must be > 0"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(
    flags: dict[str, object], expected: str
) -> None:
    assert expected in _problems(**flags)


def test_unsafe_listen_and_loopback_forms() -> None:
    assert _load(listen="0.0.0.0:15001", **{"unsafe-listen": True}).unsafe_listen
    assert is_local(parse_listen("[::1]:1")) and is_local(parse_listen("localhost:1"))
    assert is_local(parse_listen("127.0.0.2:1")) and is_local(parse_listen("unix:/x"))
    assert not is_local(parse_listen("[::]:1"))


def test_disable_authentication_needs_no_certificate_and_one_pem_holds_both() -> None:
    cfg = _load(cert=None, key=None, **{"disable-authentication": True})
    assert cfg.disable_authentication and cfg.tls.cert is None
    cfg = _load(key=None)
    assert cfg.tls.key == "c.pem" and cfg.sources["key"] == "--cert"
    assert _load(cert=None, key=None, **{"cert-dir": "/etc/tls"}).tls.cert_dir == "/etc/tls"


def test_proxy_and_pin_forms() -> None:
    p = parse_proxy("http://proxy.corp:3128/")
    assert (p.kind, p.address.host, p.address.port) == ("connect", "proxy.corp", 3128)
    assert parse_proxy("socks5h://[::1]:1080").kind == "socks5"
    digest = hashlib.sha256(b"spki").digest()
    assert parse_pin(PIN) == digest == parse_pin(PIN.replace("sha256:", "sha256//"))


def _peer(**kw: object) -> PeerIdentity:
    return PeerIdentity(subject="CN=api", **kw)  # type: ignore[arg-type]


def test_remote_checks() -> None:
    spki = hashlib.sha256(b"spki").digest()
    assert RemoteCheck().refuse(_peer(), spki) is None
    pinned = RemoteCheck(pins=(spki,))
    assert pinned.refuse(_peer(), spki) is None
    why = pinned.refuse(_peer(), b"\x00" * 32)
    assert why is not None and why.startswith(
        "public key pin mismatch (the remote's is sha256:AAAA"
    )
    rules = RemoteCheck(
        cn=("api",),
        ou=("payments",),
        dns=(compile_dns("*.svc.example"),),
        uri=(compile_uri("spiffe://prod/ns/*/sa/api"),),
    )
    assert rules.refuse(_peer(cn=("api",)), spki) is None
    assert rules.refuse(_peer(ou=("payments",)), spki) is None
    assert rules.refuse(_peer(dns=("a.svc.example",)), spki) is None
    assert rules.refuse(_peer(uri=("spiffe://prod/ns/x/sa/api",)), spki) is None
    why = rules.refuse(_peer(cn=("other",), dns=("a.b.svc.example",)), spki)
    assert why == "no --verify-* rule matches the remote's certificate (CN=api)"


def test_serve_leaves_the_client_variables_alone_and_client_warns_about_its_typos() -> None:
    env = {f"{PREFIX}TARGET": "x:1", f"{PREFIX}TARGT": "x:1", "MTLS_PROXY_LISTN": "x"}
    serve = unknown_env(env)
    hint = "(did you mean 'MTLS_PROXY_LISTEN'?)"
    assert serve == [f"MTLS_PROXY_LISTN: unknown environment variable, ignored {hint}"]
    client = unknown_env(env, CLIENT_OPTIONS, PREFIX)
    assert client == [
        f"{PREFIX}TARGT: unknown environment variable, ignored (did you mean '{PREFIX}TARGET'?)"
    ]


@given(st.text(max_size=40))
def test_any_listen_text_parses_or_says_why(text: str) -> None:
    try:
        listen = parse_listen(text)
    except ValueError as exc:
        message = str(exc)
    else:
        message = str(listen)
    assert message


def test_the_example_config_loads_and_names_every_option() -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "client.example.yaml"
    text = path.read_text()
    cfg = load_client_config(text=text, filename=str(path), env={})
    assert cfg.target.port == 8443 and cfg.verify.uri[0].source.endswith("/sa/payments")
    keys = {o.path[-1] for o in CLIENT_OPTIONS}
    missing = [k for k in keys if f"{k}:" not in text]
    assert not missing, f"config/client.example.yaml does not show {missing}"
