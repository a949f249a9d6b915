"""Every case of the security catalogue, docs/security.md (the ids are listed in
catalogue-ids.txt) is a test somewhere under tests/, or a documented deviation."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
TESTS = HERE.parent


def _mentions() -> str:
    texts = [p.read_text() for p in TESTS.rglob("test_*.py") if p.name != "test_catalogue.py"]
    return "\n".join(texts)


def test_every_catalogue_case_is_tested_or_a_documented_deviation() -> None:
    ids = HERE.joinpath("catalogue-ids.txt").read_text().split()
    code = _mentions()
    deviations = HERE.joinpath("DEVIATIONS.md").read_text()
    missing, where = [], Counter[str]()
    for case in ids:
        prefix, num = case.split("-")
        # "SMG-015" in an id string, or "smg015" in a test name.
        pattern = re.compile(rf"(?i)(?<![a-z]){prefix}-?0*{int(num)}(?!\d)")
        if pattern.search(code):
            where[f"{prefix} tested"] += 1
        elif pattern.search(deviations):
            where[f"{prefix} deviation"] += 1
        else:
            missing.append(case)
    print(dict(sorted(where.items())))
    assert not missing, f"catalogue cases with neither a test nor a deviation: {missing}"
