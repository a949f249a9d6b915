"""Binding the listeners: one place for the socket options and for the error that names which
option's address could not be bound."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtls_proxy.core.config import Address


def bind(
    addr: Address,
    backlog: int = 1024,
    reuse_port: bool = False,
    option: str = "",
    listen: bool = True,
) -> socket.socket:
    """A non-blocking listening socket on *addr* (SO_REUSEPORT for --workers); with *listen*
    false, only bound: the --workers master reserves the port its workers listen on.

    A failure is an OSError naming *option* and the address: the bare "[Errno 98] Address
    already in use" does not say which of the two listeners could not bind."""
    where = f"{option} {addr}" if option else str(addr)
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise OSError(f"{where}: {_reason(exc)}") from exc  # the errno stays in the cause
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"{where}: {_reason(exc)}") from exc  # the errno stays in the cause
    return sock


def _reason(exc: OSError) -> str:
    """The reason without the errno, lower case: 'address already in use'."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]
