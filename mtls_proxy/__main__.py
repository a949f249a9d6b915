"""``python -m mtls_proxy`` runs the CLI."""

from __future__ import annotations

import sys

from mtls_proxy.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
