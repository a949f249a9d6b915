"""scripts/audit: the installed dependencies are past their advisory floors (DEP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

AUDIT = Path(__file__).resolve().parents[2] / "scripts" / "audit"


def test_installed_dependencies_pass_the_audit() -> None:
    r = subprocess.run([sys.executable, str(AUDIT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert "audit: PASS" in r.stdout and "aiohttp C parser   in use" in r.stdout


def test_the_audit_fails_on_the_pure_python_parser() -> None:
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    r = subprocess.run([sys.executable, str(AUDIT)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "NOT in use" in r.stdout
