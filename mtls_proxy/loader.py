"""Reading the reloadable files that are not keys or certificates: CRLs and the policy file.

Same rules as tls.py: everything is parsed and validated before use, and a failure raises
ConfigError naming the option, the file and the reason, never the file's content.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509

from mtls_proxy.errors import ConfigError
from mtls_proxy.identity import rfc2253
from mtls_proxy.policyspec import parse_policy_file

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mtls_proxy.config import Config
    from mtls_proxy.policy import Policy

_CRL_PEM: Final = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def read_file(path: str | None, key: str, what: str) -> bytes:
    """The bytes of *path*; ConfigError naming *key* when it can't be read."""
    if path is None:
        raise ConfigError(f"{key}: no {what} file given")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path}: is a directory, expected a {what} file") from None
    except PermissionError:
        raise ConfigError(f"{key}: {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read ({exc.strerror})") from None


def parse_crls(
    data: bytes, path: str, key: str, cas: Sequence[x509.Certificate]
) -> tuple[x509.CertificateRevocationList, ...]:
    """PEM CRLs (any number, or one DER CRL). A CRL issued by a trusted CA must carry that CA's
    signature; CRLs of intermediates are checked by OpenSSL against the client's chain."""
    blocks = _CRL_PEM.findall(data)
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
    key = cfg.source("policy")
    data = read_file(cfg.policy_file, key, "policy")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {cfg.policy_file}: not UTF-8 text") from None
    return parse_policy_file(text, cfg.policy_file, cfg.tls.client_auth)
