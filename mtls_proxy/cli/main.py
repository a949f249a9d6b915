"""Command-line front end: serve, check, demo, pki. Builds one Config and picks the event loop."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mtls_proxy import __version__
from mtls_proxy.cli.client import add_client_parser, run_client
from mtls_proxy.cli.loops import run_async
from mtls_proxy.cli.parsers import c_parsers_problem
from mtls_proxy.cli.pki_cmd import add_pki_parser, run_pki
from mtls_proxy.core.config import OPTIONS, Config, load_config, parse_yaml, unknown_env
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.escape import for_terminal
from mtls_proxy.material.loader import read_text
from mtls_proxy.telemetry.logs import setup_logging
from mtls_proxy.telemetry.tracing import require_otel

if TYPE_CHECKING:
    from mtls_proxy.material.tls import Material


def _add_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="YAML config file (env MTLS_PROXY_CONFIG)"
    )
    for opt in OPTIONS:
        if opt.name in skip:
            continue
        flag = f"--{opt.name}"
        dest = opt.name
        # argparse formats help with %: a literal one ("30 % less") must be doubled.
        text = opt.help.replace("%", "%%")
        if opt.kind == "allow":
            p.add_argument(flag, dest=dest, action="append", metavar="V", help=text)
        elif opt.kind == "bool":
            p.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            default = "" if opt.default is None else f" (default {opt.default})"
            p.add_argument(
                flag, dest=dest, metavar=opt.name.split("-")[-1].upper(), help=text + default
            )


def _warn_unknown_env(env: dict[str, str]) -> None:
    """Unknown MTLS_PROXY_* variables, a stderr line each; not in workers (the master said it)."""
    if "MTLS_PROXY_WORKER_FD" in env:
        return
    for warning in unknown_env(env):
        print(f"mtls-proxy: warning: {for_terminal(warning)}", file=sys.stderr)


def build_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """Config from the parsed flags, the environment and the config file (flag > env > file)."""
    env, flags, path, text = _inputs(args, env)
    return load_config(text=text, filename=path or "config", env=env, flags=flags)


def _inputs(
    args: argparse.Namespace, env: dict[str, str] | None
) -> tuple[dict[str, str], dict[str, object], str | None, str | None]:
    """The environment, the flags, the config file's path and its text (None without one)."""
    env = dict(os.environ) if env is None else env
    _warn_unknown_env(env)
    flags = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    path = args.config or env.get("MTLS_PROXY_CONFIG")
    # The one bounded reader (loader.py): a regular file under the size cap, never a FIFO.
    text = read_text(path, "--config", "config") if path else None
    return env, flags, path, text


def _port(text: str) -> int:
    """A TCP port 0-65535, for argparse (a usage error, exit 2, otherwise)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtls-proxy",
        description=(
            "An mTLS-terminating reverse proxy: verifies client certificates, checks them "
            "against an allow-list, injects identity headers and forwards to a plain HTTP upstream."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mtls-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    _add_options(serve)
    check = sub.add_parser("check", help="validate config and certificate material, then exit")
    _add_options(check)
    explain = sub.add_parser("explain", help="would this client certificate be allowed, and why")
    explain.add_argument(
        "--client-cert",
        metavar="FILE",
        help="the client certificate (PEM, leaf first, intermediates after; or one DER)",
    )
    explain.add_argument(
        "--client-key",
        metavar="FILE",
        help="its private key (PEM, unencrypted): a whole handshake, proving the key too",
    )
    explain.add_argument("--path", default="/", help="request path to decide for (default /)")
    explain.add_argument("--method", default="GET", help="request method (default GET)")
    _add_options(explain)  # --cert/--key are the server's, as for serve (never read by explain)
    demo = sub.add_parser("demo", help="throwaway PKI + echo upstream + proxy on loopback")
    demo.add_argument(
        "--self-test",
        action="store_true",
        help="run the allowed/denied/no-cert checks, print them, exit 0 if all pass",
    )
    demo.add_argument(
        "--port",
        type=_port,
        help="the proxy's port on 127.0.0.1 (default 8443; 0 picks a free one; "
        "--self-test always uses a free one unless given)",
    )
    add_pki_parser(sub)
    add_client_parser(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from mtls_proxy.material.loader import load_policy
    from mtls_proxy.material.tls import load_material
    from mtls_proxy.server.listener import ProxyServer

    cfg = build_config(args)
    setup_logging(cfg.log_format, cfg.log_level)
    problem = c_parsers_problem(aiohttp=False)  # the admin port is adminhttp.py's
    if problem is not None:
        print(f"mtls-proxy: refusing to start: {problem}", file=sys.stderr)
        return 1
    material = load_material(cfg.tls, dict(cfg.sources))
    policy = load_policy(cfg)  # checked before any worker starts; each loads it again
    if cfg.otlp_endpoint is not None:
        require_otel()

    from mtls_proxy.server.workers import WORKER_FD_ENV, run_master, serve_master_channel

    if cfg.workers > 1:
        return run_async(lambda: run_master(cfg, material, list(sys.argv[1:])), cfg.loop)
    worker_fd = os.environ.get(WORKER_FD_ENV)

    async def main() -> int:
        server = ProxyServer(cfg, material, reuse_port=worker_fd is not None, policy=policy)
        if worker_fd is None:
            await server.run()
            return 0
        serving = asyncio.get_running_loop().create_task(server.run())
        await server.started.wait()
        channel = asyncio.get_running_loop().create_task(
            serve_master_channel(server, int(worker_fd))
        )
        await serving
        channel.cancel()
        return 0

    return run_async(main, cfg.loop)


def _check(args: argparse.Namespace) -> int:
    from mtls_proxy.material.contexts import server_context
    from mtls_proxy.material.loader import load_policy
    from mtls_proxy.material.tls import load_material
    from mtls_proxy.server.admin import rfc3339

    cfg = build_config(args)
    material = load_material(cfg.tls, dict(cfg.sources))
    server_context(cfg, material)  # OpenSSL must accept it too
    p = load_policy(cfg)
    if cfg.otlp_endpoint is not None:
        require_otel()
    rules = ["allow_all"] if p.allow_all else [r.name for r in p.rules]
    if p.allow_anonymous:
        rules.append("anonymous")
    rules += [f"route {rt.name}: {len(rt.rules)} rule(s)" for rt in p.routes]
    crl_lines = []
    if material.crls:
        nu = material.crl_next_update
        crl_lines = [
            f"  CRLs:              {len(material.crls)} ({cfg.tls.crl}), check {cfg.tls.crl_check}"
            + (f", next update {rfc3339(nu)}" if nu else "")
            + (" EXPIRED" if material.crls_expired() else "")
        ]
        if nu is not None and nu - dt.datetime.now(dt.UTC) < dt.timedelta(hours=24):
            # A warning, not a failure: the CRL is still good now; past nextUpdate it costs the
            # clients of its CA (--crl-expired reject), so say it before that happens.
            when = "has passed" if material.crls_expired() else "is less than 24 h away"
            print(
                f"mtls-proxy: warning: {cfg.source('crl')}: {for_terminal(cfg.tls.crl)}: the "
                f"CRL nextUpdate {rfc3339(nu)} {when}; re-sign the CRL (development PKI: "
                "mtls-proxy pki crl --dir DIR)",
                file=sys.stderr,
            )
    lines = [
        "configuration OK" + (f" ({cfg.config_file})" if cfg.config_file else ""),
        f"  listen:            {cfg.listen}",
        f"  upstream:          {cfg.upstream.url}",
        f"  server cert:       {for_terminal(material.server_subject)}",
        f"    not_after:       {rfc3339(material.not_after)}",
        f"    sha256:          {material.server_sha256}",
        f"    chain:           {material.chain_len} certificate(s) in {material.cert_file}",
        f"  trusted CAs:       {len(material.ca_certs)}"
        + (f" ({material.cacert_file})" if material.cacert_file else "")
        + (f", --trust-anchors {cfg.tls.trust_anchors}" if material.ca_certs else ""),
        *_anchor_lines(cfg, material),
        *crl_lines,
        f"  client auth:       {cfg.tls.client_auth}",
        *([f"  cert-dir:          found {', '.join(material.found)}"] if material.found else []),
        *([f"  policy file:       {cfg.policy_file}"] if cfg.policy_file else []),
        *(["  audit:             on (denials are logged, not enforced)"] if p.audit else []),
        f"  rules:             {len(rules)}" + "".join(f"\n    - {r}" for r in rules),
        f"  identity headers:  {','.join(cfg.identity_headers)} (xfcc mode {cfg.xfcc_mode})",
        f"  admin:             {cfg.admin or 'off'}",
        f"  trace context:     {cfg.trace_context}"
        + (f", spans to {cfg.otlp_endpoint}" if cfg.otlp_endpoint else ""),
    ]
    print("\n".join(lines))
    return 0


_SERVER_MATERIAL = ("cert", "key", "keystore", "cert-dir")


def _explain_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """The Config explain decides with. explain needs the trust and the policy, not our own
    certificate: when no flag, variable or config key names one, stand-ins keep the config
    valid (they are never read)."""
    env, flags, path, text = _inputs(args, env)
    tls = (parse_yaml(text, path) if text is not None and path else {}).get("tls")
    if not any(
        flags.get(o.name) is not None
        or o.env in env
        or (isinstance(tls, dict) and o.path[1] in tls)
        for o in OPTIONS
        if o.name in _SERVER_MATERIAL
    ):
        flags |= {"cert": "-", "key": "-"}
    return load_config(text=text, filename=path or "config", env=env, flags=flags)


def _anchor_lines(cfg: Config, material: Material) -> list[str]:
    """One line per trusted CA (anchors.py); ConfigError when none can verify a client."""
    from mtls_proxy.material import anchors

    if cfg.tls.client_auth != "none" and material.cacert_file is not None:
        why = anchors.unusable(material.ca_certs, cfg.tls.trust_anchors)
        if why is not None:
            raise ConfigError(
                f"{material.cacert_file}: the trusted CAs cannot verify any client: {why}"
            )
    return [
        f"    - {for_terminal(line)}"
        for line in anchors.report(material.ca_certs, cfg.tls.trust_anchors)
    ]


def _explain(args: argparse.Namespace) -> int:
    from mtls_proxy.cli.explain import explain
    from mtls_proxy.material.verify import VerifierError

    client_cert = args.client_cert
    if client_cert is None:
        # The old spelling, before explain took the server's options: still the client's
        # certificate when nothing else says it is the server's.
        if args.cert is None or any(getattr(args, n) for n in ("key", "keystore", "cert-dir")):
            raise ConfigError("explain: --client-cert FILE is required")
        print(
            "mtls-proxy: warning: explain --cert is deprecated; use --client-cert",
            file=sys.stderr,
        )
        client_cert, args.cert = args.cert, None
    cfg = _explain_config(args)
    try:
        code, report = explain(cfg, client_cert, args.method, args.path, args.client_key)
    except VerifierError as exc:  # our in-memory handshake broke: a bug, not the client's
        print(f"mtls-proxy: error: explain could not verify: {for_terminal(exc)}", file=sys.stderr)
        return 1
    print(report)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtls-proxy`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            return _check(args)
        if args.command == "pki":
            return run_pki(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "client":
            return run_client(args)
        from mtls_proxy.cli.demo import run_demo

        return run_demo(self_test=args.self_test, port=args.port)
    except ConfigError as exc:
        for problem in exc.problems:  # may name a subject, an alias or a path: escaped
            print(f"mtls-proxy: error: {for_terminal(problem)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mtls-proxy: error: {for_terminal(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
