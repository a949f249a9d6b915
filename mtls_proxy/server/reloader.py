"""Reloading: files -> a new Generation swapped in whole, or the old one kept and the failure
shown (log, metric, /status); file watching, polling, and the checks time makes necessary.

Rules:
1. A reload reads and validates everything off the event loop (loader.DetachedLoads, under
   RELOAD_TIMEOUT), then swaps one `Generation` (generation.py) in one assignment; any error
   keeps the old generation serving.
2. Unchanged certificates and trust keep the SSLContext and its sessions; any change brings a
   new context (no session from before can resume) and re-checks the open connections against
   the new trust (docs/design.md, Reload and TLS sessions; TLS-037/038, RLD-07/10).
3. A reload requested while one runs is not dropped: one more follows (a key written just after
   its certificate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import serialization

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import rfc2253
from mtls_proxy.core.policy import decide_route
from mtls_proxy.material.contexts import openssl_checks_crls
from mtls_proxy.material.generation import Generation, build
from mtls_proxy.material.loader import DetachedLoads, load_policy
from mtls_proxy.material.tls import CERT_DIR_NAMES, Material, load_material
from mtls_proxy.server.admin import rfc3339
from mtls_proxy.server.watch import FileWatch

if TYPE_CHECKING:
    from mtls_proxy.core.config import Config
    from mtls_proxy.core.policy import Policy
    from mtls_proxy.dataplane.plane import DataPlane
    from mtls_proxy.telemetry.metrics import Metrics

logger = logging.getLogger("mtls_proxy.server")  # a stable name: log filters outlive module paths
# A reload reads a few small local files in milliseconds: one still reading after 10 s is on a
# hung mount (or a file that blocks), and is abandoned and counted as failed (loader.py rule 3).
RELOAD_TIMEOUT: Final = 10.0


def _material_key(material: Material) -> tuple[object, ...]:
    der = serialization.Encoding.DER
    return (tuple(c.public_bytes(der) for c in material.chain), *_trust_key(material))


def _trust_key(material: Material) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    der = serialization.Encoding.DER
    return (
        tuple(c.public_bytes(der) for c in material.ca_certs),
        tuple(c.public_bytes(der) for c in material.crls),
    )


class Reloader:
    """Keeps `plane.gen` current with the files (rule 1)."""

    def __init__(self, cfg: Config, plane: DataPlane, metrics: Metrics) -> None:
        self.cfg, self.plane, self.metrics = cfg, plane, metrics
        self.last_reload: dict[str, object] | None = None  # /status
        self._watch = FileWatch(self._watched_paths, self._changed)
        self._crl_stale_logged = False
        self._reloading = self._reload_again = False
        self._loads = DetachedLoads(RELOAD_TIMEOUT)
        self._reload_failures = 0
        self._expiry_metrics(plane.gen.material)

    @property
    def material(self) -> Material:
        """The material in effect."""
        return self.plane.gen.material

    def stop(self) -> None:
        """Stop watching the files (shutdown)."""
        self._watch.stop()

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

    def check_crl_expiry(self) -> None:
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
        if self.cfg.mode == "tcp" and gen.policy is not old.policy:
            self._recheck_tcp_policy(gen)
        self._outcome(now, None)
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
        self._outcome(now, error)
        logger.error("reload failed; still serving the previous material", extra={"error": error})
        return False

    def _outcome(self, now: dt.datetime, error: str | None) -> None:
        """What /status and reloads_total say about this reload (*error*: why it failed)."""
        self.last_reload = {
            "at": rfc3339(now),
            "ok": error is None,
            "error": error,
            "failures": self._reload_failures,
        }
        self.metrics.reloads.labels(result="success" if error is None else "failure").inc()

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

    def _recheck_tcp_policy(self, gen: Generation) -> None:
        """--mode tcp: a connection has no next request to meet the new policy, so a client
        the reloaded policy no longer allows loses its open connections now (docs/tcp.md)."""
        for conn in list(self.plane.connections):
            if not decide_route(gen.policy, None, conn.peer).allowed:
                self.metrics.connections_cut.labels(reason="policy").inc()
                logger.warning(
                    "closing a connection: the reloaded policy no longer allows its client",
                    extra={
                        "peer": conn.peer.subject if conn.peer else None,
                        "peer_sha256": conn.peer.sha256 if conn.peer else None,
                    },
                )
                conn.cut()

    def _watched_paths(self) -> list[Path]:
        t = self.cfg.tls
        files = (t.cert, t.key, t.cacert, t.keystore, t.truststore, t.crl, self.cfg.policy_file)
        paths = [Path(p) for p in files if p]
        if t.cert_dir:
            paths += [Path(t.cert_dir) / n for n in CERT_DIR_NAMES]
        return paths

    def poll(self, why: str = "poll") -> None:
        """Reload when the files changed (watch.py)."""
        self._watch.poll(why)

    def start_watching(self) -> None:
        """Watch the files' directories (watch.py)."""
        self._watch.start()

    def _changed(self, why: str) -> None:
        logger.info("reloadable files changed; reloading", extra={"trigger": why})
        asyncio.get_running_loop().create_task(self.reload())

    def bound_session_cache(self) -> None:
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
