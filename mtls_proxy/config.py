"""PURE. YAML file + environment + flags -> one frozen, validated Config.

Precedence is flag > env > file > default, per option. Every problem is collected before raising,
and each message names where the value came from (``--listen``, ``MTLS_PROXY_LISTEN`` or
``config.yaml: listen``), the key, and the reason. Nothing else in the package reads environment
variables or configuration files.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, cast

from mtls_proxy.errors import ConfigError
from mtls_proxy.headers import DIALECTS, UNDERSCORE_ACTIONS, XFCC_MODES, UnderscoreAction, XfccMode
from mtls_proxy.policy import RULE_FIELDS, Policy, Rule, RuleError, compile_rule
from mtls_proxy.policyspec import compile_policy, compile_rules, load_yaml

ClientAuth = Literal["require", "optional", "none"]
_CLIENT_AUTH_ALIASES: Final = {
    "require": "require",
    "need": "require",
    "optional": "optional",
    "want": "optional",
    "none": "none",
}
ENV_PREFIX: Final = "MTLS_PROXY_"


@dataclass(frozen=True, slots=True)
class Opt:
    """One option: its flag name, YAML key path, kind and default."""

    name: str
    path: tuple[str, ...]
    kind: str
    default: object = None
    help: str = ""
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        """The environment variable for this option."""
        return ENV_PREFIX + self.name.upper().replace("-", "_")


ALLOW_FLAGS: Final = tuple(f for f in RULE_FIELDS if f != "anonymous")
OPTIONS: Final[tuple[Opt, ...]] = (
    Opt("listen", ("listen",), "hostport", "0.0.0.0:8443", "the mTLS listener HOST:PORT"),
    Opt(
        "upstream",
        ("upstream",),
        "upstream",
        None,
        "http://host:port, https://host:port or unix:/path",
    ),
    Opt("cert", ("tls", "cert"), "path", None, "PEM server certificate, leaf then intermediates"),
    Opt(
        "key", ("tls", "key"), "path", None, "PEM private key of --cert (default: the --cert file)"
    ),
    Opt("key-password", ("tls", "key_password"), "secret", None, "password of an encrypted --key"),
    Opt("keystore", ("tls", "keystore"), "path", None, "PKCS12/JKS keystore: key + chain"),
    Opt("keystore-password", ("tls", "keystore_password"), "secret", None, "keystore password"),
    Opt("keystore-alias", ("tls", "keystore_alias"), "str", None, "alias in a multi-key keystore"),
    Opt(
        "cert-dir",
        ("tls", "cert_dir"),
        "path",
        None,
        "a Kubernetes/cert-manager secret mount (tls.crt, tls.key, ca.crt, keystore.p12, ...)",
    ),
    Opt("cacert", ("tls", "cacert"), "path", None, "PEM bundle of CAs trusted for client certs"),
    Opt(
        "truststore",
        ("tls", "truststore"),
        "path",
        None,
        "PKCS12/JKS truststore: CAs trusted for client certs",
    ),
    Opt(
        "truststore-password", ("tls", "truststore_password"), "secret", None, "truststore password"
    ),
    Opt("crl", ("tls", "crl"), "path", None, "PEM CRL file(s): revoked client certs are refused"),
    Opt(
        "crl-check",
        ("tls", "crl_check"),
        "enum",
        "chain",
        "chain: every CA of a client's chain needs a CRL (Envoy); leaf: only the leaf's issuer",
        ("chain", "leaf"),
    ),
    Opt(
        "crl-expired",
        ("tls", "crl_expired"),
        "enum",
        "reject",
        "a CRL past its nextUpdate: reject its CA's clients (fail closed) or allow (keep using it)",
        ("reject", "allow"),
    ),
    Opt(
        "trust-anchors",
        ("tls", "trust_anchors"),
        "enum",
        "any",
        "any: every CA in the CA bundle is a trust anchor, an intermediate too (Java PKIX, Go); "
        "roots: chains must end at a self-signed root of the bundle (OpenSSL's classic rule)",
        ("any", "roots"),
    ),
    Opt(
        "client-auth",
        ("tls", "client_auth"),
        "enum",
        "require",
        "require|optional|none",
        tuple(_CLIENT_AUTH_ALIASES),
    ),
    Opt("min-tls-version", ("tls", "min_tls_version"), "enum", "1.2", "1.2 or 1.3", ("1.2", "1.3")),
    Opt(
        "tls-sessions",
        ("tls", "sessions"),
        "enum",
        "cache",
        "session resumption: cache (sessions kept in memory, no tickets) or tickets (stateless)",
        ("cache", "tickets"),
    ),
    Opt(
        "tls-session-cache-size",
        ("tls", "session_cache_size"),
        "int",
        1024,
        "sessions kept with --tls-sessions cache (about 12 KB each) before the cache restarts",
    ),
    *(
        Opt(f"allow-{f}", ("policy", "allow"), "allow", None, f"allow clients by {f} (repeatable)")
        for f in ALLOW_FLAGS
    ),
    Opt("allow-all", ("allow_all",), "bool", False, "allow any client with a valid chain"),
    Opt("allow-anonymous", ("allow_anonymous",), "bool", False, "admit requests without a cert"),
    Opt("policy", ("policy_file",), "path", None, "YAML policy file: allow, routes, audit"),
    Opt(
        "identity-headers",
        ("identity_headers",),
        "list",
        "xfcc,simple",
        "comma list of " + ",".join(DIALECTS),
    ),
    Opt("xfcc-mode", ("xfcc_mode",), "enum", "sanitize_set", "Envoy XFCC mode", XFCC_MODES),
    Opt(
        "underscore-headers",
        ("underscore_headers",),
        "enum",
        "drop",
        "client header names with '_': drop (as nginx), reject (400) or allow; look-alikes of "
        "framing, hop-by-hop, forwarding and identity names are always dropped",
        UNDERSCORE_ACTIONS,
    ),
    Opt("admin", ("admin",), "hostport_off", "127.0.0.1:9901", "admin HOST:PORT, or off"),
    Opt("workers", ("workers",), "int", 1, "worker processes"),
    Opt(
        "strict-client-certs",
        ("strict_client_certs",),
        "bool",
        False,
        "also refuse leaves without EKU, CA:TRUE leaves and X.509 v1",
    ),
    Opt("handshake-timeout", ("handshake_timeout",), "float", 10.0, "TLS handshake seconds"),
    Opt("header-timeout", ("header_timeout",), "float", 10.0, "seconds to receive a request head"),
    Opt(
        "body-timeout",
        ("body_timeout",),
        "float",
        30.0,
        "seconds without request body bytes before 408 (the upstream request is aborted)",
    ),
    Opt("upstream-timeout", ("upstream_timeout",), "float", 30.0, "connect + first byte seconds"),
    Opt(
        "upstream-cacert",
        ("upstream_cacert",),
        "path",
        None,
        "CAs for an https:// upstream (default: the system trust store)",
    ),
    Opt(
        "send-timeout",
        ("send_timeout",),
        "float",
        60.0,
        "seconds a client may take no response byte before its connection is cut",
    ),
    Opt("idle-timeout", ("idle_timeout",), "float", 60.0, "keep-alive idle seconds"),
    Opt("max-connections", ("max_connections",), "int", 10000, "open downstream connections"),
    Opt("max-header-bytes", ("max_header_bytes",), "int", 65536, "request head size limit"),
    Opt(
        "max-line-bytes",
        ("max_line_bytes",),
        "int",
        8192,
        "request target (414) and header line (431) size limit",
    ),
    Opt("max-headers", ("max_headers",), "int", 100, "request header fields (431 above)"),
    Opt(
        "max-identity-header-bytes",
        ("max_identity_header_bytes",),
        "int",
        16384,
        "fail closed (431) when the injected identity headers would be larger",
    ),
    Opt("shutdown-grace", ("shutdown_grace",), "float", 15.0, "drain seconds on SIGTERM"),
    Opt("reload-interval", ("reload_interval",), "float0", 0.0, "poll interval (0 = watch only)"),
    Opt("log-format", ("log_format",), "enum", "json", "json or text", ("json", "text")),
    Opt(
        "log-level",
        ("log_level",),
        "enum",
        "info",
        "log level",
        ("debug", "info", "warning", "error"),
    ),
    Opt("access-log", ("access_log",), "bool", True, "one JSON record per request"),
    Opt(
        "loop",
        ("loop",),
        "enum",
        "auto",
        "event loop: auto, uvloop or asyncio",
        ("auto", "uvloop", "asyncio"),
    ),
)
_BY_NAME: Final = {o.name: o for o in OPTIONS}
_TOP_KEYS: Final = {o.path[0] for o in OPTIONS if len(o.path) == 1} | {"tls", "policy"}
_TLS_KEYS: Final = {o.path[1] for o in OPTIONS if o.path[0] == "tls"}
_POLICY_KEYS: Final = {"allow", "routes", "audit"}


@dataclass(frozen=True, slots=True)
class Address:
    """A HOST:PORT pair (IPv6 hosts without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where requests are forwarded."""

    url: str
    scheme: Literal["http", "https", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""  # unix socket path

    @property
    def host_header(self) -> str:
        """A Host value that names the upstream (for logs)."""
        return self.path if self.scheme == "unix" else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """The tls: section."""

    cert: str | None = None
    key: str | None = None
    key_password: str | None = None
    keystore: str | None = None
    keystore_password: str | None = None
    keystore_alias: str | None = None
    cert_dir: str | None = None
    cacert: str | None = None
    truststore: str | None = None
    truststore_password: str | None = None
    crl: str | None = None
    crl_check: Literal["chain", "leaf"] = "chain"
    crl_expired: Literal["reject", "allow"] = "reject"
    trust_anchors: Literal["any", "roots"] = "any"
    client_auth: ClientAuth = "require"
    min_tls_version: Literal["1.2", "1.3"] = "1.2"
    sessions: Literal["cache", "tickets"] = "cache"
    session_cache_size: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration; `sources` maps option name -> where it came from."""

    listen: Address
    upstream: Upstream
    tls: TLSConfig
    policy: Policy
    identity_headers: tuple[str, ...]
    policy_file: str | None = None
    xfcc_mode: XfccMode
    admin: Address | None
    underscore_headers: UnderscoreAction = "drop"
    workers: int = 1
    strict_client_certs: bool = False
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    upstream_timeout: float = 30.0
    upstream_cacert: str | None = None
    send_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_connections: int = 10000
    max_header_bytes: int = 65536
    max_line_bytes: int = 8192
    max_headers: int = 100
    max_identity_header_bytes: int = 16384
    shutdown_grace: float = 15.0
    reload_interval: float = 0.0
    log_format: Literal["json", "text"] = "json"
    log_level: str = "info"
    access_log: bool = True
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    config_file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    def source(self, name: str) -> str:
        """Where option *name* came from, for error messages."""
        return self.sources.get(name, f"--{name}")


def parse_yaml(text: str, filename: str) -> dict[str, object]:
    """Parse a config file's text; raise ConfigError naming the file."""
    data = load_yaml(text, filename)  # duplicate keys refused; errors never quote the file
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}: the top level must be a mapping of keys")
    return data


# Read by the CLI and the worker processes rather than an option: known, never warned about.
_OTHER_ENV: Final = frozenset({"MTLS_PROXY_CONFIG", "MTLS_PROXY_WORKER_FD"})


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """One warning per ``MTLS_PROXY_*`` variable that no option reads (a typo would otherwise
    leave the default in force silently). Warnings, not errors: a variable meant for another
    version of the proxy must not stop this one."""
    known = {o.env for o in OPTIONS} | _OTHER_ENV
    # Matched without the shared prefix, which would make every name look close to every other.
    suffixes = {k.removeprefix(ENV_PREFIX) for k in known}
    warnings = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), sorted(suffixes), n=1)
            hint = f" (did you mean {ENV_PREFIX + close[0]!r}?)" if close else ""
            warnings.append(f"{name}: unknown environment variable, ignored{hint}")
    return warnings


def _did_you_mean(key: str, options: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(data: Mapping[str, object], filename: str) -> list[str]:
    problems = []
    for key, value in data.items():
        if key not in _TOP_KEYS:
            problems.append(f"{filename}: unknown key {key!r}{_did_you_mean(str(key), _TOP_KEYS)}")
        elif key in ("tls", "policy"):
            allowed = _TLS_KEYS if key == "tls" else _POLICY_KEYS
            if not isinstance(value, dict):
                problems.append(f"{filename}: {key} must be a mapping")
                continue
            for sub in value:
                if sub not in allowed:
                    hint = _did_you_mean(str(sub), allowed)
                    problems.append(f"{filename}: unknown key {key}.{sub!r}{hint}")
    return problems


class _Collector:
    """Gathers values by precedence and problems with their sources."""

    def __init__(
        self,
        data: Mapping[str, object],
        filename: str,
        env: Mapping[str, str],
        flags: Mapping[str, object],
    ) -> None:
        self.data, self.filename, self.env, self.flags = data, filename, env, flags
        self.problems: list[str] = []
        self.sources: dict[str, str] = {}

    def raw(self, opt: Opt) -> tuple[object, str]:
        if opt.name in self.flags and self.flags[opt.name] is not None:
            return self.flags[opt.name], f"--{opt.name}"
        if opt.env in self.env:
            return self.env[opt.env], opt.env
        node: object = self.data
        for part in opt.path:
            if not isinstance(node, dict) or part not in node:
                return opt.default, "default"
            node = node[part]
        return node, f"{self.filename}: {'.'.join(opt.path)}"

    def get(self, name: str) -> object:
        opt = _BY_NAME[name]
        value, src = self.raw(opt)
        self.sources[name] = src
        if value is None:
            return None
        try:
            return _convert(opt, value, self.env)
        except ValueError as exc:
            self.problems.append(f"{src}: {exc}")
            return _convert(opt, opt.default, self.env) if opt.default is not None else None


_BOOL: Final = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _convert(opt: Opt, value: object, env: Mapping[str, str]) -> object:
    kind = opt.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL:
            return _BOOL[value.lower()]
        raise ValueError(f"must be true or false (got {value!r})")
    if kind in ("int", "float", "float0"):
        if isinstance(value, bool):
            raise ValueError(f"must be a number (got {value!r})")
        try:
            num = int(str(value)) if kind == "int" else float(str(value))
        except ValueError:
            raise ValueError(f"must be a number (got {value!r})") from None
        if num < 0 or (num == 0 and kind != "float0") or num != num or num == float("inf"):
            raise ValueError(f"must be > 0 (got {value!r})")
        return num
    if kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"must be a list of names (got {value!r})")
        return tuple(i.strip() for i in items if i.strip())
    if kind == "hostport_off" and value is False:
        return None  # YAML 1.1 reads a bare `off` as false
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"must be a string (got {value!r})")
    text = str(value)
    if kind == "enum":
        if text not in opt.choices:
            raise ValueError(f"must be one of {', '.join(opt.choices)} (got {text!r})")
        return _CLIENT_AUTH_ALIASES.get(text, text) if opt.name == "client-auth" else text
    if kind == "hostport" or (kind == "hostport_off" and text != "off"):
        return parse_address(text)
    if kind == "hostport_off":
        return None
    if kind == "upstream":
        return parse_upstream(text)
    if kind == "secret":
        return resolve_env_secret(text, env)
    if not text:
        raise ValueError("must not be empty")
    return text


def parse_address(text: str) -> Address:
    """Parse HOST:PORT (``[v6]:PORT`` for IPv6)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if m is None:
        raise ValueError(f"expected HOST:PORT (got {text!r})")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range (got {port})")
    return Address(host, port)


def parse_upstream(text: str) -> Upstream:
    """Parse the --upstream URL."""
    if text.startswith("unix:"):
        path = text[5:].removeprefix("//")
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute (got {text!r})")
        return Upstream(text, "unix", path=path)
    m = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?/?", text)
    if m is None:
        # HOST:PORT is what --listen takes, so it is the likely slip here: name the fix.
        bare = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d+/?", text)
        hint = f"; did you mean http://{text}?" if bare else ""
        raise ValueError(
            f"expected http://host:port, https://host:port or unix:/path (got {text!r}){hint}"
        )
    scheme = m.group(1)
    host = m.group(2).strip("[]")
    port = int(m.group(3) or (443 if scheme == "https" else 80))
    if not 0 < port <= 65535:
        raise ValueError(f"port out of range (got {port})")
    return Upstream(text, "https" if scheme == "https" else "http", host, port)


def resolve_env_secret(text: str, env: Mapping[str, str]) -> str:
    """Resolve ``${VAR}`` against *env*; ``file:/path`` is resolved when material is loaded."""
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)
    if m is None:
        return text
    if m.group(1) not in env:
        raise ValueError(f"environment variable {m.group(1)} is not set")
    return env[m.group(1)]


def _rules(c: _Collector) -> tuple[list[Rule], str]:
    """Allow rules from the highest layer that has any, and that layer's label."""
    rules: list[Rule] = []
    for layer in ("flags", "env"):
        specs: list[tuple[str, str, str]] = []
        for f in ALLOW_FLAGS:
            opt = _BY_NAME[f"allow-{f}"]
            if layer == "flags":
                given = c.flags.get(opt.name)
                vals = [str(v) for v in given] if isinstance(given, list) else []
                label = f"--{opt.name}"
            else:
                raw = c.env.get(opt.env, "")
                vals = [v.strip() for v in raw.split(",") if v.strip()]
                label = opt.env
            specs.extend((f, v, label) for v in vals)
        for f, v, label in specs:
            try:
                rules.append(compile_rule({f: v}))
            except RuleError as exc:
                c.problems.append(f"{label}: {exc}")
        if specs:
            return rules, specs[0][2]
    policy = c.data.get("policy")
    allow = policy.get("allow") if isinstance(policy, dict) else None
    where = f"{c.filename}: policy.allow"
    if allow is None:
        return [], where
    return compile_rules(allow, where, c.problems), where


def load_config(
    *,
    text: str | None = None,
    filename: str = "config",
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Config:
    """Build the Config; raise ConfigError listing every problem."""
    env = dict(env or {})
    data = parse_yaml(text, filename) if text is not None else {}
    c = _Collector(data, filename, env, flags or {})
    c.problems.extend(_unknown_keys(data, filename))
    g = c.get
    tls = TLSConfig(
        cert=_str(g("cert")),
        key=_str(g("key")),
        key_password=_str(g("key-password")),
        cacert=_str(g("cacert")),
        keystore=_str(g("keystore")),
        keystore_password=_str(g("keystore-password")),
        keystore_alias=_str(g("keystore-alias")),
        cert_dir=_str(g("cert-dir")),
        truststore=_str(g("truststore")),
        truststore_password=_str(g("truststore-password")),
        crl=_str(g("crl")),
        crl_check=g("crl-check"),  # type: ignore[arg-type]  # validated enum
        crl_expired=g("crl-expired"),  # type: ignore[arg-type]  # validated enum
        trust_anchors=g("trust-anchors"),  # type: ignore[arg-type]  # validated enum
        client_auth=g("client-auth"),  # type: ignore[arg-type]  # validated enum
        min_tls_version=g("min-tls-version"),  # type: ignore[arg-type]  # validated enum
        sessions=g("tls-sessions"),  # type: ignore[arg-type]  # validated enum
        session_cache_size=int(g("tls-session-cache-size")),  # type: ignore[call-overload]  # validated int
    )
    if tls.cert_dir is None and tls.keystore is None and tls.cert is not None and tls.key is None:
        # One PEM file holding the certificate and its key (HAProxy's form, a common export):
        # the key is read from --cert. tls.py says so when that file holds no key.
        tls = dataclasses.replace(tls, key=tls.cert)
        c.sources["key"] = c.sources["cert"]
    policy_section = data.get("policy")
    section = policy_section if isinstance(policy_section, dict) else {}
    allow_all, anonymous = bool(g("allow-all")), bool(g("allow-anonymous"))
    rules, rules_src = _rules(c)
    inline = compile_policy(
        {k: v for k, v in section.items() if k in ("routes", "audit")},  # unknown: reported
        f"{filename}: policy.",
        c.problems,
        allow_all=allow_all,
        allow_anonymous=anonymous,
    )
    policy = dataclasses.replace(inline, rules=tuple(rules))
    policy_file = _str(g("policy"))
    _check_tls(c, tls)
    if policy_file is not None:
        _check_policy_file(c, policy, rules_src)
    else:
        _check_policy(c, tls, policy, rules_src)
    upstream = g("upstream")
    if upstream is None and c.sources["upstream"] == "default":  # a bad value: reported by g
        c.problems.append(
            "--upstream is required (or upstream: in the config file, or MTLS_PROXY_UPSTREAM)"
        )
    dialects = g("identity-headers") or ()
    assert isinstance(dialects, tuple)  # noqa: S101 -- _convert returns a tuple for kind 'list'
    for d in dialects:
        if d not in DIALECTS:
            c.problems.append(
                f"{c.sources['identity-headers']}: unknown dialect {d!r}"
                f"{_did_you_mean(d, set(DIALECTS))}; known: {', '.join(DIALECTS)}"
            )
    workers = g("workers")
    v = {
        o.name.replace("-", "_"): g(o.name)
        for o in OPTIONS
        if o.kind in _PLAIN_KINDS and o.name not in _NOT_PLAIN
    }
    if c.problems:
        raise ConfigError(c.problems)
    return Config(
        upstream=cast(Upstream, upstream),  # None was reported above; _convert built it
        upstream_cacert=_str(g("upstream-cacert")),
        tls=tls,
        policy=policy,
        policy_file=policy_file,
        identity_headers=dialects,
        workers=int(workers) if isinstance(workers, int) else 1,
        config_file=filename if text is not None else None,
        sources=dict(c.sources),
        **v,  # type: ignore[arg-type]  # each value was converted by its option's kind
    )


_PLAIN_KINDS: Final = frozenset(
    {"hostport", "hostport_off", "int", "float", "float0", "enum", "bool"}
)
_NOT_PLAIN: Final = frozenset(
    {
        "client-auth",
        "min-tls-version",
        "tls-sessions",
        "tls-session-cache-size",
        "crl-check",
        "crl-expired",
        "trust-anchors",
        "workers",
        "allow-all",
        "allow-anonymous",
    }
)


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def _check_policy_file(c: _Collector, inline: Policy, rules_src: str) -> None:
    """--policy is the whole policy: inline rules beside it would be ignored, so refuse them."""
    given = [
        c.sources[n]
        for n in ("allow-all", "allow-anonymous", *(f"allow-{f}" for f in ALLOW_FLAGS))
        if c.sources.get(n, "default") != "default"
    ] + ([rules_src] if inline.rules else [])
    if inline.routes or inline.audit or given:
        where = ", ".join(given) or f"{c.filename}: policy"
        c.problems.append(
            f"{c.sources['policy']}: a policy file holds the whole policy; move the rules "
            f"given in {where} into it"
        )


def _check_tls(c: _Collector, tls: TLSConfig) -> None:
    src = c.sources
    if tls.cert_dir is None:  # a cert-dir supplies what it holds; load_material checks it
        if tls.keystore is None and (tls.cert is None or tls.key is None):
            c.problems.append(
                "--cert and --key (or --keystore, or --cert-dir) are required "
                "(tls.cert / tls.key in the config file)"
            )
        if tls.keystore is not None and (tls.cert is not None or tls.key is not None):
            c.problems.append(f"{src['keystore']}: give either --keystore or --cert/--key")
        if tls.cacert is None and tls.truststore is None and tls.client_auth != "none":
            c.problems.append(
                f"--cacert (or --truststore, or --cert-dir) is required with client-auth "
                f"{tls.client_auth} (tls.cacert in the config file)"
            )
    if tls.truststore is not None and tls.cacert is not None:
        c.problems.append(f"{src['truststore']}: give either --truststore or --cacert")
    if tls.crl is not None and tls.client_auth == "none":
        c.problems.append(f"{src['crl']}: a CRL needs client certificates (--client-auth none)")


def _check_policy(c: _Collector, tls: TLSConfig, policy: Policy, rules_src: str) -> None:
    src = c.sources
    allow_all, anonymous, rules = policy.allow_all, policy.allow_anonymous, policy.rules
    if allow_all and any(not r.anonymous for r in rules):
        c.problems.append(
            f"{src['allow-all']}: --allow-all cannot be combined with allow rules "
            f"({rules_src}); use one or the other"
        )
    has_cert_rules = allow_all or any(not r.anonymous for r in rules)
    if anonymous and tls.client_auth == "require":
        c.problems.append(
            f"{src['allow-anonymous']}: --allow-anonymous needs --client-auth "
            "optional or none (with require, every client has a certificate)"
        )
    has_cert_rules = has_cert_rules or any(
        not r.anonymous for route in policy.routes for r in route.rules
    )
    if tls.client_auth == "none" and has_cert_rules:
        c.problems.append(
            "--client-auth none requests no certificate, so only anonymous rules "
            "can match; remove the --allow-* rules or change --client-auth"
        )
    if not policy.has_rules:
        c.problems.append(
            "no access rules: give --allow-* flags, policy.allow, --allow-all or "
            "--allow-anonymous (the proxy fails closed and would deny every request)"
        )
