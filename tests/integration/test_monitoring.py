"""deploy/monitoring, checked: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and every metric, label and label value that the rules and the Grafana
dashboard use exists in the /metrics output of a real proxy (HTTP/2 on, a CRL, a few requests and
one connection cut by a reloaded CRL, so that every series they query is there)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtls_proxy.cli import pki
from tests.h2client import h2_client, h2_exchange
from tests.helpers import Pki, client_ctx, connect, get, read_response, run_proxy, run_upstream
from tests.integration.test_reload import wait_reload

MONITORING = Path(__file__).parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "dashboard.json"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool: .ci/run installs it"
)

# Labels Prometheus attaches to every series of a target, and the series it makes itself.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC = {"up": {label: set[str]() for label in TARGET_LABELS}}
# Labels whose values are not a fixed set: their values are not checked.
FREE_VALUES = frozenset({"version"})


# -- /metrics ----------------------------------------------------------------------------------
Exposition = dict[str, dict[str, set[str]]]  # sample name -> label -> values seen


def parse_exposition(text: str) -> Exposition:
    """Every sample name (with its _total, _bucket, _sum, _count, _created suffix) and the
    values of each of its labels."""
    out: Exposition = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
        assert m, line
        labels = out.setdefault(m[1], {})
        for name, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""):
            labels.setdefault(name, set()).add(value)
    return out


# -- PromQL references -------------------------------------------------------------------------
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)
STRING = r'"(?:[^"\\]|\\.)*"'
MATCHER = rf"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*({STRING})"
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)"


@dataclass
class Refs:
    """What one PromQL expression reads: metric names, label matchers per selector, and the
    labels of its by/without/on/ignoring/group_* clauses."""

    metrics: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str, str]] = field(
        default_factory=list
    )  # metric, label, op, value
    grouping: set[str] = field(default_factory=set)


def references(expr: str) -> Refs:
    """A deliberately simple reader: selectors `name{label op "value", ...}`, bare metric names
    (identifiers not followed by `(`, not keywords), grouping clauses. Grafana variables and
    range durations are ignored; `label_values(selector, label)` counts its label as grouping."""
    refs = Refs()
    lv = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.S)
    if lv:
        expr = lv[1]
        refs.grouping.add(lv[2])
    for m in re.finditer(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}", expr):
        name = m[1] or ""
        if name:
            refs.metrics.add(name)
        for label, op, value in re.findall(MATCHER, m[2]):
            refs.matchers.append((name, label, op, json.loads(value)))
    rest = re.sub(r"\{[^{}]*\}", " ", expr)
    rest = re.sub(STRING, " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges and subqueries: [5m], [$__rate_interval]
    for m in re.finditer(GROUPING, rest):
        refs.grouping.update(x.strip() for x in m[1].split(",") if x.strip())
    rest = re.sub(GROUPING, " ", rest)
    rest = re.sub(r"\$\{?\w+\}?", " ", rest)  # Grafana variables
    rest = re.sub(r"(?<![\w:])\d[\w.+-]*", " ", rest)  # numbers, durations (offset 1h)
    for m in re.finditer(r"([A-Za-z_:][\w:]*)(\s*\()?", rest):
        if not m[2] and m[1] not in KEYWORDS:
            refs.metrics.add(m[1])
    return refs


def problems(exposition: Exposition, expr: str) -> list[str]:
    """Why *expr* would query something a proxy does not expose (empty: nothing)."""
    known = {**exposition, **SYNTHETIC}
    refs = references(expr)
    out = [f"unknown metric {name}" for name in sorted(refs.metrics) if name not in known]
    labels_in_expr = set(TARGET_LABELS)
    for name in refs.metrics & known.keys():
        labels_in_expr |= known[name].keys()
    for name, label, op, value in refs.matchers:
        labels = known.get(name, {})
        if label in TARGET_LABELS:
            continue
        if label not in labels:
            out.append(f"{name or '{}'} has no label {label}")
            continue
        if "$" in value or op in ("!=", "!~") or label in FREE_VALUES:
            continue
        if op == "=":
            wanted = [value]
        elif re.fullmatch(r"[\w|]*", value):  # a plain alternation: each value must exist
            wanted = value.split("|")
        else:
            continue
        out += [f'{name}{{{label}="{v}"}} never appears' for v in wanted if v not in labels[label]]
    out += [f"no metric of the query has a label {g}" for g in refs.grouping - labels_in_expr]
    return out


# -- the files ---------------------------------------------------------------------------------
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows too."""
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_queries() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_queries() -> list[str]:
    return [str(rule["expr"]) for rule in alert_rules()]


def alert_test_series() -> list[str]:
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    return [s["series"] for t in tests for s in t["input_series"]]


# -- promtool ----------------------------------------------------------------------------------
@needs_promtool
def test_promtool_check_rules() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    r = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yaml"],
        capture_output=True,
        text=True,
        cwd=MONITORING,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each dashboard query, its Grafana variables replaced, as a recording rule for promtool."""
    rules = []
    for i, expr in enumerate(q for q in dashboard_queries() if "label_values(" not in q):
        expr = expr.replace("$__rate_interval", "5m")
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_every_rule_is_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
    # The list: expiry, CRL stale, reloads, handshakes, upstream, no ready instance.
    assert set(names) >= {
        "MtlsProxyCertificateExpiresSoon",
        "MtlsProxyCertificateExpiresVerySoon",
        "MtlsProxyCrlStale",
        "MtlsProxyReloadFailing",
        "MtlsProxyHandshakeFailures",
        "MtlsProxyUpstreamErrors",
        "MtlsProxyNoReadyInstance",
        "MtlsProxyH2AbuseGoaways",
    }
    # Every rule is unit-tested, firing (some exp_alerts) and not firing (an empty one).
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    cases = [case for t in tests for case in t["alert_rule_test"]]
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


def test_dashboard_is_valid_and_every_panel_has_a_query() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    shown = [p for p in panels(board) if p["type"] != "row"]
    assert len(shown) >= 10
    for p in shown:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        targets = p.get("targets")
        assert targets, f"panel {p['title']!r} has no query"
        refids = [t["refId"] for t in targets]
        assert len(refids) == len(set(refids)), p["title"]
        assert all(t["expr"].strip() for t in targets), p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
    # The list of panels, by the metrics they read.
    used = set[str]().union(*(references(q).metrics for q in dashboard_queries()))
    assert used >= {
        "mtls_proxy_requests_total",
        "mtls_proxy_request_duration_seconds_bucket",
        "mtls_proxy_handshakes_total",
        "mtls_proxy_cert_not_after_timestamp_seconds",
        "mtls_proxy_reloads_total",
        "mtls_proxy_connections_open",
        "mtls_proxy_h2_goaways_total",
    }


# -- against a real proxy ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exposition(tp: Pki, tmp_path_factory: pytest.TempPathFactory) -> Exposition:
    """/metrics of a proxy with --http2 on and a CRL, after HTTP/1.1 and HTTP/2 requests
    (allowed, denied, an upstream 5xx) and a connection cut by a CRL reloaded under it."""
    crl_dir = tmp_path_factory.mktemp("crl")
    shutil.copytree(tp.dir, crl_dir, dirs_exist_ok=True)
    crl = pki.revoke(crl_dir, "other")
    with (
        run_upstream() as up,
        run_proxy(tp, f"http://127.0.0.1:{up.port}", "--http2", "on", "--crl", str(crl)) as p,
    ):
        good = client_ctx(tp, "good")
        assert get(p.port, good)[0] == 200
        assert get(p.port, good, "/?status=503")[0] == 503
        assert get(p.port, client_ctx(tp, "quote"))[0] == 403  # its URI is not allowed
        s, conn = h2_client(p.port, client_ctx(tp, "good"))
        with s:
            head = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/h2")]
            res = h2_exchange(s, conn, {1: ([*head, (b":authority", b"localhost")], None)})
        assert res[1]["headers"][b":status"] == b"200"  # type: ignore[index]
        keep = connect(p.port, client_ctx(tp, "good"))
        keep.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(keep, bytearray())[0] == 200
        pki.revoke(crl_dir, "good")  # the watcher reloads and cuts the open connection
        wait_reload(p, 1, "success")
        text = p.admin_get("/metrics")[1]
        keep.close()
    out = parse_exposition(text)
    assert out["mtls_proxy_connections_cut_total"]["reason"] == {"revoked"}
    assert out["mtls_proxy_requests_total"]["protocol"] == {"http1", "h2"}
    return out


def test_the_checker_finds_what_does_not_exist(exposition: Exposition) -> None:
    """The check below would catch a typo: bogus names, labels and values are reported."""
    ok = 'sum by (reason) (rate(mtls_proxy_handshakes_total{result="failed"}[5m]))'
    assert problems(exposition, ok) == []
    assert references(ok).metrics == {"mtls_proxy_handshakes_total"}
    assert problems(exposition, "rate(mtls_proxy_bogus_total[5m]) > 0") == [
        "unknown metric mtls_proxy_bogus_total"
    ]
    assert problems(exposition, "mtls_proxy_connections_open > mtls_proxy_conections_open") == [
        "unknown metric mtls_proxy_conections_open"
    ]
    assert problems(exposition, 'mtls_proxy_handshakes_total{resul="failed"}') == [
        "mtls_proxy_handshakes_total has no label resul"
    ]
    assert problems(exposition, 'mtls_proxy_h2_goaways_total{reason=~"flood|reset"}') == [
        'mtls_proxy_h2_goaways_total{reason="reset"} never appears'
    ]
    assert problems(exposition, "sum by (kind) (mtls_proxy_connections_open)") == [
        "no metric of the query has a label kind"
    ]
    assert problems(exposition, "label_values(mtls_proxy_build_info, versions)") == [
        "no metric of the query has a label versions"
    ]
    # The histogram's series are checked by their sample names.
    assert problems(exposition, "rate(mtls_proxy_request_duration_seconds_bucket[5m])") == []
    assert problems(exposition, "rate(mtls_proxy_request_duration_seconds[5m])") == [
        "unknown metric mtls_proxy_request_duration_seconds"
    ]


@pytest.mark.parametrize(
    ("source", "queries"),
    [
        ("alerts.yaml", alert_queries),
        ("dashboard.json", dashboard_queries),
        ("alerts_test.yaml input_series", alert_test_series),
    ],
)
def test_every_metric_label_and_value_used_exists(
    exposition: Exposition, source: str, queries: Callable[[], list[str]]
) -> None:
    exprs = queries()
    assert exprs
    found = {f"{expr!r}: {p}" for expr in exprs for p in problems(exposition, expr)}
    assert not found, f"{source}:\n" + "\n".join(sorted(found))


def test_alert_annotations_name_real_metrics(exposition: Exposition) -> None:
    for rule in alert_rules():
        for text in rule["annotations"].values():
            for name in re.findall(r"\bmtls_proxy_\w+", text):
                assert name in exposition, f"{rule['alert']}: {name}"


def test_readme_lists_every_dashboard_panel() -> None:
    """README "Operating it" shows the dashboard's panel list: it cannot drift from the file."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "deploy/monitoring/dashboard.json").read_text()
    )
    rows: dict[str, list[str]] = {}
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            rows[row] = []
        else:
            rows[row].append(panel["title"])
    for title, panels in rows.items():
        assert f"- **{title}**: " + "; ".join(panels) in readme, title
