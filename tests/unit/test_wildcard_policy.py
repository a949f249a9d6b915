"""Policy matching tables: wildcards, rule fields, fail-closed branches."""

from __future__ import annotations

import pytest

from mtls_proxy.core.identity import PeerIdentity
from mtls_proxy.core.policy import Policy, Rule, RuleError, compile_rule, decide, normalize_sha256
from mtls_proxy.core.wildcard import PatternError, compile_dns, compile_uri

SHA = "ab" * 32


def peer(**kw: object) -> PeerIdentity:
    base: dict[str, object] = {"subject": "CN=x", "sha256": SHA}
    base.update(kw)
    return PeerIdentity(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "value", "match"),
    [
        ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/b", True),
        ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/b/", False),
        ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/b-evil", False),
        ("spiffe://td/ns/a/sa/b", "SPIFFE://TD/ns/a/sa/b", False),
        ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/B", False),
        ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/b/../admin", False),
        ("spiffe://td/ns/*/sa/b", "spiffe://td/ns/x/sa/b", True),
        ("spiffe://td/ns/*/sa/b", "spiffe://td/ns/x/y/sa/b", False),
        ("spiffe://td/ns/*/sa/b", "spiffe://td/ns//sa/b", False),
        ("spiffe://td/ns/**", "spiffe://td/ns/x/y/z", True),
        ("spiffe://td/ns/**", "spiffe://td/ns", False),
        ("spiffe://td/ns/**", "spiffe://td/nsx/y", False),
        ("spiffe://td/a.b", "spiffe://td/aXb", False),  # regex metacharacters are literal
    ],
)
def test_uri_patterns(pattern: str, value: str, match: bool) -> None:
    assert compile_uri(pattern).matches(value) is match


@pytest.mark.parametrize(
    "pattern",
    [
        "not-a-uri",
        "spiffe://td/**/x",
        "spiffe://td/a*b",
        "spiffe://*/x",
        "spi*ffe://td/x",
        "spiffe://td/ x",
        "**",
    ],
)
def test_invalid_uri_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_uri(pattern)


@pytest.mark.parametrize(
    ("pattern", "value", "match"),
    [
        ("svc.example.com", "svc.example.com", True),
        ("svc.example.com", "SVC.Example.COM", True),
        ("svc.example.com", "svc.example.com.evil", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("allowed.test", "allowed.test\x00.evil.test", False),
    ],
)
def test_dns_patterns(pattern: str, value: str, match: bool) -> None:
    assert compile_dns(pattern).matches(value) is match


@pytest.mark.parametrize("pattern", ["", "a..b", "*", "a.*.b", "-a.b", "a b"])
def test_invalid_dns_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_dns(pattern)


@pytest.mark.parametrize(
    ("rule", "identity", "match"),
    [
        ({"cn": "client"}, {"cn": ("client",)}, True),
        ({"cn": "client"}, {"cn": ("evilclient",)}, False),
        ({"cn": "client"}, {"cn": ("client ",)}, False),
        ({"cn": "admin"}, {"cn": ("admin\x00.evil",)}, False),
        ({"cn": "allowed-client"}, {"cn": ("allowed-client", "admin")}, False),  # ambiguous
        ({"o": "Example"}, {"o": ("Example",)}, True),
        ({"o": "Example"}, {"o": ("Example", "Other")}, False),
        ({"ou": "team"}, {"ou": ("dept", "team")}, True),
        ({"ou": "team"}, {"ou": ()}, False),
        ({"cn": "c", "o": "O"}, {"cn": ("c",), "o": ("O",)}, True),
        ({"cn": "c", "o": "O"}, {"cn": ("c",), "o": ("X",)}, False),  # all fields must match
        ({"uri": "spiffe://td/a"}, {"uri": ("spiffe://td/b", "spiffe://td/a")}, True),
        ({"uri": "spiffe://td/a"}, {}, False),  # no URI SAN never matches a URI rule
        ({"dns": "*.svc"}, {"dns": ("a.svc",)}, True),
        ({"dns": "*.svc"}, {"dns": ("a.b.svc", "svc")}, False),
        ({"email": "a@b.c"}, {"email": ("a@b.c",)}, True),
        ({"email": "a@b.c"}, {"email": ("A@b.c",)}, False),
        ({"ip": "10.0.0.0/8"}, {"ip": ("10.1.2.3",)}, True),
        ({"ip": "10.0.0.1"}, {"ip": ("10.0.0.2",)}, False),
        ({"ip": "::1"}, {"ip": ("::1",)}, True),
        ({"ip": "10.0.0.0/8"}, {"ip": ("junk",)}, False),
        ({"sha256": SHA.upper()}, {}, True),
        ({"sha256": ":".join([SHA[i : i + 2] for i in range(0, 64, 2)])}, {}, True),
        ({"sha256": "cd" * 32}, {}, False),
    ],
)
def test_rule_matching(rule: dict[str, object], identity: dict[str, object], match: bool) -> None:
    assert compile_rule(rule).matches(peer(**identity)) is match


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ({}, "empty rule"),
        ({"cname": "x"}, "unknown rule field"),
        ({"cn": ""}, "non-empty"),
        ({"cn": 5}, "non-empty string"),
        ({"ip": "10.0.0.1/8"}, "ip:"),
        ({"sha256": "abc"}, "SHA-256"),
        ({"anonymous": False}, "must be true"),
        ({"anonymous": True, "cn": "x"}, "other fields"),
        ({"uri": "x"}, "uri:"),
        ({"dns": "*"}, "dns:"),
    ],
)
def test_invalid_rules(rule: dict[str, object], error: str) -> None:
    with pytest.raises(RuleError, match=error):
        compile_rule(rule)


def test_anonymous_rule_compiles() -> None:
    assert compile_rule({"anonymous": True}) == Rule(anonymous=True, name="anonymous=True")


def test_normalize_sha256() -> None:
    assert normalize_sha256("AB:" * 31 + "AB") == "ab" * 32


def test_empty_policy_denies_every_peer() -> None:
    d = decide(Policy(), peer(cn=("x",)), "GET", "/")
    assert (d.allowed, d.status, d.kind) == (False, 403, "deny")


def test_missing_certificate_denies_with_401_unless_anonymous() -> None:
    assert decide(Policy(rules=(compile_rule({"cn": "x"}),)), None, "GET", "/").status == 401
    assert decide(Policy(allow_all=True), None, "GET", "/").allowed is False
    d = decide(Policy(allow_anonymous=True), None, "GET", "/")
    assert (d.allowed, d.kind) == (True, "anonymous")
    assert decide(Policy(rules=(Rule(anonymous=True),)), None, "GET", "/").allowed


def test_anonymous_rule_never_matches_a_certificate() -> None:
    assert decide(Policy(rules=(Rule(anonymous=True),)), peer(), "GET", "/").status == 403


def test_allow_all_and_first_matching_rule() -> None:
    assert decide(Policy(allow_all=True), peer(), "GET", "/").rule == "allow_all"
    rules = (compile_rule({"cn": "a"}), compile_rule({"cn": "b"}))
    d = decide(Policy(rules=rules), peer(cn=("b",)), "GET", "/")
    assert (d.allowed, d.rule) == (True, "cn=b")


def test_audit_lets_denials_through_but_marks_them() -> None:
    d = decide(Policy(audit=True), peer(), "GET", "/")
    assert (d.allowed, d.kind) == (True, "audit")
