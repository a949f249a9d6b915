"""Shared fixtures: the test PKI (once per session) and the recording upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Pki, Upstream, make_test_pki, run_upstream


@pytest.fixture(scope="session")
def tp(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with run_upstream() as up:
        yield up


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> str:
    """Integration tests run on both event loops."""
    return str(request.param)
