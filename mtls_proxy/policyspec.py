"""PURE. The YAML shape of a policy (config ``policy:`` section or a ``--policy`` file) -> Policy.

Shape (SPEC section 4)::

    allow: [{uri: spiffe://...}, {cn: batch, o: Example}]     # top-level rules
    routes:
      - path_prefix: /admin
        methods: [POST, DELETE]                               # optional; absent = every method
        allow: [{uri: spiffe://.../sa/admin}]                  # [] = nobody (fail closed)
    audit: false

Every problem is collected, named by file and key path (``policy.yaml: routes[1].methods``).
"""

from __future__ import annotations

import re
from typing import Final

import yaml

from mtls_proxy.errors import ConfigError
from mtls_proxy.policy import Policy, Route, Rule, RuleError, compile_rule

POLICY_KEYS: Final = ("allow", "routes", "audit")
ROUTE_KEYS: Final = ("path_prefix", "methods", "allow")
_TOKEN: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PREFIX: Final = re.compile(r"^/[\x21-\x7e]*$")


def compile_rules(allow: object, where: str, problems: list[str]) -> list[Rule]:
    """A list of rule mappings -> Rules; problems are appended, named by index."""
    if not isinstance(allow, list):
        problems.append(f"{where}: must be a list of rules such as [{{cn: name}}]")
        return []
    rules: list[Rule] = []
    for i, spec in enumerate(allow):
        if not isinstance(spec, dict):
            problems.append(f"{where}[{i}]: a rule must be a mapping such as {{cn: name}}")
            continue
        try:
            rules.append(compile_rule({str(k): v for k, v in spec.items()}))
        except RuleError as exc:
            problems.append(f"{where}[{i}]: {exc}")
    return rules


def _prefix(value: object, where: str, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not _PREFIX.match(value):
        problems.append(f"{where}: must be a path starting with / (got {value!r})")
        return None
    if "?" in value or "%" in value or "\\" in value or ";" in value:
        problems.append(f"{where}: a prefix is a plain path, without ?, %, ; or \\ (got {value!r})")
        return None
    segments = [s for s in value.split("/") if s]
    if any(s in (".", "..") for s in segments):
        problems.append(f"{where}: '.' and '..' segments are not allowed (got {value!r})")
        return None
    return "/" + "/".join(segments)  # requests are matched after slashes are merged


def _methods(value: object, where: str, problems: list[str]) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: must be a non-empty list such as [GET, POST]")
        return None
    out = set()
    for m in value:
        if not isinstance(m, str) or not _TOKEN.match(m):
            problems.append(f"{where}: {m!r} is not an HTTP method")
        elif m != m.upper():
            problems.append(f"{where}: methods are case-sensitive; write {m.upper()!r}")
        else:
            out.add(m)
    return frozenset(out)


def compile_routes(routes: object, where: str, problems: list[str]) -> tuple[Route, ...]:
    """A list of route mappings -> Routes, longest prefix first (stable for equal lengths)."""
    if not isinstance(routes, list):
        problems.append(f"{where}: must be a list of {{path_prefix, methods, allow}} mappings")
        return ()
    out: list[tuple[Route, str]] = []
    for i, spec in enumerate(routes):
        here = f"{where}[{i}]"
        if not isinstance(spec, dict):
            problems.append(f"{here}: a route must be a mapping with path_prefix and allow")
            continue
        unknown = sorted(str(k) for k in spec if k not in ROUTE_KEYS)
        if unknown:
            problems.append(f"{here}: unknown key(s) {unknown}; allowed: {', '.join(ROUTE_KEYS)}")
        if "path_prefix" not in spec or "allow" not in spec:
            problems.append(f"{here}: path_prefix and allow are required (allow: [] denies all)")
            continue
        prefix = _prefix(spec["path_prefix"], f"{here}.path_prefix", problems)
        methods = _methods(spec.get("methods"), f"{here}.methods", problems)
        rules = compile_rules(spec["allow"], f"{here}.allow", problems)
        if prefix is not None:
            out.append((Route(prefix, methods, tuple(rules)), here))
    for j, (route, here) in enumerate(out):
        for other, there in out[:j]:
            if other.prefix != route.prefix or (other.methods is None) != (route.methods is None):
                continue  # different prefixes, or a method list next to the catch-all: fine
            shared = (other.methods or frozenset({"*"})) & (route.methods or frozenset({"*"}))
            if shared:
                both = ",".join(sorted(shared))
                earlier = there.rsplit(": ", 1)[-1]
                problems.append(f"{here}: {earlier} already routes {both} {route.prefix}")
    # Longest prefix first; for one prefix, the route with methods before the catch-all one.
    return tuple(sorted((r for r, _ in out), key=lambda r: (-len(r.prefix), r.methods is None)))


def compile_policy(
    data: dict[str, object],
    where: str,
    problems: list[str],
    *,
    allow_all: bool = False,
    allow_anonymous: bool = False,
) -> Policy:
    """A ``policy:`` mapping (inline or a file) -> Policy; *where* prefixes key paths."""
    unknown = sorted(str(k) for k in data if k not in POLICY_KEYS)
    if unknown:
        problems.append(
            f"{where.rstrip(' :.')}: unknown key(s) {unknown}; allowed: {', '.join(POLICY_KEYS)}"
        )
    rules = compile_rules(data["allow"], f"{where}allow", problems) if "allow" in data else []
    routes = compile_routes(data["routes"], f"{where}routes", problems) if "routes" in data else ()
    audit = data.get("audit", False)
    if not isinstance(audit, bool):
        problems.append(f"{where}audit: must be true or false")
        audit = False
    return Policy(tuple(rules), allow_all, allow_anonymous, audit, routes)


def parse_policy_file(text: str, filename: str, client_auth: str) -> Policy:
    """A ``--policy`` file's text -> Policy; raise ConfigError listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}: a policy file is a mapping with allow, routes, audit")
    problems: list[str] = []
    policy = compile_policy(data, f"{filename}: ", problems)
    if not problems:
        problems.extend(check_policy(policy, filename, client_auth))
    if problems:
        raise ConfigError(problems)
    return policy


def check_policy(policy: Policy, where: str, client_auth: str) -> list[str]:
    """Policies that cannot be what the operator meant (fail closed, but say so)."""
    problems = []
    if not policy.has_rules:
        problems.append(
            f"{where}: no access rules: the proxy fails closed and would deny every request"
        )
    cert_rules = [r for r in policy.rules if not r.anonymous] + [
        r for route in policy.routes for r in route.rules if not r.anonymous
    ]
    if client_auth == "none" and (cert_rules or policy.allow_all):
        problems.append(
            f"{where}: --client-auth none requests no certificate, so only anonymous rules "
            "can match; remove the certificate rules or change --client-auth"
        )
    anon = [r for r in policy.rules if r.anonymous] + [
        r for route in policy.routes for r in route.rules if r.anonymous
    ]
    if client_auth == "require" and anon:
        problems.append(
            f"{where}: anonymous rules need --client-auth optional or none "
            "(with require, every client has a certificate)"
        )
    return problems
