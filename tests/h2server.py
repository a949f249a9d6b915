"""A threaded h2c (HTTP/2 with prior knowledge, cleartext) echo server for the tests, on the
python-hyper h2 state machine: what an HTTP/2 upstream of the proxy sees (`--upstream-protocol
h2c`). Each request is answered with JSON (method, path, headers, body length); `/reset` resets
the stream instead, `/trailers` ends with trailers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from tests.helpers import serve_raw


@dataclass
class H2Upstream:
    port: int = 0
    seen: list[dict[str, object]] = field(default_factory=list)
    connections: int = 0


def _serve(up: H2Upstream, sock: socket.socket) -> None:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    heads: dict[int, list[tuple[bytes, bytes]]] = {}
    bodies: dict[int, bytearray] = {}
    pending: dict[int, bytes] = {}
    with sock:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    heads[ev.stream_id] = list(ev.headers or ())  # type: ignore[arg-type]
                    bodies[ev.stream_id] = bytearray()
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] += ev.data or b""
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    _answer(up, conn, ev.stream_id, heads, bodies, pending)
                elif isinstance(ev, h2.events.WindowUpdated):
                    for sid in list(pending):
                        _send_body(conn, sid, pending)
            sock.sendall(conn.data_to_send())


def _answer(
    up: H2Upstream,
    conn: h2.connection.H2Connection,
    sid: int,
    heads: dict[int, list[tuple[bytes, bytes]]],
    bodies: dict[int, bytearray],
    pending: dict[int, bytes],
) -> None:
    headers = {k.decode(): v.decode("latin-1") for k, v in heads[sid] if k.startswith(b":")}
    record = {
        "method": headers[":method"],
        "path": headers[":path"],
        "authority": headers.get(":authority"),
        "scheme": headers.get(":scheme"),
        "headers": [[k.decode(), v.decode("latin-1")] for k, v in heads[sid]],
        "body_len": len(bodies[sid]),
    }
    up.seen.append(record)
    if record["path"] == "/reset":
        conn.reset_stream(sid, 0x2)  # INTERNAL_ERROR
        return
    body = json.dumps(record).encode()
    if record["path"].startswith("/big"):  # type: ignore[union-attr]
        body = bytes(bodies[sid]) or b"z" * 1_000_000
    out = [(b":status", b"200"), (b"content-type", b"application/json")]
    if record["method"] == "HEAD":
        conn.send_headers(sid, [*out, (b"content-length", b"%d" % len(body))], end_stream=True)
        return
    conn.send_headers(sid, out)
    pending[sid] = body
    _send_body(conn, sid, pending)


def _send_body(conn: h2.connection.H2Connection, sid: int, pending: dict[int, bytes]) -> None:
    rest = pending[sid]
    while rest:
        n = min(len(rest), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if n <= 0:
            pending[sid] = rest
            return
        conn.send_data(sid, rest[:n])
        rest = rest[n:]
    del pending[sid]
    conn.send_headers(sid, [(b"x-trailer", b"done")], end_stream=True)


@contextmanager
def run_h2_upstream() -> Iterator[H2Upstream]:
    up = H2Upstream()

    def handle(sock: socket.socket, n: int) -> None:
        up.connections = n
        _serve(up, sock)

    listener = serve_raw(handle)
    up.port = listener.getsockname()[1]
    try:
        yield up
    finally:
        listener.close()
