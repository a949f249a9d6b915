"""PURE. The environment as the options see it: which ``MTLS_PROXY_*`` variables no option reads
(a typo would otherwise leave a default in force silently)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Final

from mtls_proxy.core.options import CLIENT_ENV_PREFIX, ENV_PREFIX, OPTIONS, Opt

# Read by the CLI and the worker processes rather than an option: known, never warned about.
_OTHER_ENV: Final = frozenset({"MTLS_PROXY_CONFIG", "MTLS_PROXY_WORKER_FD"})


def unknown_env(
    env: Mapping[str, str], options: tuple[Opt, ...] = OPTIONS, prefix: str = ENV_PREFIX
) -> list[str]:
    """One warning per *prefix* variable that no option in *options* reads (a typo would
    otherwise leave the default in force silently). Warnings, not errors: a variable meant for
    another version of the proxy must not stop this one. serve leaves ``MTLS_PROXY_CLIENT_*``
    to `client` (core/egress.py), which checks its own."""
    known = {o.env for o in options} | _OTHER_ENV
    # Matched without the shared prefix, which would make every name look close to every other.
    suffixes = {k.removeprefix(prefix) for k in known if k.startswith(prefix)}
    warnings = []
    for name in sorted(env):
        if not name.startswith(prefix) or name in known:
            continue
        if prefix == ENV_PREFIX and name.startswith(CLIENT_ENV_PREFIX):
            continue
        close = difflib.get_close_matches(name.removeprefix(prefix), sorted(suffixes), n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        warnings.append(f"{name}: unknown environment variable, ignored{hint}")
    return warnings
