"""`mtls-proxy client`: the egress direction (core/egress.py; docs/egress.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from mtls_proxy.cli.loops import run_async
from mtls_proxy.cli.parsers import c_parsers_problem
from mtls_proxy.core.egress import CLIENT_OPTIONS, PREFIX, load_client_config
from mtls_proxy.core.envvars import unknown_env
from mtls_proxy.core.escape import for_terminal
from mtls_proxy.material.loader import read_text
from mtls_proxy.telemetry.logs import setup_logging

if TYPE_CHECKING:
    from mtls_proxy.core.egress import ClientConfig


def add_client_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `client` subcommand and its options."""
    p = sub.add_parser(
        "client",
        help="egress: plaintext in on --listen, mTLS out to --target with our certificate",
    )
    p.add_argument("--config", "-c", metavar="FILE", help=f"YAML config file (env {PREFIX}CONFIG)")
    for opt in CLIENT_OPTIONS:
        flag = f"--{opt.name}"
        text = opt.help.replace("%", "%%")  # argparse formats help with %
        if opt.kind == "allow":
            p.add_argument(flag, dest=opt.name, action="append", metavar="V", help=text)
        elif opt.kind == "bool":
            p.add_argument(
                flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None,
                help=text,
            )  # fmt: skip
        else:
            default = "" if opt.default is None else f" (default {opt.default})"
            p.add_argument(
                flag, dest=opt.name, metavar=opt.name.split("-")[-1].upper(),
                help=text + default,
            )  # fmt: skip


def client_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> ClientConfig:
    """The ClientConfig from flags, MTLS_PROXY_CLIENT_* and the config file."""
    env = dict(os.environ) if env is None else env
    for warning in unknown_env(env, CLIENT_OPTIONS, PREFIX):
        if warning.startswith(f"{PREFIX}CONFIG:"):
            continue
        print(f"mtls-proxy: warning: {for_terminal(warning)}", file=sys.stderr)
    flags = {o.name: getattr(args, o.name, None) for o in CLIENT_OPTIONS}
    path = args.config or env.get(f"{PREFIX}CONFIG")
    text = read_text(path, "--config", "config") if path else None
    return load_client_config(text=text, filename=path or "config", env=env, flags=flags)


def run_client(args: argparse.Namespace) -> int:
    """Run `client` until SIGTERM."""
    from mtls_proxy.material.egress import load_client_material
    from mtls_proxy.server.egress import EgressServer

    cfg = client_config(args)
    setup_logging(cfg.log_format, cfg.log_level)
    problem = c_parsers_problem(aiohttp=cfg.http)
    if problem is not None:
        print(f"mtls-proxy: refusing to start: {problem}", file=sys.stderr)
        return 1
    material = load_client_material(cfg)

    async def main() -> int:
        await EgressServer(cfg, material).run()
        return 0

    return run_async(main, cfg.loop)
