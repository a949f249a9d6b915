"""PURE. Allow-list rules and the authorization decision.

Rules:
1. Fail closed: no rule, no access. Every deny path returns a Decision; nothing raises from
   decide().
2. A rule matches when *all* of its fields match; a request is allowed when *any* rule matches.
3. Subject fields must be unambiguous: a ``cn`` or ``o`` rule never matches a subject that carries
   that attribute twice (docs/security.md, POL-008), so the decision cannot depend on which value a
   library returns first. ``ou`` is commonly multi-valued, so any OU may match.
4. SAN fields match when any SAN of that type matches (ghostunnel's OR semantics); values are
   compared exactly (no NUL truncation, no case folding for URIs; DNS is case-insensitive).
5. A request without a client certificate only matches ``anonymous`` rules.
6. Routes (docs/config.md, Routes): the route with the longest whole-segment prefix among those
   whose methods include the request's applies, and only its rules count; a request that no
   route takes uses the top-level rules (and --allow-all / --allow-anonymous).
7. This module never sees raw certificates, only PeerIdentity.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from mtls_proxy.core.identity import PeerIdentity
from mtls_proxy.core.paths import prefix_matches
from mtls_proxy.core.wildcard import DnsPattern, UriPattern, compile_dns, compile_uri

RULE_FIELDS: Final = ("cn", "o", "ou", "dns", "uri", "email", "ip", "sha256", "anonymous")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


class RuleError(ValueError):
    """A rule field that cannot be compiled."""


def normalize_sha256(value: str) -> str:
    """Lowercase hex without separators; raise RuleError if it is not a SHA-256."""
    v = value.replace(":", "").strip().lower()
    if not _HEX64.match(v):
        raise RuleError(f"{value!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return v


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled allow rule; unset fields are None."""

    cn: str | None = None
    o: str | None = None
    ou: str | None = None
    dns: DnsPattern | None = None
    uri: UriPattern | None = None
    email: str | None = None
    ip: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    sha256: str | None = None
    anonymous: bool = False
    name: str = ""

    def matches(self, peer: PeerIdentity) -> bool:
        """True when every set field matches *peer* (an authenticated client)."""
        if self.anonymous:
            return False  # anonymous rules admit only certificate-less requests
        if self.cn is not None and peer.cn != (self.cn,):
            return False
        if self.o is not None and peer.o != (self.o,):
            return False
        if self.ou is not None and self.ou not in peer.ou:
            return False
        if self.dns is not None and not any(self.dns.matches(d) for d in peer.dns):
            return False
        if self.uri is not None and not any(self.uri.matches(u) for u in peer.uri):
            return False
        if self.email is not None and self.email not in peer.email:
            return False
        if self.ip is not None and not any(_in_network(a, self.ip) for a in peer.ip):
            return False
        return self.sha256 is None or self.sha256 == peer.sha256


def _in_network(addr: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return False  # an unparsable SAN address never matches


def compile_rule(spec: dict[str, object]) -> Rule:
    """Build a Rule from a mapping of field -> value; raise RuleError naming the field."""
    unknown = sorted(set(spec) - set(RULE_FIELDS))
    if unknown:
        raise RuleError(f"unknown rule field(s) {unknown}; allowed: {', '.join(RULE_FIELDS)}")
    if not spec:
        raise RuleError("an empty rule would match every client; list at least one field")
    kw: dict[str, object] = {}
    for key, value in spec.items():
        if key == "anonymous":
            if value is not True:
                raise RuleError("anonymous must be true (or left out)")
            if len(spec) > 1:
                raise RuleError("an anonymous rule cannot have other fields")
            kw[key] = True
            continue
        if not isinstance(value, str) or not value:
            raise RuleError(f"{key} must be a non-empty string (got {value!r})")
        try:
            if key == "uri":
                kw[key] = compile_uri(value)
            elif key == "dns":
                kw[key] = compile_dns(value)
            elif key == "ip":
                kw[key] = ipaddress.ip_network(value, strict=True)
            elif key == "sha256":
                kw[key] = normalize_sha256(value)
            else:
                kw[key] = value
        except ValueError as exc:
            raise RuleError(f"{key}: {exc}") from None
    name = ",".join(f"{k}={v}" for k, v in spec.items())
    return Rule(name=name, **kw)  # type: ignore[arg-type]  # keys were checked against RULE_FIELDS


@dataclass(frozen=True, slots=True)
class Route:
    """A path prefix (whole segments), optional methods, and the rules that apply there."""

    prefix: str
    methods: frozenset[str] | None
    rules: tuple[Rule, ...]

    @property
    def name(self) -> str:
        """How decisions and logs name this route."""
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        return f"{methods} {self.prefix}"

    def applies(self, method: str, path: str) -> bool:
        """True when this route takes a request for *method* and (match-)path *path*."""
        if self.methods is not None and method not in self.methods:
            return False
        return prefix_matches(self.prefix, path)


@dataclass(frozen=True, slots=True)
class Policy:
    """The compiled allow-list; routes are kept longest prefix first."""

    rules: tuple[Rule, ...] = ()
    allow_all: bool = False
    allow_anonymous: bool = False
    audit: bool = False
    routes: tuple[Route, ...] = ()

    @property
    def has_anonymous(self) -> bool:
        """True when certificate-less requests can be admitted by the top-level rules."""
        return self.allow_anonymous or any(r.anonymous for r in self.rules)

    @property
    def has_rules(self) -> bool:
        """False when the policy would deny every request (fail closed, but surely a mistake)."""
        return bool(self.allow_all or self.has_anonymous or self.rules or self.routes)

    def route_for(self, method: str, path: str) -> Route | None:
        """The route that applies (rule 6), or None for the top-level rules."""
        for route in self.routes:
            if route.applies(method, path):
                return route
        return None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of decide(): allowed or not, which rule, and why."""

    allowed: bool
    status: int  # 200 when allowed, else 401/403
    reason: str
    rule: str | None = None
    kind: str = "allow"  # allow | deny | audit | anonymous


def decide(policy: Policy, peer: PeerIdentity | None, method: str, path: str) -> Decision:
    """Authorize one request for the match-path *path* (paths.match_path); fail closed."""
    return decide_route(policy, policy.route_for(method, path), peer)


def decide_route(policy: Policy, route: Route | None, peer: PeerIdentity | None) -> Decision:
    """Authorize a request that *route* (None: the top-level rules) applies to."""
    if route is None:
        rules, anonymous, allow_all, where = (
            policy.rules,
            policy.has_anonymous,
            policy.allow_all,
            "",
        )
    else:
        rules = route.rules
        anonymous = any(r.anonymous for r in rules)
        allow_all, where = False, f"route {route.name}: "
    if peer is None:
        if anonymous:
            return Decision(True, 200, "anonymous access allowed", f"{where}anonymous", "anonymous")
        # No certificate and no anonymous rule: 401, the client may retry with a certificate.
        return _deny(policy, 401, f"{where}client certificate required")
    if allow_all:
        return Decision(True, 200, "allow_all", "allow_all", "allow")
    for rule in rules:
        if rule.matches(peer):
            return Decision(True, 200, "matched", where + rule.name, "allow")
    # Fail closed: nothing matched (an empty rule list lands here too).
    return _deny(policy, 403, f"{where}no allow rule matches the client certificate")


def _deny(policy: Policy, status: int, reason: str) -> Decision:
    if policy.audit:
        return Decision(True, 200, f"audit: {reason}", None, "audit")
    return Decision(False, status, reason, None, "deny")
