"""PURE. The YAML shape of a policy (config ``policy:`` section or a ``--policy`` file) -> Policy.

Shape (docs/config.md, Policy)::

    allow: [{uri: spiffe://...}, {cn: batch, o: Example}]     # top-level rules
    routes:
      - path_prefix: /admin
        methods: [POST, DELETE]                               # optional; absent = every method
        allow: [{uri: spiffe://.../sa/admin}]                  # [] = nobody (fail closed)
    audit: false

Every problem is collected, named by file and key path (``policy.yaml: routes[1].methods``).

Every YAML the proxy reads (the config file, a policy file) goes through load_yaml():
1. A key twice in one mapping is an error naming the line (PyYAML keeps the last silently).
2. An error names the file, line, column and the kind of problem, never the file's text:
   PyYAML's own message quotes the offending line, and that line may hold a password.
3. Aliases may share, not multiply: a document that expands to more than MAX_VALUES values
   (a "billion laughs") or nests deeper than MAX_DEPTH is refused before anything walks it.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from typing import Final

import yaml

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.policy import Policy, Route, Rule, RuleError, compile_rule

try:  # libyaml: parses a 1 MiB file ~10x faster, and bounds flow nesting itself
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover -- PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]  # same interface

POLICY_KEYS: Final = ("allow", "routes", "audit")
ROUTE_KEYS: Final = ("path_prefix", "methods", "allow")
_TOKEN: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PREFIX: Final = re.compile(r"^/[\x21-\x7e]*$")
MAX_VALUES: Final = 1_000_000
MAX_DEPTH: Final = 100  # a config nests ~6 deep; repr() of a 1,000-deep list overflows
_POLICY_SHAPE: Final = "a policy file is a mapping with allow, routes, audit"
MAX_REPORTED_REPEATS: Final = 10  # duplicate routes named one by one; the rest are counted
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_SAFE_KEY: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Quoted text in PyYAML's problem strings: a token name ('<block end>') and structural
# punctuation are PyYAML's; anything else ("found character '@'", "the tag '!x'") is the file's.
_QUOTED: Final = re.compile(r"'[^']*'|\"[^\"]*\"")
_OWN_QUOTES: Final = re.compile(r"^'(<[a-z ]+>|[,\[\]{}:])'$")


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key: object, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(None, None, "duplicate key", again)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(_SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (rule 1)."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        """The mapping of *node*; _DuplicateKey when a key repeats (merge keys may override)."""
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`, then keys that override it: YAML's way
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise _DuplicateKey(key, first.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _shown_key(key: object) -> str:
    if isinstance(key, bool | int | float) or (isinstance(key, str) and _SAFE_KEY.match(key)):
        return f" {key!r}"
    return ""  # a key that looks like data is not echoed (rule 2)


def _redact(problem: str) -> str:
    return _QUOTED.sub(lambda m: m[0] if _OWN_QUOTES.match(m[0]) else "(…)", problem)


def _yaml_error(exc: yaml.YAMLError, text: str, filename: str) -> str:
    """File, line, column and the problem; never a snippet of the file (rule 2)."""
    if isinstance(exc, _DuplicateKey):
        again = exc.again
        return (
            f"{filename}: line {again.line + 1}, column {again.column + 1}: duplicate key"
            f"{_shown_key(exc.key)} (first at line {exc.first.line + 1}); "
            "a key may appear once in a mapping"
        )
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _redact(exc.problem or exc.context or "a syntax error")
        if exc.problem and exc.context:
            problem += f" ({_redact(exc.context)})"
        return f"{filename}: not valid YAML{where}: {problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        return f"{filename}: not valid YAML at line {line}, column {column}: {exc.reason}"
    return f"{filename}: not valid YAML ({type(exc).__name__})"


def _check_size(data: object, filename: str) -> None:
    """Refuse documents whose aliases expand past MAX_VALUES, nest past MAX_DEPTH, or loop
    (rule 3). Each shared list or mapping is counted once: linear in the document."""
    sizes: dict[int, int] = {}  # id -> values in it, aliases expanded
    on_path: set[int] = set()
    stack: list[tuple[object, int, bool]] = [(data, 1, False)]
    while stack:
        obj, depth, finished = stack.pop()
        if not isinstance(obj, list | dict):
            continue
        children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        if finished:
            on_path.discard(id(obj))
            sizes[id(obj)] = total = 1 + sum(sizes.get(id(c), 1) for c in children)
            if total > MAX_VALUES:
                raise ConfigError(f"{filename}: aliases expand to more than {MAX_VALUES} values")
            continue
        if id(obj) in sizes:
            continue
        if id(obj) in on_path:
            raise ConfigError(f"{filename}: an alias refers to a mapping or list that holds it")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{filename}: nested deeper than {MAX_DEPTH} levels")
        on_path.add(id(obj))
        stack.append((obj, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


def load_yaml(text: str, filename: str) -> object:
    """Parse one YAML document (the config file, a policy file); ConfigError naming the file and
    line for a syntax error, a duplicate key or an alias bomb (rules 1-3)."""
    try:
        data: object = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(exc, text, filename)) from None
    except RecursionError:  # the pure-Python parser, without libyaml's nesting limit
        raise ConfigError(f"{filename}: nested deeper than {MAX_DEPTH} levels") from None
    _check_size(data, filename)
    return data


def load_mapping(text: str, filename: str, shape: str) -> dict[str, object] | None:
    """load_yaml() of a document that must be a mapping: the mapping, None for an empty
    document, ConfigError ``FILENAME: SHAPE`` for anything else (a list, a scalar)."""
    data = load_yaml(text, filename)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{filename}: {shape}")
    return data


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
    _report_repeats(out, where, problems)
    # Longest prefix first; for one prefix, the route with methods before the catch-all one.
    return tuple(sorted((r for r, _ in out), key=lambda r: (-len(r.prefix), r.methods is None)))


def _report_repeats(routes: list[tuple[Route, str]], where: str, problems: list[str]) -> None:
    """A route whose prefix and methods an earlier route already has (catch-all routes clash
    with catch-all routes only). One dict lookup per (prefix, method): linear, where comparing
    every pair made 2,000 copies of one route cost ~2,000,000 messages (~1 GB)."""
    owner: dict[tuple[str, str | None], str] = {}  # (prefix, method; None = all) -> first route
    reported = more = 0
    for route, here in routes:
        clashes: dict[str, list[str]] = {}  # earlier route -> the methods it already has
        for method in sorted(route.methods) if route.methods is not None else (None,):
            there = owner.setdefault((route.prefix, method), here)
            if there != here:
                clashes.setdefault(there, []).append(method or "*")
        if clashes and reported >= MAX_REPORTED_REPEATS:
            more += 1
            continue
        reported += bool(clashes)
        for there, methods in clashes.items():
            earlier = there.rsplit(": ", 1)[-1]
            problems.append(f"{here}: {earlier} already routes {','.join(methods)} {route.prefix}")
    if more:
        problems.append(f"{where}: {more} more routes repeat an earlier one")


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
    data = load_mapping(text, filename, _POLICY_SHAPE)
    if data is None:  # an empty file: not a policy (one without rules would say less)
        raise ConfigError(f"{filename}: {_POLICY_SHAPE}")
    problems: list[str] = []
    policy = compile_policy(data, f"{filename}: ", problems)
    if not problems:
        problems.extend(check_policy(policy, filename, client_auth))
    if problems:
        raise ConfigError(problems)
    return policy


def check_policy(
    policy: Policy,
    where: str | None,
    client_auth: str,
    *,
    sources: Mapping[str, str] | None = None,
    rules_src: str = "",
) -> list[str]:
    """Policies that cannot be what the operator meant (fail closed, but say so): the one
    validator, for a ``--policy`` file and for the configuration's own policy.

    *where* names a policy file: each problem starts with it. ``None`` is the configuration's
    policy (flags, variables, the ``policy:`` section): problems name the option's source from
    *sources* (option -> where it came from) and *rules_src* (where the allow rules came from).
    Only a policy file is checked for anonymous rules under ``client_auth: require`` (as before:
    the configuration checks ``--allow-anonymous`` there instead)."""
    src = sources or {}
    at = f"{where}: " if where is not None else ""
    every = [*policy.rules, *(r for route in policy.routes for r in route.rules)]
    problems = []
    if policy.allow_all and any(not r.anonymous for r in policy.rules):
        problems.append(
            f"{src.get('allow-all', '--allow-all')}: --allow-all cannot be combined with allow "
            f"rules ({rules_src}); use one or the other"
        )
    if policy.allow_anonymous and client_auth == "require":
        problems.append(
            f"{src.get('allow-anonymous', '--allow-anonymous')}: --allow-anonymous needs "
            "--client-auth optional or none (with require, every client has a certificate)"
        )
    if client_auth == "none" and (policy.allow_all or any(not r.anonymous for r in every)):
        problems.append(
            f"{at}--client-auth none requests no certificate, so only anonymous rules can match; "
            f"remove the {'certificate' if where is not None else '--allow-*'} rules or change "
            "--client-auth"
        )
    if where is not None and client_auth == "require" and any(r.anonymous for r in every):
        problems.append(
            f"{where}: anonymous rules need --client-auth optional or none "
            "(with require, every client has a certificate)"
        )
    if not policy.has_rules:
        problems.append(
            f"{where}: no access rules: the proxy fails closed and would deny every request"
            if where is not None
            else "no access rules: give --allow-* flags, policy.allow, --allow-all or "
            "--allow-anonymous (the proxy fails closed and would deny every request)"
        )
    return problems
