"""PURE. `mtls-proxy client` (egress): its options, its validated ClientConfig, and the checks
on the remote server's certificate beyond the chain and the name (--verify-*, --verify-spki-pin).

Rules:
1. Plaintext in, our identity out: a listener anyone can reach lends our client certificate to
   them, so --listen must be loopback or a unix socket unless --unsafe-listen says otherwise
   (ghostunnel's rule).
2. The remote is verified against the trust (--cacert/--truststore, the system store when
   neither is given) and its name (--target's host, or --override-server-name, which is also
   the SNI). A --verify-spki-pin replaces the name check (RFC 7469 pins, as ghostunnel), never
   the chain check. --verify-cn/-ou/-dns/-uri must then also match, any one of them.
3. Options are read as serve's are (flag > MTLS_PROXY_CLIENT_* > config file > default); the
   certificate, key, keystore and password options are serve's own, under the client's prefix,
   so one container can run both commands without either reading the other's settings.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from mtls_proxy.core.addresses import Address, parse_address
from mtls_proxy.core.config import Collector, TLSConfig, did_you_mean, parse_yaml
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import PeerIdentity
from mtls_proxy.core.options import BY_NAME, CLIENT_ENV_PREFIX, Opt
from mtls_proxy.core.wildcard import DnsPattern, PatternError, UriPattern, compile_dns, compile_uri

PREFIX: Final = CLIENT_ENV_PREFIX
VERIFY_FIELDS: Final = ("cn", "ou", "dns", "uri", "spki-pin")
# serve's options that mean the same here (our certificate and key, the remote's trust, the
# process): one definition, read under the client's prefix; the defaults that differ follow.
_SHARED: Final = (
    "cert", "key", "key-password", "keystore", "keystore-password", "keystore-alias", "cert-dir",
    "cacert", "truststore", "truststore-password", "min-tls-version", "idle-timeout",
    "upstream-timeout", "max-connections", "shutdown-grace", "reload-interval", "log-format",
    "log-level", "access-log", "loop",
)  # fmt: skip
_DEFAULTS: Final[dict[str, object]] = {"idle-timeout": 300.0}  # a byte stream idles longer
CLIENT_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(
        "listen",
        ("listen",),
        "str",
        None,
        "plaintext listener: 127.0.0.1:PORT or unix:/path",
        prefix=PREFIX,
    ),
    Opt("target", ("target",), "address", None, "the remote mTLS service HOST:PORT", prefix=PREFIX),
    *(
        dataclasses.replace(BY_NAME[n], prefix=PREFIX, default=_DEFAULTS.get(n, BY_NAME[n].default))
        for n in _SHARED
    ),
    Opt(
        "override-server-name",
        ("override_server_name",),
        "str",
        None,
        "the name sent as SNI and checked in the remote's certificate (default: --target's host)",
        prefix=PREFIX,
    ),
    *(
        Opt(
            f"verify-{f}",
            ("verify", f.replace("-", "_")),
            "allow",
            None,
            f"the remote's certificate must match (repeatable): {f}",
            prefix=PREFIX,
        )
        for f in VERIFY_FIELDS
    ),
    Opt(
        "disable-authentication",
        ("disable_authentication",),
        "bool",
        False,
        "send no client certificate",
        prefix=PREFIX,
    ),
    Opt("http", ("http",), "bool", False, "HTTP-aware mode (pooled keep-alive)", prefix=PREFIX),
    Opt("proxy", ("proxy",), "str", None, "http://H:P (CONNECT) or socks5://H:P", prefix=PREFIX),
    Opt(
        "unsafe-listen",
        ("unsafe_listen",),
        "bool",
        False,
        "allow a --listen that is neither loopback nor a unix socket",
        prefix=PREFIX,
    ),
    Opt(
        "admin",
        ("admin",),
        "address_or_off",
        "127.0.0.1:9902",
        "admin HOST:PORT, or off",
        prefix=PREFIX,
    ),
    Opt(
        "connect-timeout",
        ("connect_timeout",),
        "float",
        10.0,
        "seconds to reach the target: proxy, TCP and TLS handshake",
        prefix=PREFIX,
    ),
)
CLIENT_BY_NAME: Final = {o.name: o for o in CLIENT_OPTIONS}


@dataclass(frozen=True, slots=True)
class Listen:
    """Where `client` accepts plaintext: a TCP address, or a unix socket path."""

    address: Address | None = None
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.address is None else str(self.address)


@dataclass(frozen=True, slots=True)
class Proxy:
    """An egress proxy the target is reached through."""

    kind: Literal["connect", "socks5"]
    address: Address
    url: str


@dataclass(frozen=True, slots=True)
class RemoteCheck:
    """What the remote's certificate must show beyond the chain (rule 2)."""

    cn: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    dns: tuple[DnsPattern, ...] = ()
    uri: tuple[UriPattern, ...] = ()
    pins: tuple[bytes, ...] = ()  # SHA-256 digests of SubjectPublicKeyInfo

    @property
    def check_name(self) -> bool:
        """Whether the name is checked: a pin replaces that check."""
        return not self.pins

    def refuse(self, peer: PeerIdentity, spki_sha256: bytes) -> str | None:
        """Why the remote is refused, or None."""
        if self.pins and spki_sha256 not in self.pins:
            got = base64.b64encode(spki_sha256).decode()
            return f"public key pin mismatch (the remote's is sha256:{got})"
        if not (self.cn or self.ou or self.dns or self.uri):
            return None
        if (
            any(v in self.cn for v in peer.cn)
            or any(v in self.ou for v in peer.ou)
            or any(p.matches(v) for p in self.dns for v in peer.dns)
            or any(p.matches(v) for p in self.uri for v in peer.uri)
        ):
            return None
        return f"no --verify-* rule matches the remote's certificate ({peer.subject})"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """The validated configuration of `mtls-proxy client`."""

    listen: Listen
    target: Address
    server_name: str
    tls: TLSConfig
    verify: RemoteCheck
    disable_authentication: bool
    http: bool
    proxy: Proxy | None
    unsafe_listen: bool
    admin: Address | None
    connect_timeout: float
    idle_timeout: float
    upstream_timeout: float
    max_connections: int
    shutdown_grace: float
    reload_interval: float
    log_format: Literal["json", "text"]
    log_level: str
    access_log: bool
    loop: Literal["auto", "uvloop", "asyncio"]
    config_file: str | None
    sources: Mapping[str, str]

    @property
    def first_hop(self) -> Address:
        """Where a dial's TCP connection goes: the proxy, else the target."""
        return self.proxy.address if self.proxy is not None else self.target


def parse_listen(text: str) -> Listen:
    """``unix:/path`` or HOST:PORT; ValueError why not."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute (got {text!r})")
        return Listen(path=path)
    return Listen(address=parse_address(text))


def is_local(listen: Listen) -> bool:
    """A unix socket, or a loopback address (rule 1)."""
    if listen.address is None:
        return True
    host = listen.address.host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def parse_proxy(text: str) -> Proxy:
    """``http://HOST:PORT`` (CONNECT) or ``socks5://HOST:PORT``; ValueError why not."""
    m = re.fullmatch(r"(http|socks5h?)://([^/@]+?)/?", text)
    if m is None:
        raise ValueError(f"expected http://HOST:PORT or socks5://HOST:PORT (got {text!r})")
    address = parse_address(m.group(2))
    if address.port == 0 or not m.group(2).rpartition(":")[0]:
        raise ValueError(f"the proxy needs a host and a port (got {text!r})")
    return Proxy("connect" if m.group(1) == "http" else "socks5", address, text)


def parse_pin(text: str) -> bytes:
    """``sha256:BASE64`` (or curl's ``sha256//BASE64``) -> the 32-byte digest."""
    m = re.fullmatch(r"sha256(?::|//)([A-Za-z0-9+/=]+)", text)
    if m is None:
        raise ValueError(f"expected sha256:BASE64 (got {text!r})")
    try:
        digest = base64.b64decode(m.group(1), validate=True)
    except binascii.Error:
        raise ValueError(f"not base64 (got {text!r})") from None
    if len(digest) != 32:
        raise ValueError(f"a SHA-256 pin is 32 bytes, this is {len(digest)} (got {text!r})")
    return digest


def _values(c: Collector, opt: Opt) -> list[str]:
    """A repeatable option's values: flags (a list), a variable (comma-separated), YAML list."""
    raw, src = c.raw(opt)
    c.sources[opt.name] = src
    if raw is None:
        return []
    if isinstance(raw, str):
        return [v.strip() for v in raw.split(",") if v.strip()]
    if isinstance(raw, list) and all(isinstance(v, str) for v in raw):
        return [str(v) for v in raw]
    c.problems.append(f"{src}: must be a list of strings (got {raw!r})")
    return []


def _remote_check(c: Collector) -> RemoteCheck:
    got: dict[str, list[object]] = {}
    for f in VERIFY_FIELDS:
        opt = CLIENT_BY_NAME[f"verify-{f}"]
        out: list[object] = []
        for v in _values(c, opt):
            try:
                if f == "dns":
                    out.append(compile_dns(v))
                elif f == "uri":
                    out.append(compile_uri(v))
                elif f == "spki-pin":
                    out.append(parse_pin(v))
                else:
                    out.append(v)
            except (PatternError, ValueError) as exc:
                c.problems.append(f"{c.sources[opt.name]}: {exc}")
        got[f] = out
    return RemoteCheck(
        cn=tuple(str(v) for v in got["cn"]),
        ou=tuple(str(v) for v in got["ou"]),
        dns=tuple(v for v in got["dns"] if isinstance(v, DnsPattern)),
        uri=tuple(v for v in got["uri"] if isinstance(v, UriPattern)),
        pins=tuple(v for v in got["spki-pin"] if isinstance(v, bytes)),
    )


def _unknown_keys(data: Mapping[str, object], filename: str) -> list[str]:
    top = {o.path[0] for o in CLIENT_OPTIONS}
    nested = {o.path[0]: {p.path[1] for p in CLIENT_OPTIONS if p.path[0] == o.path[0]}
              for o in CLIENT_OPTIONS if len(o.path) == 2}  # fmt: skip
    problems = []
    for key, value in data.items():
        if key not in top:
            problems.append(f"{filename}: unknown key {key!r}{did_you_mean(str(key), top)}")
        elif key in nested:
            if not isinstance(value, dict):
                problems.append(f"{filename}: {key} must be a mapping")
                continue
            problems += [
                f"{filename}: unknown key {key}.{sub!r}{did_you_mean(str(sub), nested[key])}"
                for sub in value
                if sub not in nested[key]
            ]
    return problems


def _tls(c: Collector, no_auth: bool) -> TLSConfig:
    """serve's TLSConfig, with what a client has no use for at its defaults."""
    values = {
        o.path[1]: (c.get(o.name) if o.name in CLIENT_BY_NAME else o.default)
        for o in BY_NAME.values()
        if o.path[0] == "tls"
    }
    values["client_auth"] = "none"  # ours is the client side: nobody's certificate is asked for
    tls = TLSConfig(**values)  # type: ignore[arg-type]  # converted by each option's kind
    if tls.cert_dir is None and tls.keystore is None and tls.cert is not None and tls.key is None:
        tls = dataclasses.replace(tls, key=tls.cert)  # one PEM holding both, as serve takes
        c.sources["key"] = c.sources["cert"]
    if no_auth or tls.cert_dir is not None:
        return tls
    if tls.keystore is None and (tls.cert is None or tls.key is None):
        c.problems.append(
            "--cert and --key (or --keystore, or --cert-dir) are required, or "
            "--disable-authentication to send no client certificate"
        )
    if tls.keystore is not None and (tls.cert is not None or tls.key is not None):
        c.problems.append(f"{c.sources['keystore']}: give either --keystore or --cert/--key")
    if tls.truststore is not None and tls.cacert is not None:
        c.problems.append(f"{c.sources['truststore']}: give either --truststore or --cacert")
    return tls


def _addresses(c: Collector) -> tuple[Listen, Address, Proxy | None]:
    """--listen, --target and --proxy, each parsed or its problem noted."""
    listen_text, target = c.get("listen"), c.get("target")
    _required(c, "listen", "127.0.0.1:15001")
    _required(c, "target", "payments.example.com:443")
    listen = Listen(address=Address("127.0.0.1", 0))
    if isinstance(listen_text, str):
        try:
            listen = parse_listen(listen_text)
        except ValueError as exc:
            c.problems.append(f"{c.sources['listen']}: {exc}")
    if not isinstance(target, Address) or not _good_target(target):
        if isinstance(target, Address):
            c.problems.append(
                f"{c.sources['target']}: needs a host name or address and a port (got {target})"
            )
        target = Address("invalid", 0)
    proxy = None
    proxy_text = c.get("proxy")
    if isinstance(proxy_text, str):
        try:
            proxy = parse_proxy(proxy_text)
        except ValueError as exc:
            c.problems.append(f"{c.sources['proxy']}: {exc}")
    return listen, target, proxy


def _good_target(target: Address) -> bool:
    return _HOST.fullmatch(target.host) is not None and target.host != "0.0.0.0" and target.port > 0


def _required(c: Collector, name: str, example: str) -> None:
    if c.sources.get(name) == "default":
        c.problems.append(
            f"--{name} is required (e.g. --{name} {example}; {name}: in the config file, "
            f"or {CLIENT_BY_NAME[name].env})"
        )


def load_client_config(
    *,
    text: str | None = None,
    filename: str = "config",
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> ClientConfig:
    """Build the ClientConfig; raise ConfigError listing every problem."""
    env = dict(env or {})
    data = parse_yaml(text, filename) if text is not None else {}
    c = Collector(data, filename, env, flags or {}, CLIENT_BY_NAME)
    c.problems.extend(_unknown_keys(data, filename))
    listen, target, proxy = _addresses(c)
    top = {
        o.path[0]: c.get(o.name)
        for o in CLIENT_OPTIONS
        if len(o.path) == 1 and o.name not in _SPECIAL
    }
    no_auth = bool(top.pop("disable_authentication"))
    tls = _tls(c, no_auth)
    verify = _remote_check(c)
    if not top["unsafe_listen"] and not is_local(listen):
        c.problems.append(
            f"{c.sources['listen']}: {listen} is reachable from other hosts, and anyone who "
            "reaches it speaks with our client certificate; listen on loopback or a unix "
            "socket, or say --unsafe-listen"
        )
    name = top.pop("override_server_name")
    if name is not None and _HOST.fullmatch(str(name)) is None:
        # It goes into the SNI and the name check: a host name or an address, nothing else.
        c.problems.append(f"{c.sources['override-server-name']}: not a host name (got {name!r})")
    if c.problems:
        raise ConfigError(c.problems)
    return ClientConfig(
        listen=listen,
        target=target,
        server_name=str(name) if name is not None else target.host,
        tls=tls,
        verify=verify,
        disable_authentication=no_auth,
        proxy=proxy,
        config_file=filename if text is not None else None,
        sources=dict(c.sources),
        **top,  # type: ignore[arg-type]  # each value was converted by its option's kind
    )


_SPECIAL: Final = frozenset({"listen", "target", "proxy"})
# A DNS name (letters, digits, hyphens, dots, underscores as some internal names have them) or
# an IPv4/IPv6 address: what can be an SNI and a checked name.
_HOST: Final = re.compile(
    r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_.])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
)
