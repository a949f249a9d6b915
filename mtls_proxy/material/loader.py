"""Reading material files (keys, certificates, CA bundles, CRLs, keystores, the policy file),
and running the loads of a reload off the event loop under a deadline.

Rules:
1. Only regular files are read. Symlinks are followed (Kubernetes mounts secrets through
   ``..data`` links), but a FIFO, a device (/dev/zero), a socket or a directory is refused. The
   check that counts is made on the opened descriptor (fstat), so the path cannot be swapped
   after it, and the open does not block, so a FIFO without a writer cannot hang it.
2. Each kind of file has a size cap (SIZE_LIMITS). A larger file is refused by its size before
   any read; one whose size the kernel reports as 0 (/proc) is read up to one chunk past the
   cap, never further.
3. The loads of a reload run in daemon threads under a deadline (DetachedLoads): a read that
   never returns (a hung network mount) fails that reload, and neither the next reload nor the
   process's exit waits for it.
4. A failure raises ConfigError naming the option, the file and the reason, never the content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from cryptography import x509

from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.identity import rfc2253
from mtls_proxy.core.keys import CRL_PEM
from mtls_proxy.core.policyspec import parse_policy_file

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from mtls_proxy.core.config import Config
    from mtls_proxy.core.policy import Policy

T = TypeVar("T")
MIB: Final = 1024 * 1024
# Bundles of every public CA are ~250 KB, a large CRL a few MB; keys and chains are KBs.
SIZE_LIMITS: Final = {
    "policy": 1 * MIB,
    "config": 1 * MIB,
    "CA bundle": 16 * MIB,
    "CRL": 16 * MIB,
    "truststore": 16 * MIB,
    "certificate": 1 * MIB,
    "private key": 1 * MIB,
    "keystore": 1 * MIB,
    "password": 64 * 1024,
}
DEFAULT_LIMIT: Final = 1 * MIB
# Whole chunks: some /proc files refuse a read of a length not a multiple of their record
# (pagemap: 8 bytes), so the read past the cap is a full chunk rather than one byte.
_CHUNK: Final = 64 * 1024
# O_NONBLOCK: opening a FIFO for reading would wait for a writer. O_NOCTTY: a terminal device
# must not become our controlling terminal before fstat refuses it.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOT_FILES: Final = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int, path: str, key: str, what: str) -> ConfigError | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return ConfigError(f"{key}: {path}: is a directory, expected a {what} file")
    kind = next((name for test, name in _NOT_FILES if test(mode)), "not a file")
    return ConfigError(f"{key}: {path}: is {kind}, not a regular file")


def _too_large(path: str, key: str, what: str, limit: int) -> ConfigError:
    size = f"{limit // MIB} MiB" if limit % MIB == 0 else f"{limit // 1024} KiB"
    return ConfigError(f"{key}: {path}: larger than the {size} limit for a {what} file")


def _open(path: str, key: str, what: str) -> int:
    try:
        # A first look by path, so that a device is not even opened (opening some has side
        # effects); the fstat in read_file is the check that counts (rule 1).
        refused = _not_regular(Path(path).stat().st_mode, path, key, what)
        if refused is not None:
            raise refused
        return os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path}: file not found") from None
    except PermissionError:
        raise ConfigError(f"{key}: {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read ({exc.strerror})") from None


def read_file(path: str | None, key: str, what: str) -> bytes:
    """The bytes of the regular file *path*, at most its kind's size cap (rules 1, 2);
    ConfigError naming *key* otherwise. *what* is the kind: "policy", "CA bundle", "CRL", ..."""
    if path is None:
        raise ConfigError(f"{key}: no {what} file given")
    limit = SIZE_LIMITS.get(what, DEFAULT_LIMIT)
    fd = _open(path, key, what)
    try:
        st = os.fstat(fd)
        refused = _not_regular(st.st_mode, path, key, what)
        if refused is not None:
            raise refused
        if st.st_size > limit:
            raise _too_large(path, key, what, limit)
        chunks, total = [], 0
        while total <= limit:  # a read past the cap tells "too large" from "exactly the cap"
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if total > limit:
        raise _too_large(path, key, what, limit)
    return b"".join(chunks)


def read_text(path: str | None, key: str, what: str) -> str:
    """read_file() decoded as UTF-8 (a policy or config file)."""
    data = read_file(path, key, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path}: not UTF-8 text") from None


@dataclass(slots=True)
class _Load:
    done: bool = False
    abandoned: bool = False


class DetachedLoads:
    """Blocking loads in daemon threads, awaited up to *timeout* (rule 3).

    asyncio.to_thread would use the loop's default executor, which asyncio.run() joins at exit:
    one read that never returns would hold SIGTERM forever. A load past its deadline is
    abandoned (its result dropped when it ever comes) and counted in ``stuck``; at *max_stuck*,
    no new load starts, so a hung mount cannot pile up threads."""

    def __init__(self, timeout: float, max_stuck: int = 4) -> None:
        self.timeout = timeout
        self.max_stuck = max_stuck
        self._lock = threading.Lock()
        self._stuck = 0

    @property
    def stuck(self) -> int:
        """Loads past their deadline whose threads have not returned yet."""
        with self._lock:
            return self._stuck

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() in a daemon thread; ConfigError when it takes longer than the deadline."""
        stuck = self.stuck
        if stuck >= self.max_stuck:
            raise ConfigError(
                f"{stuck} earlier reloads are still stuck reading files; not starting another"
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        load = _Load()

        def deliver(value: T) -> None:
            if not fut.done():  # cancelled at the deadline or at shutdown: nobody waits
                fut.set_result(value)

        def fail(exc: BaseException) -> None:
            if not fut.done():
                fut.set_exception(exc)

        def finish(then: Callable[[], None]) -> None:
            with self._lock:
                load.done = True
                if load.abandoned:
                    self._stuck -= 1
                    return
            with contextlib.suppress(RuntimeError):  # a closed loop: the process is exiting
                loop.call_soon_threadsafe(then)

        def work() -> None:
            try:
                value = fn()
            except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting task
                finish(functools.partial(fail, exc))
            else:
                finish(functools.partial(deliver, value))

        threading.Thread(target=work, name="mtls-proxy-load", daemon=True).start()
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            with self._lock:
                if not load.done:
                    load.abandoned = True
                    self._stuck += 1
            raise ConfigError(
                f"reading the files took longer than {self.timeout:g} s (a hung mount or a "
                "blocking file?); abandoned, still serving the previous material"
            ) from None


def parse_crls(
    data: bytes, path: str, key: str, cas: Sequence[x509.Certificate]
) -> tuple[x509.CertificateRevocationList, ...]:
    """PEM CRLs (any number, or one DER CRL). A CRL issued by a trusted CA must carry that CA's
    signature; CRLs of intermediates are checked by OpenSSL against the client's chain."""
    blocks = CRL_PEM.findall(data)
    crls = []
    try:
        if blocks:
            crls = [x509.load_pem_x509_crl(b) for b in blocks]
        elif data.strip():
            crls = [x509.load_der_x509_crl(data)]
    except ValueError:
        raise ConfigError(
            f"{key}: {path}: a CRL cannot be parsed (truncated or not a CRL)"
        ) from None
    if not crls:
        raise ConfigError(
            f"{key}: {path}: no CRL found (expected '-----BEGIN X509 CRL-----' blocks)"
        )
    for crl in crls:
        issuers = [c for c in cas if c.subject == crl.issuer]
        if issuers and not any(crl.is_signature_valid(c.public_key()) for c in issuers):  # type: ignore[arg-type]  # CA keys sign
            raise ConfigError(
                f"{key}: {path}: the CRL of {rfc2253(crl.issuer)} is not signed by that "
                "trusted CA's key"
            )
    return tuple(crls)


def load_policy(cfg: Config) -> Policy:
    """The policy in effect: the --policy file when given (read now), else the config's."""
    if cfg.policy_file is None:
        return cfg.policy
    text = read_text(cfg.policy_file, cfg.source("policy"), "policy")
    return parse_policy_file(text, cfg.policy_file, cfg.tls.client_auth)
