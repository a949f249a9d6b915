"""The HTTP/2 library behind one name: python-hyper `h2` (the default, pure Python) or `jh2`
(its fork with the same API and a Rust HPACK), chosen with --h2-library. Measured (bench/NOTES.md)
jh2 costs about 30 % less CPU per gRPC call, so `auto` (the default) takes it when installed.

The HTTP/2 modules (h2conn, h2send, h2upstream) reach the library only through this module's
attributes (`h2lib.events.RequestReceived`, `h2lib.exceptions.ProtocolError`), looked up at
call time, so `select` swaps the implementation for the whole process before the first
connection. Types are h2's: jh2 keeps its classes and signatures.
"""

from __future__ import annotations

import importlib

import h2.config as config
import h2.connection as connection
import h2.errors as errors
import h2.events as events
import h2.exceptions as exceptions
import h2.settings as settings

from mtls_proxy.core.errors import ConfigError

__all__ = ["config", "connection", "errors", "events", "exceptions", "select", "settings"]
PARTS = ("config", "connection", "errors", "events", "exceptions", "settings")


def select(name: str) -> str:
    """Use library *name* (h2, jh2, or auto: jh2 when installed, else h2) from now on; the
    name chosen. ConfigError when the one asked for is not installed."""
    if name == "auto":
        try:
            return select("jh2")
        except ConfigError:
            return select("h2")
    try:
        modules = {part: importlib.import_module(f"{name}.{part}") for part in PARTS}
    except ImportError:
        raise ConfigError(
            f"--h2-library {name}: the {name} package is not installed (pip install {name})"
        ) from None
    globals().update(modules)
    return name
