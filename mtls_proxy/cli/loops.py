"""The event loop the proxy runs on: uvloop by default, asyncio as the fallback or on request
(``--loop``). Shared by ``serve`` (main.py) and ``demo`` (demo.py), neither of which imports the
other."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from mtls_proxy.core.errors import ConfigError

logger = logging.getLogger("mtls_proxy")


def run_async(main: Callable[[], Coroutine[Any, Any, int]], loop: str = "auto") -> int:
    """Run *main* on uvloop (default) or asyncio, falling back with a log line."""
    factory = None
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if loop == "uvloop":
                raise ConfigError("--loop uvloop: uvloop is not installed") from None
            logger.info("uvloop is not available; using the asyncio event loop")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
