"""PURE. YAML file + environment + flags -> one frozen, validated Config.

Precedence is flag > env > file > default, per option. Every problem is collected before raising,
and each message names where the value came from (``--listen``, ``MTLS_PROXY_LISTEN`` or
``config.yaml: listen``), the key, and the reason. Nothing else in the package reads environment
variables or configuration files.

The options (names, kinds, defaults, variables, help) are options.py's table; Config and
TLSConfig only declare the types: each option's value lands at its YAML key path, and the
few fields no option names are DERIVED.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from mtls_proxy.core.addresses import Address, Upstream, parse_address, parse_upstream
from mtls_proxy.core.envvars import unknown_env
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.headers import DIALECTS, UnderscoreAction, XfccMode
from mtls_proxy.core.options import (
    ALLOW_FLAGS,
    BY_NAME,
    ENV_PREFIX,
    OPTIONS,
    POLICY_INPUTS,
    ClientAuth,
    Opt,
    convert,
    resolve_env_secret,
)
from mtls_proxy.core.policy import Policy, Rule, RuleError, compile_rule
from mtls_proxy.core.policyspec import (
    POLICY_KEYS,
    check_policy,
    compile_policy,
    compile_rules,
    load_mapping,
)
from mtls_proxy.core.tracecontext import TraceMode

__all__ = [  # the option table's names, as importers have always found them here
    "ALLOW_FLAGS",
    "DERIVED",
    "ENV_PREFIX",
    "OPTIONS",
    "Address",
    "ClientAuth",
    "Config",
    "Opt",
    "TLSConfig",
    "Upstream",
    "load_config",
    "parse_address",
    "parse_upstream",
    "parse_yaml",
    "resolve_env_secret",
    "unknown_env",
]

_TOP_KEYS: Final = {o.path[0] for o in OPTIONS if len(o.path) == 1} | {"tls", "policy"}
_TLS_KEYS: Final = {o.path[1] for o in OPTIONS if o.path[0] == "tls"}
_NUMBERS: Final = frozenset({"int", "float", "float_or_zero"})
# The Config fields that no option names: built from several options, or from the call.
DERIVED: Final = frozenset({"tls", "policy", "config_file", "sources"})


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """The tls: section: one field per ``tls.*`` option (defaults: options.OPTIONS)."""

    cert: str | None
    key: str | None
    key_password: str | None
    keystore: str | None
    keystore_password: str | None
    keystore_alias: str | None
    cert_dir: str | None
    cacert: str | None
    truststore: str | None
    truststore_password: str | None
    crl: str | None
    crl_check: Literal["chain", "leaf"]
    crl_expired: Literal["reject", "allow"]
    trust_anchors: Literal["any", "roots"]
    client_auth: ClientAuth
    min_tls_version: Literal["1.2", "1.3"]
    sessions: Literal["cache", "tickets"]
    session_cache_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration: one field per top-level option (defaults:
    options.OPTIONS), and the DERIVED ones; `sources` maps option name -> where it came from."""

    listen: Address
    upstream: Upstream
    tls: TLSConfig
    policy: Policy
    identity_headers: tuple[str, ...]
    policy_file: str | None
    xfcc_mode: XfccMode
    admin: Address | None
    underscore_headers: UnderscoreAction
    http2: Literal["on", "off"]
    mode: Literal["http", "tcp"]
    proxy_protocol: Literal["off", "conn", "tls", "tls-full"]
    upstream_protocol: Literal["http1", "h2c", "auto"]
    h2_library: Literal["auto", "h2", "jh2"]
    h2_max_concurrent_streams: int
    h2_connection_max_streams: int
    h2_initial_stream_window: int
    h2_initial_connection_window: int
    h2_max_header_list_bytes: int
    h2_reset_budget: int
    workers: int
    strict_client_certs: bool
    handshake_timeout: float
    header_timeout: float
    body_timeout: float
    upstream_timeout: float
    upstream_cacert: str | None
    send_timeout: float
    idle_timeout: float
    max_connections: int
    max_header_bytes: int
    max_line_bytes: int
    max_headers: int
    max_identity_header_bytes: int
    shutdown_grace: float
    reload_interval: float
    log_format: Literal["json", "text"]
    log_level: str
    access_log: bool
    trace_context: TraceMode
    otlp_endpoint: str | None  # the URL spans are POSTed to (None: no spans)
    loop: Literal["auto", "uvloop", "asyncio"]
    config_file: str | None
    sources: Mapping[str, str]

    def source(self, name: str) -> str:
        """Where option *name* came from, for error messages."""
        return self.sources.get(name, f"--{name}")


def parse_yaml(text: str, filename: str) -> dict[str, object]:
    """Parse a config file's text; raise ConfigError naming the file."""
    # Duplicate keys refused; errors never quote the file (policyspec.load_yaml).
    return load_mapping(text, filename, "the top level must be a mapping of keys") or {}


def did_you_mean(key: str, options: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(data: Mapping[str, object], filename: str) -> list[str]:
    problems = []
    for key, value in data.items():
        if key not in _TOP_KEYS:
            problems.append(f"{filename}: unknown key {key!r}{did_you_mean(str(key), _TOP_KEYS)}")
        elif key in ("tls", "policy"):
            allowed = _TLS_KEYS if key == "tls" else set(POLICY_KEYS)
            if not isinstance(value, dict):
                problems.append(f"{filename}: {key} must be a mapping")
                continue
            for sub in value:
                if sub not in allowed:
                    hint = did_you_mean(str(sub), allowed)
                    problems.append(f"{filename}: unknown key {key}.{sub!r}{hint}")
    return problems


class Collector:
    """Gathers values by precedence and problems with their sources."""

    def __init__(
        self,
        data: Mapping[str, object],
        filename: str,
        env: Mapping[str, str],
        flags: Mapping[str, object],
        table: Mapping[str, Opt] = BY_NAME,
    ) -> None:
        self.data, self.filename, self.env, self.flags = data, filename, env, flags
        self.table = table
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
        opt = self.table[name]
        value, src = self.raw(opt)
        self.sources[name] = src
        if value is None and opt.kind in _NUMBERS:
            value = opt.default  # a YAML key left empty (`workers:`): a number's default
        if value is None:
            return None
        try:
            return convert(opt, value, self.env)
        except ValueError as exc:
            self.problems.append(f"{src}: {exc}")
            return convert(opt, opt.default, self.env) if opt.default is not None else None


def _rules(c: Collector) -> tuple[list[Rule], str]:
    """Allow rules from the highest layer that has any, and that layer's label."""
    rules: list[Rule] = []
    for layer in ("flags", "env"):
        specs: list[tuple[str, str, str]] = []
        for f in ALLOW_FLAGS:
            opt = BY_NAME[f"allow-{f}"]
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
    c = Collector(data, filename, env, flags or {})
    c.problems.extend(_unknown_keys(data, filename))
    # Each option's value at its YAML key path: tls.* in TLSConfig, the others in Config.
    tls_values = {o.path[1]: c.get(o.name) for o in OPTIONS if o.path[0] == "tls"}
    tls = TLSConfig(**tls_values)  # type: ignore[arg-type]  # converted by each option's kind
    if tls.cert_dir is None and tls.keystore is None and tls.cert is not None and tls.key is None:
        # One PEM file holding the certificate and its key (HAProxy's form, a common export):
        # the key is read from --cert. tls.py says so when that file holds no key.
        tls = dataclasses.replace(tls, key=tls.cert)
        c.sources["key"] = c.sources["cert"]
    policy, rules_src = _policy(c)
    top = {o.path[0]: c.get(o.name) for o in OPTIONS if _is_top_field(o)}
    _check_tls(c, tls)
    if top["policy_file"] is not None:
        _check_policy_file(c, policy, rules_src)
    else:
        c.problems += check_policy(
            policy, None, tls.client_auth, sources=c.sources, rules_src=rules_src
        )
    if top["upstream"] is None and c.sources["upstream"] == "default":  # else reported by get
        c.problems.append(
            "--upstream is required (or upstream: in the config file, or MTLS_PROXY_UPSTREAM)"
        )
    top["identity_headers"] = top["identity_headers"] or ()
    _check_dialects(c, top["identity_headers"])
    _check_http2(c, top)
    top["otlp_endpoint"] = _otlp_endpoint(c, top["otlp_endpoint"])
    if c.problems:
        raise ConfigError(c.problems)
    return Config(
        tls=tls,
        policy=policy,
        config_file=filename if text is not None else None,
        sources=dict(c.sources),
        **top,  # type: ignore[arg-type]  # each value was converted by its option's kind
    )


def _is_top_field(opt: Opt) -> bool:
    """Whether *opt*'s value is a Config field of its own (not tls.*, not a policy input)."""
    return len(opt.path) == 1 and opt.name not in POLICY_INPUTS


def _policy(c: Collector) -> tuple[Policy, str]:
    """The inline policy (flags, variables, the policy: section) and where its rules came from."""
    allow_all, anonymous = bool(c.get("allow-all")), bool(c.get("allow-anonymous"))
    rules, rules_src = _rules(c)
    section = c.data.get("policy")
    inline = compile_policy(
        {k: v for k, v in section.items() if k in ("routes", "audit")}  # unknown: reported
        if isinstance(section, dict)
        else {},
        f"{c.filename}: policy.",
        c.problems,
        allow_all=allow_all,
        allow_anonymous=anonymous,
    )
    return dataclasses.replace(inline, rules=tuple(rules)), rules_src


def _check_http2(c: Collector, top: dict[str, object]) -> None:
    """HTTP/2 limits the protocol can carry (RFC 9113 6.5.2, 6.9.1), and h2c over cleartext."""
    for name, low in (("h2_initial_stream_window", 1), ("h2_initial_connection_window", 65535)):
        value = top[name]
        if isinstance(value, int) and not low <= value <= 2**31 - 1:
            key = name.replace("_", "-")
            c.problems.append(f"{c.sources[key]}: must be {low} to 2147483647 (got {value})")
    upstream = top["upstream"]
    scheme = getattr(upstream, "scheme", "")
    if top["mode"] == "tcp" and scheme in ("http", "https"):
        c.problems.append(
            f"{c.sources['upstream']}: --mode tcp relays bytes: the upstream is tcp://HOST:PORT "
            "or unix:/path"
        )
    elif top["mode"] == "http" and scheme == "tcp":
        c.problems.append(
            f"{c.sources['upstream']}: tcp:// is for --mode tcp; an HTTP upstream is http://"
        )
    if top["proxy_protocol"] != "off" and top["mode"] != "tcp":
        c.problems.append(f"{c.sources['proxy-protocol']}: needs --mode tcp")
    if top["upstream_protocol"] != "http1" and scheme == "https":
        c.problems.append(
            f"{c.sources['upstream-protocol']}: h2c is cleartext HTTP/2; "
            "an https:// upstream is forwarded over HTTP/1.1 (use http1)"
        )


def _otlp_endpoint(c: Collector, value: object) -> str | None:
    """--otlp-endpoint: an http(s) URL, or off. A URL without a path is a collector's base URL
    (as OTEL_EXPORTER_OTLP_ENDPOINT): the traces path /v1/traces is appended."""
    if value is None or value == "off":
        return None
    text = str(value)
    scheme, sep, rest = text.partition("://")
    authority, _, path = rest.partition("/")
    if not sep or scheme.lower() not in ("http", "https") or not authority or " " in text:
        c.problems.append(
            f"{c.sources['otlp-endpoint']}: must be an http:// or https:// URL, or off "
            f"(got {text!r})"
        )
        return None
    return text if path else f"{text.rstrip('/')}/v1/traces"


def _check_dialects(c: Collector, dialects: object) -> None:
    assert isinstance(dialects, tuple)  # noqa: S101 -- convert returns a tuple for kind 'list'
    for d in dialects:
        if d not in DIALECTS:
            c.problems.append(
                f"{c.sources['identity-headers']}: unknown dialect {d!r}"
                f"{did_you_mean(d, set(DIALECTS))}; known: {', '.join(DIALECTS)}"
            )


def _check_policy_file(c: Collector, inline: Policy, rules_src: str) -> None:
    """--policy is the whole policy: inline rules beside it would be ignored, so refuse them."""
    given = [c.sources[n] for n in POLICY_INPUTS if c.sources.get(n, "default") != "default"] + (
        [rules_src] if inline.rules else []
    )
    if inline.routes or inline.audit or given:
        where = ", ".join(given) or f"{c.filename}: policy"
        c.problems.append(
            f"{c.sources['policy']}: a policy file holds the whole policy; move the rules "
            f"given in {where} into it"
        )


def _check_tls(c: Collector, tls: TLSConfig) -> None:
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
