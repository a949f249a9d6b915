"""The package layout is the architecture (docs/architecture.md): each layer imports only from
the layers below it, and no module imports itself back through others, counting imports inside
functions and under TYPE_CHECKING too (they are how a cycle hides)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "mtls_proxy"
# Lowest first: a layer may import its own and the layers before it.
LAYERS = ("core", "http1", "http2", "telemetry", "material", "dataplane", "server", "cli")
MAX_MODULE_LINES = 450  # "around 400": a module past this wants splitting, not an exception
MAX_FUNCTION_LINES = 65  # "around 60": the two at 63-65 are declarations and a demo script


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    """Every mtls_proxy module *path* imports, wherever the import statement stands."""
    found: set[str] = set()
    modules = _modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "mtls_proxy":
                continue
            for alias in node.names:  # "from mtls_proxy.core import config" names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mtls_proxy."))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer() -> None:
    loose = [
        m
        for m in _modules()
        if _layer(m) is None
        and m not in ("mtls_proxy", "mtls_proxy.__main__")
        and not m.endswith(".__init__")
    ]
    assert loose == []


def test_nothing_imports_upward() -> None:
    upward = []
    for module, path in _modules().items():
        mine = _layer(module)
        for dep in _imports(path):
            theirs = _layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {dep}")
    assert upward == []


def test_no_import_cycles() -> None:
    graph = {m: {d for d in _imports(p) if d != m} for m, p in _modules().items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_modules_and_functions_stay_small() -> None:
    big_modules = [
        (m, n)
        for m, p in _modules().items()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    long_functions = [
        (f"{m}.{node.name}", node.end_lineno - node.lineno + 1)
        for m, p in _modules().items()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert big_modules == []
    assert long_functions == []


def test_the_pure_layers_bring_no_io_with_them() -> None:
    """Every module of core, http1 and http2, imported in a fresh interpreter, pulls in no I/O
    framework and nothing from the layers above (docs/design.md, Pure core)."""
    pure = sorted(m for m in _modules() if _layer(m) in (0, 1, 2) and not m.endswith("__init__"))
    code = (
        f"import sys; import {', '.join(pure)}; "
        "bad = [m for m in sys.modules if m in ('aiohttp', 'asyncio', 'ssl', 'httptools', "
        "'uvloop') or (m.startswith('mtls_proxy.') and m.split('.')[1] not in "
        "('core', 'http1', 'http2'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert len(pure) > 15 and r.returncode == 0, r.stdout + r.stderr
