"""dataplane/h2lib.py: the HTTP/2 library is chosen once, by name, and a missing one is a
configuration error (exit 2), not an ImportError at the first connection."""

from __future__ import annotations

import h2.events
import jh2.events
import pytest

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.dataplane import h2lib


def test_select_swaps_every_part_and_back() -> None:
    try:
        h2lib.select("jh2")
        assert h2lib.events is jh2.events
        assert all(getattr(h2lib, p).__name__ == f"jh2.{p}" for p in h2lib.PARTS)
    finally:
        h2lib.select("h2")
    assert h2lib.events is h2.events


def test_auto_takes_jh2_when_installed() -> None:
    try:
        assert h2lib.select("auto") == "jh2"
        assert h2lib.events is jh2.events
    finally:
        h2lib.select("h2")


def test_a_library_that_is_not_installed_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not installed"):
        h2lib.select("no_such_h2_library")
    assert h2lib.events is h2.events  # unchanged
