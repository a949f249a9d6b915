"""Route policies: path normalization, longest-prefix routing, the policy file's shape."""

from __future__ import annotations

import pytest

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import PeerIdentity
from mtls_proxy.core.paths import AmbiguousPath, match_path, normalize_target, prefix_matches
from mtls_proxy.core.policy import Policy, Route, compile_rule, decide
from mtls_proxy.core.policyspec import check_policy, compile_policy, parse_policy_file

ADMIN = PeerIdentity(subject="CN=admin", sha256="ab" * 32, cn=("admin",))
USER = PeerIdentity(subject="CN=user", sha256="cd" * 32, cn=("user",))


@pytest.mark.parametrize(
    ("target", "normalized"),
    [
        (b"/", b"/"),
        (b"/a/b", b"/a/b"),
        (b"/a/b/", b"/a/b/"),
        (b"//admin", b"/admin"),
        (b"/public/../admin", b"/admin"),
        (b"/public/./x", b"/public/x"),
        (b"/a/b/..", b"/a/"),
        (b"/a/.", b"/a/"),
        (b"/%61dmin", b"/admin"),
        (b"/%2e%2e/x", None),  # decoded to '..' above the root
        (b"/a/%2E%2E/admin", None),  # INT-020: an encoded dot segment is refused
        (b"/a/.%2e/admin", None),
        (b"/a/%2e/admin", None),
        (b"/a/..;/admin", None),  # Tomcat: "/admin"
        (b"/a/..;v=1/admin", None),
        (b"/a/..%3B/admin", None),
        (b"/.;/admin", None),
        (b"/;/admin", None),
        (b"/a/;x", None),
        (b"/a/%2e%2ex/b", b"/a/..x/b"),  # a name, not a dot segment
        (b"/admin;jsessionid=1/x", b"/admin;jsessionid=1/x"),
        (b"/a;b/../c", b"/c"),  # as Tomcat: parameters stripped, then ".." resolved
        (b"/a%20b", b"/a%20b"),
        (b"/a%c3%a9", b"/a%C3%A9"),
        (b"/admin%2Fx", None),
        (b"/admin%5cx", None),
        (b"/admin\\x", None),
        (b"/a%00", None),
        (b"/a%zz", None),
        (b"/a%4", None),
        (b"/..", None),
        (b"/a?x=/../y", b"/a?x=/../y"),
        (b"/p/../admin?q", b"/admin?q"),
        (b"*", b"*"),
    ],
)
def test_normalize_target(target: bytes, normalized: bytes | None) -> None:
    if normalized is None:
        with pytest.raises(AmbiguousPath):
            normalize_target(target)
    else:
        assert normalize_target(target) == normalized


def test_match_path_drops_query_and_segment_parameters() -> None:
    assert match_path(b"/admin;jsessionid=1/x?y") == "/admin/x"
    assert match_path(b"/admin?x") == "/admin"
    assert match_path(b"/a") == "/a"


@pytest.mark.parametrize(
    ("prefix", "path", "match"),
    [
        ("/admin", "/admin", True),
        ("/admin", "/admin/", True),
        ("/admin", "/admin/x", True),
        ("/admin", "/administrator", False),
        ("/admin", "/", False),
        ("/", "/anything", True),
        ("/a/b", "/a/bc", False),
    ],
)
def test_prefix_matches_whole_segments(prefix: str, path: str, match: bool) -> None:
    assert prefix_matches(prefix, path) is match


def _policy(text: str) -> Policy:
    return parse_policy_file(text, "p.yaml", "optional")


POLICY = """
allow: [{cn: user}, {cn: admin}]
routes:
  - path_prefix: /admin
    allow: [{cn: admin}]
  - path_prefix: /admin/reports
    methods: [GET]
    allow: [{cn: user}, {cn: admin}]
  - path_prefix: /public/
    allow: [{anonymous: true}, {cn: user}]
  - path_prefix: /locked
    allow: []
"""


@pytest.mark.parametrize(
    ("who", "method", "path", "status", "rule"),
    [
        (USER, "GET", "/", 200, "cn=user"),
        (USER, "GET", "/admin", 403, None),
        (USER, "GET", "/admin/x", 403, None),
        (ADMIN, "GET", "/admin/x", 200, "route * /admin: cn=admin"),
        (USER, "GET", "/administrator", 200, "cn=user"),
        (USER, "GET", "/admin/reports/q1", 200, "route GET /admin/reports: cn=user"),
        (USER, "POST", "/admin/reports/q1", 403, None),  # methods filter: /admin applies
        (None, "GET", "/public/x", 200, "route * /public: anonymous"),
        (None, "GET", "/", 401, None),
        (None, "GET", "/admin", 401, None),
        (ADMIN, "GET", "/locked/x", 403, None),
    ],
)
def test_longest_prefix_route_applies(
    who: PeerIdentity | None, method: str, path: str, status: int, rule: str | None
) -> None:
    d = decide(_policy(POLICY), who, method, path)
    assert d.status == status
    assert d.rule == rule
    if status != 200:
        assert d.reason.startswith(("route", "no allow", "client certificate"))


def test_audit_with_routes_lets_through_and_marks() -> None:
    p = _policy(POLICY + "audit: true\n")
    d = decide(p, USER, "GET", "/admin")
    assert (d.allowed, d.kind) == (True, "audit")
    assert "route * /admin" in d.reason


def test_same_prefix_methods_route_before_catch_all() -> None:
    p = _policy(
        """
routes:
  - path_prefix: /x
    allow: [{cn: admin}]
  - path_prefix: /x
    methods: [GET]
    allow: [{cn: user}]
"""
    )
    assert decide(p, USER, "GET", "/x").allowed
    assert not decide(p, USER, "POST", "/x").allowed
    assert [r.name for r in p.routes] == ["GET /x", "* /x"]
    disjoint = _policy(
        "routes: [{path_prefix: /y, methods: [GET], allow: []},"
        " {path_prefix: /y, methods: [POST], allow: [{cn: user}]}]"
    )
    assert decide(disjoint, USER, "POST", "/y").allowed
    assert not decide(disjoint, USER, "GET", "/y").allowed


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[1]", "a policy file is a mapping"),
        ("", "p.yaml: a policy file is a mapping"),
        ("allow: [", "not valid YAML"),
        ("alow: []", "p.yaml: unknown key(s) ['alow']"),
        ("{}", "no access rules"),
        ("allow: {cn: x}", "p.yaml: allow: must be a list of rules"),
        ("allow: [x]", "p.yaml: allow[0]: a rule must be a mapping"),
        ("allow: [{cn: 1}]", "p.yaml: allow[0]: cn must be a non-empty string"),
        ("audit: yes please", "p.yaml: audit: must be true or false"),
        ("routes: [x]", "p.yaml: routes[0]: a route must be a mapping"),
        ("routes: [{allow: []}]", "routes[0]: path_prefix and allow are required"),
        ("routes: [{path_prefix: /a, allow: [], x: 1}]", "routes[0]: unknown key(s) ['x']"),
        ("routes: [{path_prefix: a, allow: []}]", "routes[0].path_prefix: must be a path"),
        ("routes: [{path_prefix: '/a;b', allow: []}]", "a prefix is a plain path"),
        ("routes: [{path_prefix: /a/../b, allow: []}]", "'.' and '..' segments"),
        ("routes: [{path_prefix: /a, methods: GET, allow: []}]", "must be a non-empty list"),
        ("routes: [{path_prefix: /a, methods: [get], allow: []}]", "write 'GET'"),
        ("routes: [{path_prefix: /a, methods: ['G T'], allow: []}]", "is not an HTTP method"),
        (
            "routes: [{path_prefix: /a, allow: []}, {path_prefix: /a/, allow: []}]",
            "routes[1]: routes[0] already routes * /a",
        ),
        (
            "routes: [{path_prefix: /a, methods: [GET, PUT], allow: []},"
            " {path_prefix: /a, methods: [PUT], allow: []}]",
            "routes[1]: routes[0] already routes PUT /a",
        ),
    ],
)
def test_policy_file_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_file(text, "p.yaml", "require")
    assert any(error in p for p in info.value.problems), info.value.problems


def test_policy_checks_against_client_auth() -> None:
    anon = Policy(routes=(Route("/a", None, (compile_rule({"anonymous": True}),)),))
    assert "anonymous rules need" in check_policy(anon, "p", "require")[0]
    cert = Policy(routes=(Route("/a", None, (compile_rule({"cn": "x"}),)),))
    assert "client-auth none" in check_policy(cert, "p", "none")[0]
    assert check_policy(cert, "p", "require") == []


def test_compile_policy_without_routes_keeps_flags() -> None:
    problems: list[str] = []
    p = compile_policy({"audit": True}, "c: policy.", problems, allow_all=True)
    assert (p.allow_all, p.audit, p.routes, problems) == (True, True, (), [])
