"""PURE. The option table: every option's flag, YAML key path, kind, default, environment variable
and help, written once (docs/cli.md lists them), and the conversion of a raw value (a flag, a
variable or a YAML value) by its option's kind.

config.py builds the Config from this table: each option's value lands at its YAML key path
(``tls.cert`` -> ``cfg.tls.cert``), except the policy inputs (POLICY_INPUTS), which build
``cfg.policy``. Config itself repeats no default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from mtls_proxy.core.addresses import parse_address, parse_upstream
from mtls_proxy.core.headers import DIALECTS, UNDERSCORE_ACTIONS, XFCC_MODES
from mtls_proxy.core.policy import RULE_FIELDS
from mtls_proxy.core.tracecontext import TRACE_MODES

ClientAuth = Literal["require", "optional", "none"]
CLIENT_AUTH_ALIASES: Final = {
    "require": "require",
    "need": "require",
    "optional": "optional",
    "want": "optional",
    "none": "none",
}
ENV_PREFIX: Final = "MTLS_PROXY_"
CLIENT_ENV_PREFIX: Final = "MTLS_PROXY_CLIENT_"  # `client`'s own (core/egress.py)

Kind = Literal[
    "bool",
    "int",
    "float",
    "float_or_zero",
    "list",
    "allow",
    "enum",
    "address",
    "address_or_off",
    "upstream",
    "secret",
    "path",
    "str",
]


@dataclass(frozen=True, slots=True)
class Opt:
    """One option: its flag name, YAML key path, kind and default.

    Kinds (what coerce makes of a value): bool; int and float (> 0); float_or_zero (>= 0);
    list (comma-separated names); allow (an allow-list flag, repeatable); enum (one of
    *choices*); address (HOST:PORT); address_or_off (HOST:PORT, or off for None); upstream (a
    URL or unix:/path); secret (a password form, env:NAME resolved); path and str (text).
    """

    name: str
    path: tuple[str, ...]
    kind: Kind
    default: object = None
    help: str = ""
    choices: tuple[str, ...] = ()
    prefix: str = ENV_PREFIX  # `client` options read MTLS_PROXY_CLIENT_* (core/egress.py)

    @property
    def env(self) -> str:
        """The environment variable for this option."""
        return self.prefix + self.name.upper().replace("-", "_")


ALLOW_FLAGS: Final = tuple(f for f in RULE_FIELDS if f != "anonymous")
OPTIONS: Final[tuple[Opt, ...]] = (
    Opt("listen", ("listen",), "address", "0.0.0.0:8443", "the mTLS listener HOST:PORT"),
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
        tuple(CLIENT_AUTH_ALIASES),
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
    Opt(
        "http2",
        ("http2",),
        "enum",
        "off",
        "on: offer HTTP/2 (ALPN h2) beside HTTP/1.1 to clients",
        ("on", "off"),
    ),
    Opt(
        "mode",
        ("mode",),
        "enum",
        "http",
        "http: an HTTP reverse proxy; tcp: relay bytes to a TCP service after the handshake "
        "and the allow-list (--upstream tcp://HOST:PORT or unix:/path)",
        ("http", "tcp"),
    ),
    Opt(
        "proxy-protocol",
        ("proxy_protocol",),
        "enum",
        "off",
        "--mode tcp: a PROXY v2 header first on each upstream connection: conn (addresses), "
        "tls (+ALPN, SNI, TLS version), tls-full (+client CN and certificate)",
        ("off", "conn", "tls", "tls-full"),
    ),
    Opt(
        "upstream-protocol",
        ("upstream_protocol",),
        "enum",
        "http1",
        "http1; h2c (HTTP/2 prior knowledge) for every request; auto: h2c for gRPC only",
        ("http1", "h2c", "auto"),
    ),
    Opt(
        "h2-library",
        ("h2_library",),
        "enum",
        "auto",
        "HTTP/2 implementation: h2 (python-hyper), jh2 (same API, Rust HPACK: about 30 % less "
        "CPU per call; pip install jh2), or auto: jh2 when installed, else h2",
        ("auto", "h2", "jh2"),
    ),
    Opt(
        "h2-max-concurrent-streams",
        ("h2_max_concurrent_streams",),
        "int",
        100,
        "HTTP/2 streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS)",
    ),
    Opt(
        "h2-connection-max-streams",
        ("h2_connection_max_streams",),
        "int",
        10000,
        "streams one HTTP/2 connection may open in its life; then GOAWAY and the client "
        "reconnects (nginx's keepalive_requests)",
    ),
    Opt(
        "h2-initial-stream-window",
        ("h2_initial_stream_window",),
        "int",
        65536,
        "HTTP/2 flow-control window per stream, bytes (SETTINGS_INITIAL_WINDOW_SIZE)",
    ),
    Opt(
        "h2-initial-connection-window",
        ("h2_initial_connection_window",),
        "int",
        1048576,
        "HTTP/2 flow-control window of the whole connection, bytes",
    ),
    Opt(
        "h2-max-header-list-bytes",
        ("h2_max_header_list_bytes",),
        "int",
        65536,
        "HTTP/2 request header block limit, raw and decoded (CONTINUATION flood, HPACK bomb)",
    ),
    Opt(
        "h2-reset-budget",
        ("h2_reset_budget",),
        "int",
        100,
        "stream resets (client RST_STREAM and streams the proxy resets) a connection may cause "
        "per second before GOAWAY(ENHANCE_YOUR_CALM): Rapid Reset, MadeYouReset",
    ),
    Opt("admin", ("admin",), "address_or_off", "127.0.0.1:9901", "admin HOST:PORT, or off"),
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
    Opt(
        "reload-interval",
        ("reload_interval",),
        "float_or_zero",
        0.0,
        "poll interval (0 = watch only)",
    ),
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
    Opt("trace-context", ("trace_context",), "enum", "forward", "forward|create|off", TRACE_MODES),
    Opt("otlp-endpoint", ("otlp_endpoint",), "str", None, "OTLP/HTTP URL for spans, or off"),
    Opt(
        "loop",
        ("loop",),
        "enum",
        "auto",
        "event loop: auto, uvloop or asyncio",
        ("auto", "uvloop", "asyncio"),
    ),
)
BY_NAME: Final = {o.name: o for o in OPTIONS}
# The options that build cfg.policy (with the policy: section); every other option is a field.
POLICY_INPUTS: Final = ("allow-all", "allow-anonymous", *(f"allow-{f}" for f in ALLOW_FLAGS))


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


def convert(opt: Opt, value: object, env: Mapping[str, str]) -> object:
    """*value* (a flag, a variable or a YAML value) as *opt*'s kind makes it; ValueError why not."""
    kind = opt.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL:
            return _BOOL[value.lower()]
        raise ValueError(f"must be true or false (got {value!r})")
    if kind in ("int", "float", "float_or_zero"):
        if isinstance(value, bool):
            raise ValueError(f"must be a number (got {value!r})")
        try:
            num = int(str(value)) if kind == "int" else float(str(value))
        except ValueError:
            raise ValueError(f"must be a number (got {value!r})") from None
        if num < 0 or (num == 0 and kind != "float_or_zero") or num != num or num == float("inf"):
            raise ValueError(f"must be > 0 (got {value!r})")
        return num
    if kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"must be a list of names (got {value!r})")
        return tuple(i.strip() for i in items if i.strip())
    if kind == "address_or_off" and value is False:
        return None  # YAML 1.1 reads a bare `off` as false
    if kind == "enum" and isinstance(value, bool) and ("on" if value else "off") in opt.choices:
        return "on" if value else "off"  # YAML 1.1 reads bare on/off as booleans
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"must be a string (got {value!r})")
    text = str(value)
    if kind == "enum":
        if text not in opt.choices:
            raise ValueError(f"must be one of {', '.join(opt.choices)} (got {text!r})")
        return CLIENT_AUTH_ALIASES.get(text, text) if opt.name == "client-auth" else text
    if kind == "address" or (kind == "address_or_off" and text != "off"):
        return parse_address(text)
    if kind == "address_or_off":
        return None
    if kind == "upstream":
        return parse_upstream(text)
    if kind == "secret":
        return resolve_env_secret(text, env)
    if not text:
        raise ValueError("must not be empty")
    return text


def resolve_env_secret(text: str, env: Mapping[str, str]) -> str:
    """Resolve ``${VAR}`` against *env*; ``file:/path`` is resolved when material is loaded."""
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)
    if m is None:
        return text
    if m.group(1) not in env:
        raise ValueError(f"environment variable {m.group(1)} is not set")
    return env[m.group(1)]
