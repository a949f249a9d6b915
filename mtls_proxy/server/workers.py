"""``--workers N``: N processes serving one listening port (SO_REUSEPORT), one admin listener.

The master validates everything, reserves the port, and starts N workers: the same command line
run again with ``--workers 1 --admin off --listen HOST:PORT`` and one end of a socketpair
(``MTLS_PROXY_WORKER_FD``). Each worker binds its own SO_REUSEPORT socket (the kernel spreads
connections across them) with its own event loop and upstream pool. Over the socketpair a worker
says when it is ready and answers the master's ``metrics`` question with its samples, which the
master sums, so ``/metrics`` and ``/status`` describe the whole proxy. A worker that dies is
restarted; SIGTERM is forwarded and the master exits once every worker has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from mtls_proxy.server.admin import material_status, serve_admin
from mtls_proxy.server.sockets import bind

if TYPE_CHECKING:
    from mtls_proxy.core.config import Config
    from mtls_proxy.material.tls import Material
    from mtls_proxy.server.listener import ProxyServer

logger = logging.getLogger("mtls_proxy.workers")  # a stable name: log filters outlive module paths
WORKER_FD_ENV: Final = "MTLS_PROXY_WORKER_FD"
_SUMMED_GAUGES: Final = frozenset({"mtls_proxy_connections_open"})


def reserve_port(cfg: Config) -> socket.socket:
    """Bind (without listening) to learn the port for ``:0`` and keep it reserved."""
    return bind(cfg.listen, reuse_port=True, option="--listen", listen=False)


def metric_rows(families: Iterable[Metric]) -> list[list[object]]:
    """Metric samples as JSON-able rows: [family, type, doc, sample name, labels, value]."""
    return [
        [f.name, f.type, f.documentation, s.name, s.labels, s.value]
        for f in families
        for s in f.samples
    ]


class MergedCollector(Collector):
    """The sum over workers of every sample (the maximum for gauges such as expiry times)."""

    def __init__(self) -> None:
        self.rows: list[list[object]] = []

    def collect(self) -> Iterator[Metric]:
        """Rebuild the metric families from the latest rows."""
        families: dict[str, Metric] = {}
        merged: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for name, typ, doc, sname, labels, value in self.rows:
            fam = str(name)
            if fam not in families:
                families[fam] = Metric(fam, str(doc), str(typ))
            if not isinstance(labels, dict) or not isinstance(value, int | float):
                continue  # not a row a worker wrote
            key = (fam, str(sname), tuple(sorted(labels.items())))
            if typ == "gauge" and fam not in _SUMMED_GAUGES:
                merged[key] = max(merged.get(key, value), value)
            else:
                merged[key] = merged.get(key, 0.0) + value
        for (fam, sname, labels), value in merged.items():
            families[fam].add_sample(sname, dict(labels), value)
        yield from families.values()


# -- the worker side -------------------------------------------------------------------------
async def serve_master_channel(server: ProxyServer, fd: int) -> None:
    """In a worker: report readiness, then answer ``metrics`` requests until the master goes."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b'{"ready": true}\n')
    while line := await reader.readline():
        if line.strip() == b"metrics":
            doc = {
                "rows": metric_rows(server.metrics.registry.collect()),
                "connections_open": server.connections_open,
                "last_reload": server.last_reload,
                "material": server.material_status(),
            }
            writer.write(json.dumps(doc).encode() + b"\n")
            await writer.drain()


# -- the master side -------------------------------------------------------------------------
class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.ready = False
        self.lock = asyncio.Lock()


class Master:
    """Starts and supervises the workers; serves the admin port for all of them.

    It is the admin port's target (admin.AdminTarget) for all the workers: its registry and
    connection count are the workers' merged (refresh()).
    """

    def __init__(self, cfg: Config, material: Material, argv: list[str]) -> None:
        self.cfg, self.material, self.argv = cfg, material, argv
        self.workers = [_Worker(i) for i in range(cfg.workers)]
        self.registry = CollectorRegistry()
        self.merged = MergedCollector()
        self.registry.register(self.merged)
        self.draining = False
        self.connections_open = 0
        self.last_reload: dict[str, object] | None = None
        self._material_doc: dict[str, object] | None = None
        self.port = 0
        self.stopping = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Every worker is serving and none is draining."""
        return not self.draining and all(w.ready for w in self.workers)

    async def start_worker(self, w: _Worker) -> None:
        """Start worker *w* and wait for its ready line."""
        parent_end, child_end = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "mtls_proxy",
            *self.argv,
            "--workers",
            "1",
            "--admin",
            "off",
            "--listen",
            f"{self.cfg.listen.host}:{self.port}",
        ]
        env = {**os.environ, WORKER_FD_ENV: str(child_end.fileno())}
        # fork+exec returns at once; the wait for readiness below is asynchronous.
        w.proc = subprocess.Popen(cmd, env=env, pass_fds=(child_end.fileno(),))  # noqa: ASYNC220
        child_end.close()
        w.streams = await asyncio.open_connection(sock=parent_end)
        try:
            async with asyncio.timeout(30):
                w.ready = bool(await w.streams[0].readline())
        except TimeoutError:
            w.ready = False
        if not w.ready:
            logger.error(
                "worker did not become ready", extra={"worker": w.index, "pid": w.proc.pid}
            )

    async def refresh(self) -> None:
        """Collect every worker's samples (a worker that does not answer in 2 s is skipped)."""
        rows: list[list[object]] = []
        open_conns = 0
        reloads: list[dict[str, object]] = []
        for w in self.workers:
            if not w.ready or w.streams is None:
                continue
            reader, writer = w.streams
            async with w.lock:
                try:
                    writer.write(b"metrics\n")
                    async with asyncio.timeout(2):
                        doc = json.loads(await reader.readline())
                except (TimeoutError, OSError, ValueError):
                    continue
            rows.extend(doc["rows"])
            open_conns += int(doc["connections_open"])
            if doc.get("last_reload"):
                reloads.append({**doc["last_reload"], "material": doc["material"]})
        self.merged.rows = rows
        self.connections_open = open_conns
        if reloads:
            # Every worker reloads the same files; the most recent attempt speaks for all
            # (on a tie, a failure: fail loud).
            latest = max(reloads, key=lambda r: (str(r["at"]), not r["ok"]))
            material = latest.pop("material")
            self._material_doc = material if isinstance(material, dict) else None
            self.last_reload = latest

    def material_status(self) -> dict[str, object]:
        """What the workers serve (after a reload), else what the master validated."""
        return self._material_doc or material_status(self.material)

    def forward_hup(self) -> None:
        """SIGHUP: every worker reloads (each validates and swaps on its own)."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    async def supervise(self) -> None:
        """Restart workers that exit while the proxy is not stopping."""
        while not self.stopping.is_set():
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and not self.draining:
                    code = w.proc.returncode
                    logger.error(
                        "worker exited; restarting",
                        extra={
                            "worker": w.index,
                            "pid": w.proc.pid,
                            "exit_code": code if code >= 0 else None,
                            "signal": _signal_name(-code) if code < 0 else None,
                        },
                    )
                    w.ready = False
                    await self.start_worker(w)
                    logger.info(
                        "worker restarted",
                        extra={"worker": w.index, "pid": w.proc.pid, "ready": w.ready},
                    )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.stopping.wait()


def _signal_name(number: int) -> str:
    """SIGKILL for 9; the number itself for a signal without a name (a real-time one)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


async def run_master(cfg: Config, material: Material, argv: list[str]) -> int:
    """Run ``--workers N``: start and supervise the workers, serve admin, drain on SIGTERM."""
    master = Master(cfg, material, argv)
    reserved = reserve_port(cfg)
    # Both ports are bound before any worker starts: a port in use is an error naming its
    # option, with no worker left behind holding our stderr.
    try:
        admin_sock = bind(cfg.admin, backlog=128, option="--admin") if cfg.admin else None
    except OSError:
        reserved.close()
        raise
    master.port = reserved.getsockname()[1]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, master.forward_hup)
    await asyncio.gather(*(master.start_worker(w) for w in master.workers))
    runner, admin_address = None, None
    if admin_sock is not None:
        runner, admin_address = await serve_admin(master, admin_sock)
    logger.info(
        "ready",
        extra={
            "listen": f"{cfg.listen.host}:{master.port}",
            "admin": admin_address,
            "upstream": cfg.upstream.url,
            "workers": [w.proc.pid for w in master.workers if w.proc],
        },
    )
    await master.supervise()
    master.draining = True
    for w in master.workers:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + cfg.shutdown_grace + 5
    for w in master.workers:
        if w.proc is None:
            continue
        while w.proc.poll() is None and time.monotonic() < end:  # noqa: ASYNC110 -- shutdown only
            await asyncio.sleep(0.05)
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
    if runner is not None:
        await runner.cleanup()
    reserved.close()
    logger.info("stopped")
    return 0
