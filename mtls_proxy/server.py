"""Lifecycle: listeners, the accept loop under the connection cap, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import resource
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from mtls_proxy import __version__, handshakes
from mtls_proxy.admin import material_status, rfc3339, serve_admin
from mtls_proxy.admission import Refused, admit
from mtls_proxy.errors import ConfigError
from mtls_proxy.generation import Generation, build
from mtls_proxy.http1 import Http1Connection
from mtls_proxy.identity import rfc2253
from mtls_proxy.loader import DetachedLoads, load_policy
from mtls_proxy.logs import AccessLog, RateLimiter
from mtls_proxy.metrics import Metrics
from mtls_proxy.plane import DataPlane
from mtls_proxy.sockets import bind
from mtls_proxy.tls import (
    CERT_DIR_NAMES,
    Material,
    classify_handshake_error,
    load_material,
    openssl_checks_crls,
    upstream_context,
)
from mtls_proxy.tlsconn import TLSServerLayer
from mtls_proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    import ssl as ssl_

    from prometheus_client import CollectorRegistry

    from mtls_proxy.config import Config
    from mtls_proxy.policy import Policy

logger = logging.getLogger(__name__)
SWEEP_INTERVAL: Final = 0.25
# A reload reads a few small local files in milliseconds: one still reading after 10 s is on a
# hung mount (or a file that blocks), and is abandoned and counted as failed (loader.py rule 3).
RELOAD_TIMEOUT: Final = 10.0


def raise_fd_limit(max_connections: int) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one: each client may cost two descriptors
    (itself and an upstream connection), and the default soft limit (1024) is far below the
    default --max-connections (nginx's worker_rlimit_nofile does the same)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections * 2 + 256
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < max_connections + 256:  # not even one descriptor per client
            logger.warning(
                "open-file limit %d is below what --max-connections %d may need (%d)",
                new,
                max_connections,
                want,
            )


def _material_key(material: Material) -> tuple[object, ...]:
    der = serialization.Encoding.DER
    return (tuple(c.public_bytes(der) for c in material.chain), *_trust_key(material))


def _trust_key(material: Material) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    der = serialization.Encoding.DER
    return (
        tuple(c.public_bytes(der) for c in material.ca_certs),
        tuple(c.public_bytes(der) for c in material.crls),
    )


class ProxyServer:
    """One proxy process: the mTLS listener, the admin listener and their shared state."""

    def __init__(
        self,
        cfg: Config,
        material: Material,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        policy: Policy | None = None,
    ) -> None:
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.metrics = metrics or Metrics()
        pool = UpstreamPool(
            cfg.upstream,
            cfg.upstream_timeout,
            ssl_context=upstream_context(cfg.upstream_cacert)
            if cfg.upstream.scheme == "https"
            else None,
        )
        loop = asyncio.get_running_loop()
        access = AccessLog(cfg.log_format) if cfg.access_log else None
        gen = build(cfg, material, policy if policy is not None else load_policy(cfg))
        self.plane = DataPlane(cfg, gen, self.metrics, pool, loop.time, access)
        self._watch_stop = threading.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeps = 0
        # --reload-interval: compare the files' stamps every so many sweeps.
        self._poll_every = (
            max(1, round(cfg.reload_interval / SWEEP_INTERVAL)) if (cfg.reload_interval > 0) else 0
        )
        self._stamp = self._material_stamp()
        self.last_reload: dict[str, object] | None = None
        self.listening = False
        self._hup_early = False  # SIGHUP before the listener was up (run())
        self.sock: socket.socket | None = None
        self.admin_runner: web.AppRunner | None = None
        self.admin_address: str | None = None
        # One slot per connection (--max-connections), held from accept until its socket closes.
        self._connection_slots = asyncio.Semaphore(cfg.max_connections)
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self._crl_stale_logged = False
        self._expiry_metrics(material)
        self._reloading = self._reload_again = False
        self._loads = DetachedLoads(RELOAD_TIMEOUT)
        self._reload_failures = 0
        self._handshake_log = RateLimiter(10)

    @property
    def gen(self) -> Generation:
        """The generation new connections are accepted under (generation.py)."""
        return self.plane.gen

    @property
    def material(self) -> Material:
        """The material in effect."""
        return self.plane.gen.material

    def _expiry_metrics(self, material: Material) -> None:
        m = self.metrics.not_after
        m.labels(cert="server").set(material.not_after.timestamp())
        if material.ca_not_after is not None:
            m.labels(cert="ca").set(material.ca_not_after.timestamp())
        nu = material.crl_next_update
        if nu is not None:
            m.labels(cert="crl").set(nu.timestamp())
            if material.crls_expired():
                self._crl_expired_warning(material)

    def _crl_expired_warning(self, material: Material) -> None:
        self._crl_stale_logged = True
        nu = material.crl_next_update
        now = dt.datetime.now(dt.UTC)
        stale = sorted(
            {
                rfc2253(c.issuer)
                for c in material.crls
                if c.next_update_utc is not None and c.next_update_utc <= now
            }
        )
        rule = self.cfg.tls.crl_expired
        logger.warning(
            "a CRL is past its nextUpdate; "
            + (
                "clients of its CA fail the handshake until a fresh CRL is loaded"
                if rule == "reject"
                else "still enforcing its revocations (--crl-expired allow); this relaxes only "
                "its own CA: a CA without any CRL still fails closed"
            ),
            extra={
                "crl": self.cfg.tls.crl,
                "next_update": rfc3339(nu) if nu else None,
                "stale_issuers": stale,
            },
        )

    def _check_crl_expiry(self) -> None:
        """Time passes without a reload: a CRL can go stale while loaded (the generation's
        context then gives OpenSSL the CRLs no longer, and its revocation view takes over)."""
        gen = self.plane.gen
        if openssl_checks_crls(self.cfg, gen.material) != gen.openssl_crls:
            self.plane.gen = gen.with_fresh_context(self.cfg)
        if self.material.crls_expired() and not self._crl_stale_logged:
            self._crl_stale_logged = True
            self._crl_expired_warning(self.material)

    async def reload(self) -> bool:
        """SIGHUP: load and validate everything again, then swap; keep the old on any error.

        Each accepted connection is wrapped with the context current at accept time, so new
        handshakes use the new certificate and trust at once, while established connections
        keep theirs. A new context also brings new session-ticket keys: sessions issued under
        the old trust cannot be resumed (docs/design.md, Reload and TLS sessions; TLS-037/038).

        A request that arrives while a reload runs is not dropped: the files may have changed
        again (a key written just after its certificate), so one more reload follows.
        """
        if self._reloading:
            self._reload_again = True
            return False
        self._reloading = True
        try:
            while True:
                self._reload_again = False
                ok = await self._reload_once()
                if not self._reload_again:
                    return ok
        finally:
            self._reloading = False

    def _load_files(self) -> tuple[Material, Policy]:
        """Everything a reload reads (blocking: runs in a DetachedLoads thread)."""
        return load_material(self.cfg.tls, dict(self.cfg.sources)), load_policy(self.cfg)

    async def _reload_once(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        try:
            # Off the loop, under RELOAD_TIMEOUT, in a daemon thread: a read that never returns
            # fails this reload only; the next one and SIGTERM do not wait for it.
            material, policy = await self._loads.run(self._load_files)
            # Unchanged certificates and trust (a policy edit, a touch): keep the context, and
            # with it the TLS sessions; any change at all gets a fresh one (TLS-037/038).
            old = self.plane.gen
            same = _material_key(material) == _material_key(old.material)
            gen = build(self.cfg, material, policy, context=old.context if same else None)
        except (ConfigError, OSError, ValueError) as exc:
            error = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            return self._reload_failed(now, error)
        except Exception as exc:
            # A MemoryError, a RecursionError, a bug: still a failed reload that keeps the old
            # material and shows in /status and the metrics, not a task that dies in silence.
            logger.error("reload raised", exc_info=exc)
            return self._reload_failed(now, f"unexpected {type(exc).__name__} (see the log)")
        # One swap: every new handshake from here on uses the new context (fresh ticket keys
        # and session cache: no session from before can resume), every next request the new
        # policy (generation.py).
        self.plane.gen = gen
        self._crl_stale_logged = False
        self._expiry_metrics(material)
        if _trust_key(old.material) != _trust_key(material):
            self._recheck_open_connections(gen)
        self.last_reload = {
            "at": rfc3339(now),
            "ok": True,
            "error": None,
            "failures": self._reload_failures,
        }
        self.metrics.reloads.labels(result="success").inc()
        self.metrics.last_reload.set(now.timestamp())
        logger.info(
            "reloaded",
            extra={
                "server_cert_sha256": material.server_sha256,
                "trusted_cas": len(material.ca_certs),
            },
        )
        return True

    def _reload_failed(self, now: dt.datetime, error: str) -> bool:
        self._reload_failures += 1
        self.last_reload = {
            "at": rfc3339(now),
            "ok": False,
            "error": error,
            "failures": self._reload_failures,
        }
        self.metrics.reloads.labels(result="failure").inc()
        logger.error("reload failed; still serving the previous material", extra={"error": error})
        return False

    def _recheck_open_connections(self, gen: Generation) -> None:
        """Trust changed: a client that the new CAs or CRLs refuse loses its open connections
        now (docs/security.md, RLD-07, RLD-10; revocation.py)."""
        for conn in list(self.plane.connections):
            chain = conn.verified_chain()
            reason = "unknown_ca" if chain is None else gen.trust.refuses(chain)
            if reason is not None:
                self.metrics.connections_cut.labels(reason=reason).inc()
                logger.warning(
                    "closing a connection: the reloaded trust refuses its client",
                    extra={
                        "reason": reason,
                        "peer": conn.peer.subject if conn.peer else None,
                        "peer_sha256": conn.peer.sha256 if conn.peer else None,
                    },
                )
                conn.cut()

    async def refresh(self) -> None:
        """Nothing to gather: one process holds all its state (see workers.Master)."""

    def material_status(self) -> dict[str, object]:
        """The /status fields of the material in effect."""
        return material_status(self.material)

    @property
    def ready(self) -> bool:
        """Listening with valid material and not draining."""
        return self.listening and not self.plane.draining

    @property
    def draining(self) -> bool:
        """SIGTERM came: finishing what is in flight (admin.AdminTarget)."""
        return self.plane.draining

    @property
    def connections_open(self) -> int:
        """Client connections past their handshake (admin.AdminTarget)."""
        return len(self.plane.connections)

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry the admin port exposes (admin.AdminTarget)."""
        return self.metrics.registry

    @property
    def address(self) -> tuple[str, int]:
        """The bound listener address (useful with port 0)."""
        assert self.sock is not None  # noqa: S101 -- only called after start()
        host, port = self.sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind both listeners and start accepting."""
        if self.cfg.admin is not None:
            admin_sock = bind(self.cfg.admin, backlog=128, option="--admin")  # port 0 works
            self.admin_runner, self.admin_address = await serve_admin(self, admin_sock)
        raise_fd_limit(self.cfg.max_connections)
        self.sock = bind(self.cfg.listen, reuse_port=self.reuse_port, option="--listen")
        self.listening = True
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        self._start_watching()
        self._sweep()
        # Everything loaded so far (aiohttp, cryptography, config) lives for the whole process:
        # move it out of the collector's view so that full collections stay short (p99).
        gc.collect()
        gc.freeze()
        self.started.set()
        host, port = self.address
        # One "ready" line per proxy (docs/cli.md, Signals): a worker's says "worker ready".
        logger.info(
            "worker ready" if self.reuse_port else "ready",
            extra={
                "listen": f"{host}:{port}",
                "admin": self.admin_address,
                "upstream": self.cfg.upstream.url,
                "version": __version__,
                "server_cert_sha256": self.material.server_sha256,
            },
        )

    def _watched_paths(self) -> list[Path]:
        t = self.cfg.tls
        files = (t.cert, t.key, t.cacert, t.keystore, t.truststore, t.crl, self.cfg.policy_file)
        paths = [Path(p) for p in files if p]
        if t.cert_dir:
            paths += [Path(t.cert_dir) / n for n in CERT_DIR_NAMES]
        return paths

    def _material_stamp(self) -> tuple[tuple[str, int, int, int], ...]:
        """(path, inode, mtime, size) of every reloadable file, following symlinks (Kubernetes
        swaps a secret mount's ``..data`` link, so the files' identity changes)."""
        paths = self._watched_paths()
        stamp = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            stamp.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _poll_material(self, why: str = "poll") -> None:
        stamp = self._material_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            logger.info("reloadable files changed; reloading", extra={"trigger": why})
            asyncio.get_running_loop().create_task(self.reload())

    def _start_watching(self) -> None:
        """inotify on the directories that hold the files (a file watch would follow an inode
        that Kubernetes deletes after swapping ``..data``, and the swap itself is a rename in the
        mount directory): any event there compares the stamps again, so unrelated events and
        touch-only writes reload nothing. Not recursive: a file in /etc must not watch all of
        /etc. The watch runs in a daemon thread, so that it never delays the process's exit."""
        dirs = sorted({str(p.parent) for p in self._watched_paths() if p.parent.is_dir()})
        if not dirs:
            return
        loop = asyncio.get_running_loop()
        stop = self._watch_stop

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
                    loop.call_soon_threadsafe(self._poll_material, "watch")
            except RuntimeError:
                return  # the loop closed under us: the process is exiting
            except OSError as exc:  # e.g. inotify limits: SIGHUP and polling still work
                loop.call_soon_threadsafe(logger.warning, "file watching stopped: %s", exc)

        threading.Thread(target=run, name="mtls-proxy-watch", daemon=True).start()

    def _sweep(self) -> None:
        # Timeouts are deadlines checked here, 4 times a second (see http1.py rule 4).
        now = self.plane.clock()
        for conn in list(self.plane.connections):
            conn.check_deadlines(now)
        self._sweeps += 1
        if self._poll_every and self._sweeps % self._poll_every == 0:
            self._poll_material()
        if self._sweeps % 40 == 0 and self.material.crls:  # every 10 s
            self._check_crl_expiry()
        if self.cfg.tls.sessions == "cache":
            self._bound_session_cache()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def _bound_session_cache(self) -> None:
        """Keep the session cache under --tls-session-cache-size: Python cannot set OpenSSL's
        limit (20,480 sessions of about 12 KB: each holds the client's decoded certificates),
        so a full cache is replaced by a new context on the same material. Open connections
        keep theirs; their clients' next handshake is a full one."""
        gen = self.plane.gen
        held = gen.context.session_stats()["number"]
        if held > self.cfg.tls.session_cache_size:
            self.plane.gen = gen.with_fresh_context(self.cfg)
            logger.info(
                "TLS session cache full: started a new one",
                extra={"sessions": held, "limit": self.cfg.tls.session_cache_size},
            )
            held = 0
        self.metrics.session_cache.set(held)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock
        assert sock is not None  # noqa: S101 -- set by start()
        while True:
            # At the cap, stop accepting: new connections wait in the kernel backlog.
            await self._connection_slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self._connection_slots.release()
                logger.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)  # e.g. EMFILE: back off instead of spinning
                continue
            except BaseException:
                self._connection_slots.release()
                raise
            self._spawn(loop, conn)
            # Under load several connections are waiting: take them without another wakeup.
            while not self._connection_slots.locked():
                try:
                    conn, _ = sock.accept()
                except OSError:  # BlockingIOError when the backlog is empty; retried above
                    break
                await self._connection_slots.acquire()  # not locked: returns at once
                self._spawn(loop, conn)

    def _spawn(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = loop.create_task(self._handshake(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        client = "-"
        gen, plane = self.plane.gen, self.plane  # the generation this connection is accepted under
        release = self._connection_slots.release

        def admitted(sslobj: ssl_.SSLObject) -> Http1Connection:
            # After a successful handshake: who the client is, or Refused (admission.py).
            return Http1Connection(plane, admit(plane, gen, sslobj), release)

        # What the client shows (SNI, version, leaf) is captured for the log of a failure: the
        # transport's callbacks run in a copy of this task's context (handshakes.py).
        handshakes.watch(gen.context)
        handshakes.SEEN.set(seen := handshakes.Seen())
        layer: TLSServerLayer | None = None
        try:
            client = str(conn.getpeername()[0])
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Our own TLS layer (tlsconn.py), so that a refused client receives the alert.
            tls = TLSServerLayer(gen.context, admitted)
            await loop.connect_accepted_socket(lambda: tls, conn)
            layer = tls  # the transport owns the socket from here
            done, _ = await asyncio.wait((layer.handshake,), timeout=self.cfg.handshake_timeout)
            if not done:
                layer.handshake.cancel()
                layer.abort()
                raise TimeoutError("the TLS handshake took longer than --handshake-timeout")
            layer.handshake.result()  # raises the handshake's error
        except asyncio.CancelledError:  # shutdown: handshakes are not drained
            conn.close()
            if layer is not None:
                layer.handshake.cancel()
                layer.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, EOFError, Refused) as exc:
            seen.done = True
            if isinstance(exc, Refused):  # found after the handshake (strict.py, revocation.py)
                self._handshake_failed(exc.reason, client, exc.why, seen)
            else:
                self._handshake_failed(classify_handshake_error(exc), client, exc, seen)
            if layer is None:
                conn.close()
                release()
            else:  # no connection was made: the socket holds the slot until it has closed
                layer.when_lost(release)
            return
        seen.done = True
        seen.leaf = None  # the connection's context keeps *seen*: not its certificate
        self.metrics.handshake("ok")
        self.metrics.connections.inc()
        if layer.get_extra_info("ssl_object").session_reused:
            self.metrics.resumed.inc()

    def _handshake_failed(
        self, reason: str, client: str, exc: BaseException | str, seen: handshakes.Seen
    ) -> None:
        self.metrics.handshake("failed", reason)
        suppressed = self._handshake_log.allow(time.monotonic())
        if suppressed is not None:
            # OpenSSL's reason string names the check that failed, never key material.
            error = (
                exc
                if isinstance(exc, str)
                else (getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__)
            )
            logger.info(
                "handshake failed",
                extra={
                    "reason": reason,
                    "client": client,
                    "error": str(error)[:300],
                    # The SNI, TLS version and the leaf's SHA-256, subject and issuer (if the
                    # client sent one): names only, never the certificate.
                    **seen.fields(),
                    "suppressed": suppressed,
                },
            )

    def request_stop(self) -> None:
        """Ask run() to drain and return (SIGTERM/SIGINT); again while draining: logged only."""
        if self._stop.is_set():
            logger.info("already draining", extra={"grace_s": self.cfg.shutdown_grace})
        self._stop.set()

    async def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        # Handlers first: "ready" is logged inside start(), and a SIGTERM or SIGHUP sent on
        # seeing it must not meet the default action (kill).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        await self.start()
        if self._hup_early:  # a SIGHUP during start(): the files may have changed since
            self._on_hup()
        try:
            await self._stop.wait()
        finally:
            # The handlers stay while draining: a second SIGTERM or a SIGHUP must not fall back
            # to the default action (kill) in the middle of the drain (RES-26, RES-27).
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_hup(self) -> None:
        if not self.listening:
            self._hup_early = True
            return
        if self.plane.draining:
            logger.info("SIGHUP ignored: draining")
            return
        asyncio.get_running_loop().create_task(self.reload())

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight requests up to the grace period, close."""
        plane = self.plane
        plane.draining = True
        logger.info(
            "draining",
            extra={"connections": len(plane.connections), "grace_s": self.cfg.shutdown_grace},
        )
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self.sock is not None:
            self.sock.close()  # new connections are refused from here on
        self.listening = False
        for conn in list(plane.connections):
            conn.drain()
        # Handshakes in progress are cancelled, not drained (as ghostunnel does, RES-25): no
        # request has been made on them yet.
        for task in list(self._handshakes):
            task.cancel()
        deadline = time.monotonic() + self.cfg.shutdown_grace
        # A 50 ms poll during shutdown is simpler than an event per connection.
        while plane.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for conn in list(plane.connections):
            conn.abort()
        for task in list(self._handshakes):
            task.cancel()
        plane.pool.close()
        self._watch_stop.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if plane.access_log is not None:
            plane.access_log.flush()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        logger.info("stopped")
