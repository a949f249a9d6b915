"""Noticing that reloadable files changed: inotify on their directories (watchfiles), and a
stamp comparison that a poll or a watch event runs. Shared by serve's and client's reloaders.

Rules:
1. A change is a different (path, inode, mtime, size) stamp, following symlinks: Kubernetes
   swaps a secret mount's ``..data`` link, so the files' identity changes; unrelated events and
   touch-only writes reload nothing.
2. The directories are watched, not the files (a file watch would follow an inode Kubernetes
   deletes after the swap, and the swap itself is a rename in the mount directory), and not
   recursively: a file in /etc must not watch all of /etc.
3. The watch runs in a daemon thread, so that it never delays the process's exit; when it
   cannot run, SIGHUP and polling still work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("mtls_proxy.server")

Stamp = tuple[tuple[str, int, int, int], ...]


class FileWatch:
    """Calls *on_change(why)* when the files *paths()* names change (rule 1)."""

    def __init__(self, paths: Callable[[], list[Path]], on_change: Callable[[str], None]) -> None:
        self._paths, self._on_change = paths, on_change
        self._stop = threading.Event()
        self._stamp = self.stamp()

    def stamp(self) -> Stamp:
        """(path, inode, mtime, size) of every file that exists."""
        out = []
        for path in self._paths():
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def poll(self, why: str = "poll") -> None:
        """Compare the stamps; call on_change when they differ."""
        stamp = self.stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self._on_change(why)

    def stop(self) -> None:
        """Stop watching (shutdown)."""
        self._stop.set()

    def start(self) -> None:
        """Watch the files' directories (rules 2, 3)."""
        dirs = sorted({str(p.parent) for p in self._paths() if p.parent.is_dir()})
        if not dirs:
            return
        loop = asyncio.get_running_loop()
        stop = self._stop

        def run() -> None:
            try:
                from watchfiles import watch
            except ImportError as exc:  # a broken install: SIGHUP and polling still work
                loop.call_soon_threadsafe(logger.warning, "file watching unavailable: %s", exc)
                return
            try:
                # Short debounce: a cert and key written together land in one batch. Timeouts
                # yield too: the stamps are then compared once a second, which covers the time
                # before the watch is armed and lost events.
                for _ in watch(
                    *dirs,
                    debounce=300,
                    step=50,
                    recursive=False,
                    stop_event=stop,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                    raise_interrupt=False,
                ):
                    loop.call_soon_threadsafe(self.poll, "watch")
            except RuntimeError:
                return  # the loop closed under us: the process is exiting
            except OSError as exc:  # e.g. inotify limits: SIGHUP and polling still work
                loop.call_soon_threadsafe(logger.warning, "file watching stopped: %s", exc)

        threading.Thread(target=run, name="mtls-proxy-watch", daemon=True).start()
