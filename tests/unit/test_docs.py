"""docs/ cannot drift silently: every option and every metric the code defines is documented."""

from __future__ import annotations

import re
from pathlib import Path

from mtls_proxy.core.config import OPTIONS
from mtls_proxy.core.egress import CLIENT_OPTIONS
from mtls_proxy.telemetry.egress import ClientMetrics
from mtls_proxy.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _mentions(text: str, word: str) -> bool:
    """*word* appears on its own: ``--allow-o`` is not found inside ``--allow-ou``."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _exposed_names(metrics: Metrics | ClientMetrics | None = None) -> list[str]:
    """The names a scrape shows: counters with their ``_total`` suffix."""
    names = []
    for family in (metrics or Metrics()).registry.collect():
        names.append(family.name + "_total" if family.type == "counter" else family.name)
    return names


def _cli_md() -> str:
    """docs/cli.md up to its "Planned, not implemented" section: an option the code has must be
    documented as present, not only listed among the plans."""
    text = (DOCS / "cli.md").read_text()
    return text.split("\n## Planned", 1)[0]


def test_cli_md_names_every_option() -> None:
    text = _cli_md()
    missing = [f"--{o.name}" for o in OPTIONS if not _mentions(text, f"--{o.name}")]
    assert not missing, f"docs/cli.md does not document {missing}"


def test_cli_md_names_every_environment_variable() -> None:
    text = _cli_md()
    missing = [o.env for o in OPTIONS if not _mentions(text, o.env)]
    assert not missing, f"docs/cli.md does not document {missing}"


def test_metrics_md_names_every_metric() -> None:
    text = (DOCS / "metrics.md").read_text()
    names = _exposed_names()
    assert len(names) > 10  # the registry really was read
    missing = [n for n in names if not _mentions(text, n)]
    assert not missing, f"docs/metrics.md does not mention {missing}"


def test_egress_md_names_every_client_option_and_variable() -> None:
    text = (DOCS / "egress.md").read_text()
    missing = [f"--{o.name}" for o in CLIENT_OPTIONS if not _mentions(text, f"--{o.name}")]
    missing += [o.env for o in CLIENT_OPTIONS if not _mentions(text, o.env)]
    assert not missing, f"docs/egress.md does not document {missing}"


def test_metrics_md_names_every_client_metric() -> None:
    text = (DOCS / "metrics.md").read_text()
    names = _exposed_names(ClientMetrics())
    assert len(names) > 5
    missing = [n for n in names if not _mentions(text, n)]
    assert not missing, f"docs/metrics.md does not mention {missing}"


def test_docs_link_to_files_that_exist() -> None:
    """Relative links between the docs and into the repository resolve (README.md and the
    deploy/ READMEs too)."""
    broken = []
    pages = [*DOCS.glob("*.md"), ROOT / "README.md", *(ROOT / "deploy").rglob("README.md")]
    for page in sorted(pages):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, f"broken links: {broken}"


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _links(text: str) -> set[str]:
    return set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text))


def test_readme_deploy_links_the_deployment_files() -> None:
    """README "Deploy" links the Dockerfile, every kustomization and the systemd files;
    "Operating it" links the monitoring files and the unit whose rotation differs."""
    deploy = _links(_readme_section("Deploy"))
    wanted = {"Dockerfile", "deploy/monitoring/README.md"}
    wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / "deploy/systemd").iterdir()}
    wanted |= {
        str(p.relative_to(ROOT)) for p in (ROOT / "deploy/kubernetes").rglob("kustomization.yaml")
    }
    assert wanted - deploy == set()
    operating = _links(_readme_section("Operating it"))
    assert {
        "deploy/monitoring/README.md",
        "deploy/kubernetes/monitoring/kustomization.yaml",
        "deploy/systemd/mtls-proxy.service",
    } - operating == set()
