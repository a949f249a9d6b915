"""PURE. Listen and upstream addresses: what --listen/--admin (HOST:PORT) and --upstream (a URL
or a unix socket) may say, parsed once at startup."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Address:
    """A HOST:PORT pair (IPv6 hosts without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where requests are forwarded."""

    url: str
    scheme: Literal["http", "https", "unix", "tcp"]  # tcp: --mode tcp
    host: str = ""
    port: int = 0
    path: str = ""  # unix socket path

    @property
    def host_header(self) -> str:
        """A Host value that names the upstream (for logs)."""
        return self.path if self.scheme == "unix" else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse HOST:PORT (``[v6]:PORT`` for IPv6)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if m is None:
        raise ValueError(f"expected HOST:PORT (got {text!r})")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range (got {port})")
    return Address(host, port)


def parse_upstream(text: str) -> Upstream:
    """Parse the --upstream URL."""
    if text.startswith("unix:"):
        path = text[5:].removeprefix("//")
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute (got {text!r})")
        return Upstream(text, "unix", path=path)
    m = re.fullmatch(r"(https?|tcp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?/?", text)
    if m is None:
        # HOST:PORT is what --listen takes, so it is the likely slip here: name the fix.
        bare = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d+/?", text)
        hint = f"; did you mean http://{text}?" if bare else ""
        raise ValueError(
            "expected http://host:port, https://host:port, tcp://host:port (--mode tcp) or "
            f"unix:/path (got {text!r}){hint}"
        )
    scheme = m.group(1)
    host = m.group(2).strip("[]")
    if scheme == "tcp" and m.group(3) is None:
        raise ValueError(f"tcp://HOST:PORT needs the port (got {text!r})")
    port = int(m.group(3) or (443 if scheme == "https" else 80))
    if not 0 < port <= 65535:
        raise ValueError(f"port out of range (got {port})")
    return Upstream(text, scheme, host, port)  # type: ignore[arg-type]  # one of the regex's
