"""A raw HTTP/2 client for the tests (python-hyper h2 over a real mTLS socket): open a connection
with ALPN h2, send streams (headers and bodies, as the proxy's windows allow), read until every
stream ended or was reset."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events


def h2_client(port: int, ctx: ssl.SSLContext) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    )
    assert s.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # A hostile client: send header blocks as written, never cleaned up client-side.
            normalize_outbound_headers=False,
            validate_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def h2_exchange(
    s: ssl.SSLSocket,
    conn: h2.connection.H2Connection,
    streams: dict[int, tuple[list[tuple[bytes, bytes]], bytes | None]],
) -> dict[int, dict[str, object]]:
    """Send each stream's headers (and body), read until every stream ended or was reset."""
    bodies: dict[int, bytes] = {}
    for sid, (headers, body) in streams.items():
        conn.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            bodies[sid] = body

    def send_bodies() -> None:  # as much as the proxy's windows allow, frame by frame
        for sid, rest in list(bodies.items()):
            while True:
                window = conn.local_flow_control_window(sid)
                n = min(len(rest), window, conn.max_outbound_frame_size)
                if n <= 0 and rest:
                    break
                conn.send_data(sid, rest[:n], end_stream=n == len(rest))
                rest = bodies[sid] = rest[n:]
                if not rest:
                    del bodies[sid]
                    break

    send_bodies()
    s.sendall(conn.data_to_send())
    out: dict[int, dict[str, object]] = {sid: {"data": b""} for sid in streams}
    pending = set(streams)
    while pending:
        data = s.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                out[ev.stream_id]["headers"] = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                out[ev.stream_id]["data"] += ev.data  # type: ignore[operator]
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                if isinstance(ev, h2.events.StreamReset):
                    out[ev.stream_id]["reset"] = ev.error_code
                pending.discard(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out[0] = {"goaway": ev.error_code}
                pending.clear()
        send_bodies()
        s.sendall(conn.data_to_send())
    return out
