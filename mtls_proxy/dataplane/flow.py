"""Reading the client stops for as long as any reason to stop holds.

Several independent things pause reading one connection: the upstream is slow to take the
body, a pipelined request waits its turn, a request body is held while the upstream connection
opens, an upgrade awaits its answer, an error answer is queued. Each pauses under its own name
and resumes only its own, so that one resuming never undoes another's pause (uvicorn's
flow_control.py keeps a single flag, enough for one reason).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncio

# Most connections never pause: they share this one empty set instead of holding their own
# (an empty set is 216 bytes; 10,000 idle connections, 2 MB).
_NONE: Final[frozenset[str]] = frozenset()


class ReadGate:
    """The set of reasons a transport is not being read."""

    __slots__ = ("reasons", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reasons: set[str] | frozenset[str] = _NONE

    def pause(self, reason: str) -> None:
        """Stop reading for *reason* (idempotent)."""
        if not self.reasons:
            if self.transport is not None:
                self.transport.pause_reading()
            self.reasons = {reason}
        elif reason not in self.reasons:
            self.reasons = self.reasons | {reason}

    def resume(self, reason: str) -> None:
        """*reason* no longer holds: read again if nothing else holds."""
        reasons = self.reasons
        if reason in reasons:
            self.reasons = reasons = reasons - {reason} or _NONE
            t = self.transport
            if not reasons and t is not None and not t.is_closing():
                t.resume_reading()
