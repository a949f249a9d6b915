"""``mtls-proxy pki``: its arguments and its commands (init, issue, revoke, crl, export), over
pki.py's development PKI. main.py hands it the parsed arguments."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mtls_proxy.core.errors import ConfigError


def _days(text: str) -> int:
    """--days of pki issue: 0 or less would write a certificate that is already expired."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1 (got {days}: the certificate would be expired when written)"
        )
    return days


def add_pki_parser(sub: Any) -> None:  # argparse's _SubParsersAction is private
    """The ``pki`` sub-command and its own sub-commands, on the top parser's *sub*."""
    pki = sub.add_parser("pki", help="development PKI")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="root + intermediate CA in DIR")
    init.add_argument("dir")
    init.add_argument("--key-type", choices=["ec", "rsa", "ed25519"], default="ec")
    issue = pki_sub.add_parser("issue", help="issue a server or client certificate")
    issue.add_argument("kind", choices=["server", "client"])
    issue.add_argument("name")
    issue.add_argument("--dir", required=True)
    for flag in ("dns", "ip", "uri", "email", "ou"):
        issue.add_argument(f"--{flag}", action="append", default=[])
    issue.add_argument("--cn")
    issue.add_argument("--o")
    issue.add_argument(
        "--days", type=_days, default=825, help="validity in days, at least 1 (default 825)"
    )
    issue.add_argument("--key-type", choices=["ec", "rsa", "ed25519"], default="ec")
    revoke = pki_sub.add_parser("revoke", help="add NAME to DIR/crl.pem")
    revoke.add_argument("name")
    revoke.add_argument("--dir", required=True)
    crl = pki_sub.add_parser("crl", help="re-sign DIR/crl.pem: same entries, a new nextUpdate")
    crl.add_argument("--dir", required=True)
    crl.add_argument(
        "--days", type=_days, default=7, help="nextUpdate this many days out (default 7)"
    )
    export = pki_sub.add_parser("export", help="keystore/truststore for Spring Boot or PEM")
    export.add_argument("name")
    export.add_argument("--dir", required=True)
    export.add_argument("--format", choices=["p12", "jks", "pem"], default="p12")
    export.add_argument("--password", help="store password (literal, ${ENV} or file:/path)")
    export.add_argument("--out", help="output directory (default DIR/NAME-export)")


def run_pki(args: argparse.Namespace) -> int:
    """Run the parsed ``pki`` command; ConfigError (exit 2) for a bad directory or name."""
    from mtls_proxy.cli import pki

    if args.pki_command == "init":
        directory = Path(args.dir)
        pki.init_pki(directory, args.key_type)
        print(f"wrote {directory}/root.crt, root.key, intermediate.crt, intermediate.key, ca.crt")
        return 0
    directory = Path(args.dir)
    if args.pki_command == "crl":
        try:
            path, count = pki.refresh_crls(directory, args.days)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--dir: {directory}: cannot re-sign the CRLs ({exc})") from None
        print(f"wrote {path}: {count} revoked certificate(s), next update in {args.days} day(s)")
        return 0
    if args.pki_command in ("revoke", "export"):
        return _pki_store(args, directory)
    try:
        issuer = pki.load_issuer(directory)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--dir: {directory}: no usable intermediate CA ({exc}); "
            "run 'mtls-proxy pki init DIR' first"
        ) from None
    try:
        item = pki.issue(
            issuer,
            args.kind,
            args.cn or args.name,
            dns=args.dns,
            ips=args.ip,
            uris=args.uri,
            emails=args.email,
            o=args.o,
            ou=args.ou,
            days=args.days,
            key_type=args.key_type,
        )
    except ValueError as exc:
        raise ConfigError(f"pki issue {args.name}: {exc}") from None
    pki.write_pair(directory, args.name, item)
    print(f"wrote {directory}/{args.name}.crt (leaf + intermediate) and {args.name}.key")
    return 0


def _pki_store(args: argparse.Namespace, directory: Path) -> int:
    from mtls_proxy.cli import pki, spring
    from mtls_proxy.core.config import resolve_env_secret
    from mtls_proxy.material.tls import resolve_password

    name = args.name
    if not (directory / f"{name}.crt").is_file():
        raise ConfigError(f"{directory / (name + '.crt')}: not found (issue it first)")
    if args.pki_command == "revoke":
        crl = pki.revoke(directory, name)
        print(f"revoked {name}; wrote {crl}")
        return 0
    if args.format != "pem" and not args.password:
        raise ConfigError("--password is required for p12 and jks stores")
    secret = ""
    if args.password:
        try:
            literal = resolve_env_secret(args.password, dict(os.environ))
        except ValueError as exc:
            raise ConfigError(f"--password: {exc}") from None
        secret = (resolve_password(literal, "--password") or b"").decode()
    out = pki.export(directory, name, args.format, secret, Path(args.out) if args.out else None)
    print(f"wrote {out}")
    client = spring.is_client_only(pki.load_issued(directory, name).cert)
    print(spring.spring_properties(out.resolve(), args.format, secret, name, client=client))
    return 0
