"""The recording upstreams of the differential fuzzer, each a real server on 127.0.0.1.

Each records every request it *acted on* (parsed completely and handed to its handler) as an
``Acted``: method, request-target, the path it would route on, headers and body length.

- ``strict``: tests/fuzz/strict_http.py behind a threaded socket server.
- ``h11``: tests/helpers.py's recording upstream (h11).
- ``aiohttp``: aiohttp's low-level web server (its C parser) with one catch-all handler.
- ``tomcat``: Debian's Tomcat 10.1 with a recording servlet mapped to ``/*``; the path it acts
  on is ``getServletPath() + getPathInfo()``, after Tomcat's own decoding and normalization.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

from aiohttp import web

from tests.fuzz.strict_http import Parsed, Reject, StrictParser
from tests.helpers import run_upstream, serve_raw

TOMCAT_HOME = Path("/usr/share/tomcat10")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass(frozen=True, slots=True)
class Acted:
    """One request an upstream acted on."""

    method: str
    target: str  # the request-target as received
    path: str  # the path the server routes on (its own decoding/normalization)
    headers: tuple[tuple[str, str], ...]  # names lower-cased
    body_len: int
    conn: object = None


class Recorder(Protocol):
    port: int

    def records(self) -> list[Acted]: ...


def rfc_path(target: str) -> str:
    """The path a plain RFC 3986 server routes on: unreserved escapes decoded, dot segments
    removed (section 5.2.4); ``;params`` and empty segments are kept as they are."""
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        return path
    parts = path.split("%")
    for i in range(1, len(parts)):
        ch = unquote("%" + parts[i][:2])
        if len(parts[i]) >= 2 and ch in _UNRESERVED:
            parts[i] = ch + parts[i][2:]
        else:
            parts[i] = "%" + parts[i]
    out: list[str] = []
    segments = "".join(parts).split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


# -- strict ------------------------------------------------------------------------------------
class StrictUpstream:
    """tests/fuzz/strict_http.py on a socket: 200 to every request it accepts, 400 and close to
    the first it refuses."""

    def __init__(self) -> None:
        self._acted: list[Acted] = []
        self.rejects: list[str] = []
        self._srv = serve_raw(self._handle)
        self.port = int(self._srv.getsockname()[1])

    def records(self) -> list[Acted]:
        return list(self._acted)

    def close(self) -> None:
        self._srv.close()

    def _handle(self, sock: socket.socket, conn_id: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parser = StrictParser()
        with contextlib.suppress(OSError), sock:
            while not parser.closed:
                data = sock.recv(65536)
                if not data:
                    return
                try:
                    requests = parser.feed(data)
                except Reject as exc:
                    self.rejects.append(str(exc))
                    sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n")
                    sock.sendall(b"Connection: close\r\n\r\n")
                    return
                for req in requests:
                    self._acted.append(_acted(req, conn_id))
                    body = b"" if req.method == "HEAD" else b"ok"
                    close = b"Connection: close\r\n" if req.close else b""
                    sock.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\n%s" % (close, body)
                    )


def _acted(req: Parsed, conn_id: int) -> Acted:
    return Acted(req.method, req.target, rfc_path(req.target), req.headers, req.body_len, conn_id)


# -- h11 ----------------------------------------------------------------------------------------
class H11Upstream:
    """tests/helpers.py's h11 upstream, seen through ``Acted``."""

    def __init__(self, up: object) -> None:
        self._up = up
        self.port = int(up.port)  # type: ignore[attr-defined]
        self._acted: list[Acted] = []

    @property
    def errors(self) -> list[str]:
        return list(self._up.errors)  # type: ignore[attr-defined]

    def records(self) -> list[Acted]:
        seen = self._up.seen  # type: ignore[attr-defined]
        self._acted.extend(
            Acted(s.method, s.target, rfc_path(s.target), tuple(s.headers), s.body_len, s.conn_id)
            for s in seen[len(self._acted) : len(seen)]
        )
        return list(self._acted)


@contextlib.contextmanager
def h11_upstream() -> Iterator[H11Upstream]:
    with run_upstream() as up:
        yield H11Upstream(up)


# -- aiohttp ------------------------------------------------------------------------------------
class AiohttpUpstream:
    """aiohttp's low-level server in a thread of its own: every request reaches the handler."""

    def __init__(self) -> None:
        self._acted: list[Acted] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the aiohttp upstream did not start")

    def records(self) -> list[Acted]:
        return list(self._acted)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.raw_headers
        )
        self._acted.append(
            Acted(
                request.method,
                request.raw_path,
                request.path,
                headers,
                len(body),
                id(request.transport),
            )
        )
        return web.Response(text="ok")

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        server = web.Server(self._handle)
        srv = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        self.port = int(srv.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stop.wait()
        srv.close()
        await server.shutdown(1)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


# -- Tomcat -------------------------------------------------------------------------------------
SERVLET = r"""
import jakarta.servlet.http.*;
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.util.*;

public class RecordServlet extends HttpServlet {
    private static final Object LOCK = new Object();

    private static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20 || c > 0x7e) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    @Override
    protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        long n = 0;
        byte[] buf = new byte[8192];
        InputStream in = req.getInputStream();
        for (int r; (r = in.read(buf)) > 0;) n += r;
        StringBuilder h = new StringBuilder("[");
        Set<String> done = new HashSet<>();
        for (Enumeration<String> names = req.getHeaderNames(); names.hasMoreElements();) {
            String name = names.nextElement();
            if (!done.add(name.toLowerCase(Locale.ROOT))) continue;
            for (Enumeration<String> vs = req.getHeaders(name); vs.hasMoreElements();) {
                if (h.length() > 1) h.append(',');
                h.append('[').append(q(name)).append(',').append(q(vs.nextElement())).append(']');
            }
        }
        h.append(']');
        String info = req.getPathInfo();
        String line = "{\"method\":" + q(req.getMethod()) + ",\"uri\":" + q(req.getRequestURI())
            + ",\"path\":" + q(req.getServletPath() + (info == null ? "" : info))
            + ",\"headers\":" + h + ",\"body_len\":" + n + "}\n";
        synchronized (LOCK) {
            String file = System.getProperty("record.file");
            try (FileOutputStream out = new FileOutputStream(file, true)) {
                out.write(line.getBytes(StandardCharsets.UTF_8));
            }
        }
        resp.setContentType("text/plain");
        resp.getWriter().print("ok");
    }
}
"""
WEB_XML = """<?xml version="1.0" encoding="UTF-8"?>
<web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="6.0">
  <servlet><servlet-name>rec</servlet-name><servlet-class>RecordServlet</servlet-class></servlet>
  <servlet-mapping><servlet-name>rec</servlet-name><url-pattern>/*</url-pattern></servlet-mapping>
</web-app>
"""
# Keep-alive without a request limit (a desync must show on the next request of the connection);
# header limit above the proxy's identity block with every dialect on.
SERVER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector port="{port}" address="127.0.0.1" protocol="HTTP/1.1"
               maxKeepAliveRequests="-1" maxHttpHeaderSize="65536" />
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false" />
    </Engine>
  </Service>
</Server>
"""


def tomcat_missing() -> str | None:
    """Why the Tomcat upstream cannot run here, or None."""
    if not (TOMCAT_HOME / "lib" / "catalina.jar").exists():
        return "Tomcat 10 jars missing (Debian libtomcat10-java); .ci/run installs them"
    if not shutil.which("javac") or not shutil.which("java"):
        return "no JDK (Debian default-jdk-headless); .ci/run installs it"
    return None


class TomcatUpstream:
    """Records from the servlet's side log (one JSON line per request, written before the
    response)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self._log = log
        self._acted: list[Acted] = []
        self._offset = 0

    def records(self) -> list[Acted]:
        if self._log.exists():
            with self._log.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self._offset += len(complete)
            for line in complete.decode().splitlines():
                r = json.loads(line)
                headers = tuple((str(k).lower(), str(v)) for k, v in r["headers"])
                self._acted.append(
                    Acted(r["method"], r["uri"], r["path"], headers, int(r["body_len"]))
                )
        return list(self._acted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tomcat_upstream(base: Path) -> Iterator[TomcatUpstream]:
    port = _free_port()
    for d in ("conf", "logs", "temp", "work", "webapps/ROOT/WEB-INF/classes"):
        (base / d).mkdir(parents=True)
    (base / "conf" / "server.xml").write_text(SERVER_XML.format(port=port))
    (base / "conf" / "web.xml").write_text(
        '<web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="6.0"/>'
    )
    (base / "conf" / "catalina.properties").write_text("common.loader=\n")
    src = base / "RecordServlet.java"
    src.write_text(SERVLET)
    classes = base / "webapps/ROOT/WEB-INF/classes"
    servlet_api = str(TOMCAT_HOME / "lib" / "servlet-api.jar")
    subprocess.run(
        ["javac", "-cp", servlet_api, "-d", str(classes), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (base / "webapps/ROOT/WEB-INF/web.xml").write_text(WEB_XML)
    log = base / "records.jsonl"
    cp = ":".join(
        [
            str(TOMCAT_HOME / "bin" / "bootstrap.jar"),
            str(TOMCAT_HOME / "bin" / "tomcat-juli.jar"),
            str(TOMCAT_HOME / "lib" / "*"),
        ]
    )
    out = (base / "logs" / "out.log").open("w")
    proc = subprocess.Popen(
        [
            "java",
            "-XX:TieredStopAtLevel=1",  # C1 only: fast start, and the fuzz run is short
            "-Xshare:auto",
            "-cp",
            cp,
            f"-Dcatalina.home={TOMCAT_HOME}",
            f"-Dcatalina.base={base}",
            f"-Djava.io.tmpdir={base / 'temp'}",
            f"-Drecord.file={log}",
            "org.apache.catalina.startup.Bootstrap",
            "start",
        ],
        stdout=subprocess.DEVNULL,
        stderr=out,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("Tomcat did not start:\n" + (base / "logs/out.log").read_text())
        yield TomcatUpstream(port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
