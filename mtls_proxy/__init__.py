"""mtls-proxy: an mTLS-terminating reverse proxy / sidecar."""

from __future__ import annotations

__version__ = "0.1.0"
