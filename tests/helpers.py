"""Test helpers: a test PKI, a recording h11 upstream, the real proxy as a subprocess, clients."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import queue
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtls_proxy.cli import pki

ALLOWED_URI = "spiffe://test.local/ns/default/sa/client"


@dataclass
class Pki:
    """Paths of every fixture certificate: NAME.crt (leaf + chain) and NAME.key in `dir`."""

    dir: Path

    def crt(self, name: str) -> str:
        return str(self.dir / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")

    def material(self, name: str = "server") -> list[str]:
        """The proxy's own certificate and key, and the client CA: serve/check/explain flags."""
        return ["--cert", self.crt(name), "--key", self.key(name), "--cacert", self.ca]

    def der(self, name: str) -> bytes:
        cert = x509.load_pem_x509_certificates(Path(self.crt(name)).read_bytes())[0]
        return cert.public_bytes(serialization.Encoding.DER)


def make_test_pki(d: Path) -> Pki:
    """Every certificate the integration tests use."""
    root, inter = pki.init_pki(d)
    now = dt.datetime.now(dt.UTC)
    w = pki.write_pair
    w(
        d,
        "server",
        pki.issue(
            inter,
            "server",
            "localhost",
            dns=["localhost"],
            ips=["127.0.0.1"],
            uris=["spiffe://test.local/proxy"],
        ),
    )
    w(
        d,
        "good",
        pki.issue(
            inter,
            "client",
            "client-good",
            o="Example Corp",
            uris=[ALLOWED_URI],
            dns=["client.test", "alt.client.test"],
        ),
    )
    w(
        d,
        "other",
        pki.issue(
            inter,
            "client",
            "client-other",
            o="Example Corp",
            uris=["spiffe://test.local/ns/default/sa/other"],
        ),
    )
    w(
        d,
        "expired",
        pki.issue(
            inter,
            "client",
            "client-expired",
            uris=[ALLOWED_URI],
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ),
    )
    w(
        d,
        "server_eku",
        pki.issue(
            inter,
            "client",
            "client-server-eku",
            uris=[ALLOWED_URI],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        ),
    )
    w(
        d,
        "evil",
        pki.issue(
            inter,
            "client",
            "evil\r\nX-Client-Subject: CN=admin",
            uris=[ALLOWED_URI],
            dns=["evil.test"],
        ),
    )
    w(
        d,
        "quote",
        pki.issue(
            inter,
            "client",
            'a"b,c;d=e\\f',
            o="Org, Inc.",
            uris=["spiffe://test.local/a;By=spiffe://admin,Hash=00"],
        ),
    )
    w(d, "direct", pki.issue(root, "client", "client-direct", uris=[ALLOWED_URI]))
    # The leaf alone, without the intermediate: must fail (the proxy trusts only the root).
    good_leaf = x509.load_pem_x509_certificates(Path(d / "good.crt").read_bytes())[0]
    (d / "good_leaf_only.crt").write_bytes(good_leaf.public_bytes(serialization.Encoding.PEM))
    (d / "good_leaf_only.key").write_bytes((d / "good.key").read_bytes())
    rogue_root = pki.make_ca("rogue root")
    w(
        d,
        "rogue",
        pki.issue(rogue_root, "client", "client-good", o="Example Corp", uris=[ALLOWED_URI]),
    )
    return Pki(d)


# -- recording upstream ----------------------------------------------------------------------
@dataclass
class Seen:
    """One request as the upstream parsed it (h11, strict)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body_len: int
    body_sha256: str
    body_head: bytes
    conn_id: int

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def one(self, name: str) -> str:
        values = self.get(name)
        assert len(values) == 1, (name, values)
        return values[0]


@dataclass
class Upstream:
    """A threaded HTTP/1.1 server parsing with h11; the request path picks the behaviour."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: int = 0
    raw_response: bytes = b""
    raw: dict[int, bytearray] = field(default_factory=dict)  # every byte received, per connection
    _server: socketserver.ThreadingTCPServer | None = None


def _handle(up: Upstream, sock: socket.socket, conn_id: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
    while True:
        req = None
        sha = hashlib.sha256()
        n = 0
        head = b""
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = sock.recv(262144)
                    raw = up.raw.setdefault(conn_id, bytearray())
                    if len(raw) < 1 << 20:  # enough to check framing; bulk tests stay flat
                        raw += data
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.CLOSED:
                        return
                    continue
                if isinstance(ev, h11.Request):
                    req = ev
                elif isinstance(ev, h11.Data):
                    n += len(ev.data)
                    sha.update(ev.data)
                    if len(head) < 65536:
                        head += ev.data[: 65536 - len(head)]
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    return
        except (h11.RemoteProtocolError, OSError) as exc:
            if not isinstance(exc, OSError):
                up.errors.append(f"h11: {exc}")
            return
        assert req is not None
        headers = [(k.decode().lower(), v.decode("latin-1")) for k, v in req.headers]
        target = req.target.decode()
        up.seen.append(
            Seen(req.method.decode(), target, headers, n, sha.hexdigest(), head, conn_id)
        )
        path, _, query = target.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if path.startswith("/slow"):
            time.sleep(float(params.get("s", "2")))
        if path == "/raw":
            sock.sendall(up.raw_response)
            sock.close()
            return
        if path == "/close-mid":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            time.sleep(0.2)
            sock.close()
            return
        status = int(params.get("status", "200"))
        out_headers = [
            ("X-Upstream", "1"),
            ("Connection", "X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
        ]
        if path == "/download":
            size = int(params["bytes"])
            chunked = params.get("chunked") == "1"
            if not chunked:
                out_headers.append(("Content-Length", str(size)))
            conn_send(conn, sock, h11.Response(status_code=200, headers=out_headers))
            block = b"d" * 1048576
            left = size
            while left:
                piece = block[: min(left, len(block))]
                conn_send(conn, sock, h11.Data(data=piece))
                left -= len(piece)
            conn_send(conn, sock, h11.EndOfMessage())
        else:
            if path == "/chunked":
                body_parts = [b"hello ", b"chunked ", b"world"]
            elif status in (204, 304) or req.method == b"HEAD":
                body_parts = []
            else:
                echo = {
                    "method": req.method.decode(),
                    "target": target,
                    "body_len": n,
                    "body_sha256": sha.hexdigest(),
                    "headers": headers,
                }
                body_parts = [json.dumps(echo).encode()]
            if path != "/chunked":
                length = sum(map(len, body_parts))
                if req.method == b"HEAD":
                    length = 1234
                if status != 204:
                    out_headers.append(("Content-Length", str(length)))
            out_headers.append(("Content-Type", "application/json"))
            conn_send(conn, sock, h11.Response(status_code=status, headers=out_headers))
            for part in body_parts:
                conn_send(conn, sock, h11.Data(data=part))
            conn_send(conn, sock, h11.EndOfMessage())
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            sock.close()
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            sock.close()
            return


def conn_send(conn: h11.Connection, sock: socket.socket, event: object) -> None:
    data = conn.send(event)  # type: ignore[arg-type]
    if data:
        sock.sendall(data)


@contextlib.contextmanager
def run_upstream() -> Iterator[Upstream]:
    up = Upstream()
    counter = iter(range(1, 1 << 30))

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            cid = next(counter)
            up.connections += 1
            # A response goes out in several writes (head, body): without NODELAY, Nagle and
            # the proxy's delayed ACK add 40 ms to every pipelined or keep-alive exchange.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _handle(up, self.request, cid)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    up.port = server.server_address[1]
    up._server = server
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield up
    finally:
        server.shutdown()
        server.server_close()


# -- the proxy under test ----------------------------------------------------------------------
@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    port: int
    admin: str | None
    logs: list[str]

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in list(self.logs):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, prefix: str) -> float:
        """The sum of the /metrics samples whose line starts with *prefix*."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.admin_get("/metrics")[1].splitlines()
            if line.startswith(prefix)
        )

    def cpu_seconds(self) -> float:
        """User + system CPU time the proxy process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(field)


def curl(
    tp: Pki, client: str | None, url: str, *extra: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`curl -sS` trusting the test CA, with CLIENT's certificate and key (None: no
    certificate); *extra* goes before the URL."""
    ident = ["--cert", tp.crt(client), "--key", tp.key(client)] if client else []
    return subprocess.run(
        ["curl", "-sS", "--cacert", tp.ca, *ident, *extra, url],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def proxy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtls_proxy", *args]


@contextlib.contextmanager
def run_proxy(
    tp: Pki,
    upstream: str,
    *extra: str,
    loop: str = "auto",
    default_policy: bool = True,
    env: dict[str, str] | None = None,
    extra_cert_args: bool = True,
) -> Iterator[Proxy]:
    material = tp.material()
    args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        *(material if extra_cert_args else []),
        "--loop",
        loop,
        "--log-format",
        "json",
        *extra,
    ]
    if default_policy and not any(a.startswith("--allow") for a in extra):
        args += ["--allow-uri", ALLOWED_URI]
    with launch(args, env) as p:
        yield p


@contextlib.contextmanager
def launch(args: list[str], env: dict[str, str] | None = None) -> Iterator[Proxy]:
    """Run `mtls-proxy ARGS` (serve or client, JSON or text logs) until its "ready" line;
    SIGTERM at the end."""
    proc = subprocess.Popen(
        proxy_cmd(*args),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    logs: list[str] = []
    ready: queue.Queue[dict[str, object] | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            logs.append(line)
            if '"msg": "ready"' in line:
                ready.put(json.loads(line))
            elif re.search(r" mtls_proxy\.(server|client): ready ", line):  # --log-format text
                ready.put(dict(re.findall(r" (listen|admin)=(\S+)", line)))
        ready.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        rec = ready.get(timeout=20)
    except queue.Empty:
        rec = None
    if rec is None:
        proc.kill()
        raise AssertionError("proxy did not start:\n" + "".join(logs))
    listen = str(rec["listen"])
    port = 0 if listen.startswith("unix:") else int(listen.rsplit(":", 1)[1])
    p = Proxy(proc, port, str(rec["admin"]) if rec.get("admin") else None, logs)
    try:
        yield p
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- clients -----------------------------------------------------------------------------------
def client_ctx(tp: Pki, name: str | None, tls13: bool | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tp.ca)
    if name:
        ctx.load_cert_chain(tp.crt(name), tp.key(name))
    if tls13 is True:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    elif tls13 is False:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def connect(port: int, ctx: ssl.SSLContext, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def send_and_read(
    port: int, ctx: ssl.SSLContext, payload: bytes, timeout: float = 5, per_byte: bool = False
) -> bytes:
    """Send exact bytes over TLS (one record per byte with *per_byte*); read until the proxy
    closes or goes quiet for *timeout*."""
    with connect(port, ctx, timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if per_byte:
            for i in range(len(payload)):
                s.sendall(payload[i : i + 1])
        else:
            s.sendall(payload)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ssl.SSLError, ConnectionError):
            pass
    return out


def read_response(
    s: ssl.SSLSocket, buf: bytearray, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length, chunked or close-delimited) from *s*."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {bytes(buf)!r}")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1")
    del buf[: end + 4]
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if head_only or status in (100, 204, 304):
        return status, headers, b""
    body = bytearray()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("short body")
            buf += chunk
        body += buf[:n]
        del buf[:n]
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            while b"\r\n" not in buf:
                buf += s.recv(65536)
            i = buf.index(b"\r\n")
            size = int(bytes(buf[:i]).split(b";")[0], 16)
            del buf[: i + 2]
            while len(buf) < size + 2:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("short chunk")
                buf += chunk
            if size == 0:
                del buf[:2]
                break
            body += buf[:size]
            del buf[: size + 2]
    else:
        while chunk := s.recv(65536):
            buf += chunk
        body += buf
        buf.clear()
    return status, headers, bytes(body)


def request(port: int, ctx: ssl.SSLContext, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes on a new connection and read one response."""
    with connect(port, ctx) as s:
        s.sendall(raw)
        return read_response(s, bytearray(), head_only=raw.startswith(b"HEAD "))


def ask(s: ssl.SSLSocket, path: str) -> int | None:
    """One request on an open connection: its status, or None when the connection is gone."""
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        return read_response(s, bytearray())[0]
    except (ConnectionError, ssl.SSLError, OSError):
        return None


def get(
    port: int, ctx: ssl.SSLContext, path: str = "/", headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    return request(port, ctx, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())


def alert_name(exc: ssl.SSLError) -> str:
    """The TLS alert an SSLError reports: OpenSSL's reason is SSLV3_ALERT_<name>/TLSV1_ALERT_..."""
    reason = exc.reason or ""
    return reason.split("_ALERT_", 1)[1] if "_ALERT_" in reason else f"not an alert: {reason}"


def refused_after_handshake(response: bytes) -> str | None:
    """The reason label of the 403 the proxy sends a client its checks refuse after the
    handshake (--strict-client-certs, --crl-expired allow), or None for any other bytes."""
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 403 ") or b"Connection: close" not in head:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("error") != "client_certificate_refused":
        return None
    return str(doc["reason"]).split(":", 1)[0]


def handshake_rejected(port: int, ctx: ssl.SSLContext) -> str:
    """Connect, write a request and read: the TLS alert the proxy refused with (its name, e.g.
    UNKNOWN_CA), "403 <reason>" for a refusal after the handshake, else how the connection
    ended; raises if it answered anything else."""
    data = b""
    try:
        with connect(port, ctx) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            # TLS 1.3: a rejected client cert surfaces here, not at connect
            while chunk := s.recv(65536):
                data += chunk
    except ssl.SSLError as exc:
        if not data:
            return alert_name(exc)
    except ConnectionError as exc:
        return type(exc).__name__
    refused = refused_after_handshake(data)
    if refused is not None:
        return f"403 {refused}"
    if data:
        raise AssertionError(f"expected a failed handshake, got a response: {data[:200]!r}")
    return "eof"


def resume_and_request(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> bytes:
    """Try to resume *session* and send a request: what came back (b'' when refused)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        return s.recv(100)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        s.close()


def serve_raw(handle: Callable[[socket.socket, int], None]) -> socket.socket:
    """A listening socket on loopback whose connections go to handle(conn, n) in threads (n
    counts from 1); close the returned socket to stop accepting."""
    srv = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        n = 0
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            n += 1
            threading.Thread(target=handle, args=(conn, n), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv
