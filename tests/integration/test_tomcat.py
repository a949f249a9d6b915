"""A real Tomcat (Debian's tomcat10 jars) with SSLValve behind the proxy: the servlet sees the
client certificate as jakarta.servlet.request.X509Certificate, exactly as if Tomcat had
terminated mTLS itself; without the proxy's header it sees none."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.helpers import ALLOWED_URI, Pki, client_ctx, connect, get, run_proxy

TOMCAT_HOME = Path("/usr/share/tomcat10")
SERVLET = """
import jakarta.servlet.http.*;
import java.security.cert.X509Certificate;
import java.nio.file.*;
import java.nio.charset.StandardCharsets;

public class CertServlet extends HttpServlet {
    @Override
    protected void service(HttpServletRequest req, HttpServletResponse resp)
            throws java.io.IOException {
        String acted = req.getServletPath() + (req.getPathInfo() == null ? "" : req.getPathInfo());
        resp.setContentType("text/plain");
        if (!acted.startsWith("/whoami")) {
            // What Tomcat acted on, one line per request: method, resolved path, body length,
            // and the identity/forwarding header values it would hand to the application.
            long n = 0;
            byte[] buf = new byte[8192];
            java.io.InputStream in = req.getInputStream();
            for (int r; (r = in.read(buf)) > 0; ) n += r;
            String line = req.getMethod() + "|" + acted + "|" + n + "|"
                + req.getHeader("x-client-subject") + "|" + req.getHeader("x-forwarded-prefix")
                + "\\n";
            synchronized (CertServlet.class) {
                Files.write(Paths.get(System.getProperty("catalina.base"), "logs", "acted.log"),
                    line.getBytes(StandardCharsets.UTF_8),
                    StandardOpenOption.CREATE, StandardOpenOption.APPEND);
            }
            resp.getWriter().print(line);
            return;
        }
        X509Certificate[] certs =
            (X509Certificate[]) req.getAttribute("jakarta.servlet.request.X509Certificate");
        if (certs == null) { resp.getWriter().print("none"); return; }
        resp.getWriter().print(certs[0].getSubjectX500Principal().getName() + "|"
            + certs[0].getSerialNumber().toString(16) + "|"
            + req.getAttribute("jakarta.servlet.request.cipher_suite"));
    }
}
"""
WEB_XML = """<?xml version="1.0" encoding="UTF-8"?>
<web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="6.0">
  <servlet><servlet-name>cert</servlet-name><servlet-class>CertServlet</servlet-class></servlet>
  <servlet-mapping><servlet-name>cert</servlet-name><url-pattern>/*</url-pattern></servlet-mapping>
</web-app>
"""
SERVER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector port="{port}" address="127.0.0.1" protocol="HTTP/1.1" />
    <Engine name="Catalina" defaultHost="localhost">
      <Valve className="org.apache.catalina.valves.SSLValve" />
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false" />
    </Engine>
  </Service>
</Server>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tomcat:
    port: int
    base: Path

    def acted(self) -> list[str]:
        """Every request the servlet acted on: 'METHOD|path as Tomcat resolved it|body length|
        X-Client-Subject|X-Forwarded-Prefix'."""
        log = self.base / "logs" / "acted.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def tomcat_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tomcat]:
    if not (TOMCAT_HOME / "lib" / "catalina.jar").exists() or not shutil.which("javac"):
        pytest.skip(
            "Tomcat 10 jars (Debian libtomcat10-java) or javac not installed; .ci/run installs them"
        )
    base = tmp_path_factory.mktemp("tomcat")
    port = free_port()
    for d in ("conf", "logs", "temp", "work", "webapps/ROOT/WEB-INF/classes"):
        (base / d).mkdir(parents=True)
    (base / "conf" / "server.xml").write_text(SERVER_XML.format(port=port))
    (base / "conf" / "web.xml").write_text(
        '<web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="6.0"/>'
    )
    # Every jar is on the system class path, so no common.loader is needed.
    (base / "conf" / "catalina.properties").write_text("common.loader=\n")
    src = base / "CertServlet.java"
    src.write_text(SERVLET)
    classes = base / "webapps/ROOT/WEB-INF/classes"
    subprocess.run(
        [
            "javac",
            "-cp",
            str(TOMCAT_HOME / "lib" / "servlet-api.jar"),
            "-d",
            str(classes),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (base / "webapps/ROOT/WEB-INF/web.xml").write_text(WEB_XML)
    cp = ":".join(
        [
            str(TOMCAT_HOME / "bin" / "bootstrap.jar"),
            str(TOMCAT_HOME / "bin" / "tomcat-juli.jar"),
            str(TOMCAT_HOME / "lib" / "*"),
        ]
    )
    proc = subprocess.Popen(
        [
            "java",
            "-cp",
            cp,
            f"-Dcatalina.home={TOMCAT_HOME}",
            f"-Dcatalina.base={base}",
            f"-Djava.io.tmpdir={base / 'temp'}",
            "org.apache.catalina.startup.Bootstrap",
            "start",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(base / "logs" / "out.log").open("w"),
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError(
                "Tomcat did not start:\n" + (base / "logs" / "out.log").read_text()
            )
        yield Tomcat(port, base)
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def tomcat(tomcat_rig: Tomcat) -> int:
    return tomcat_rig.port


def test_spring_style_tomcat_sees_the_client_certificate(tp: Pki, tomcat: int) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{tomcat}", "--identity-headers", "tomcat,xfcc") as p:
        status, _, body = get(p.port, client_ctx(tp, "good"), "/whoami")
        # A client trying to smuggle its own certificate header gets it stripped.
        spoof = get(
            p.port,
            client_ctx(tp, "good"),
            "/whoami",
            headers="ssl_client_cert: -----BEGIN CERTIFICATE----- AAAA "
            "-----END CERTIFICATE-----\r\n",
        )
    cert = x509.load_pem_x509_certificates(Path(tp.crt("good")).read_bytes())[0]
    subject, serial, cipher = body.decode().split("|")
    assert status == 200
    assert subject == "CN=client-good,O=Example Corp"
    assert int(serial, 16) == cert.serial_number
    assert cipher.startswith("TLS_")
    assert spoof[0] == 200 and spoof[2] == body


def test_without_the_proxy_header_tomcat_sees_no_certificate(tomcat: int) -> None:
    with socket.create_connection(("127.0.0.1", tomcat), timeout=10) as s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"none")


ROUTES = f"""
allow:
  - uri: {ALLOWED_URI}
routes:
  - path_prefix: /admin
    allow:
      - cn: nobody-has-this
"""


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        with contextlib.suppress(TimeoutError):
            s.settimeout(3)
            while chunk := s.recv(65536):
                data += chunk
    return data


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def tomcat_proxy(
    request: pytest.FixtureRequest,
    tp: Pki,
    tomcat_rig: Tomcat,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[int]:
    policy = tmp_path_factory.mktemp("tomcat-policy") / "policy.yaml"
    policy.write_text(ROUTES)
    with run_proxy(
        tp,
        f"http://127.0.0.1:{tomcat_rig.port}",
        "--policy",
        str(policy),
        loop=str(request.param),
        default_policy=False,
    ) as p:
        yield p.port


def _through(port: int, tp: Pki, payload: bytes) -> bytes:
    with connect(port, client_ctx(tp, "good"), timeout=5) as s:
        s.sendall(payload)
        data = b""
        with contextlib.suppress(TimeoutError, ssl.SSLError, ConnectionError):
            s.settimeout(3)
            while chunk := s.recv(65536):
                data += chunk
    return data


def test_int001_tomcat_content_length_lookalike(
    tp: Pki, tomcat_rig: Tomcat, tomcat_proxy: int
) -> None:
    """Content-Length + Content_Length: Tomcat acts on one request with the whole body, and the
    next client's request on the pooled connection is its own (no smuggled /admin request)."""
    smuggled = b"GET /admin/smuggled HTTP/1.1\r\nHost: a\r\nX-Client-Subject: CN=forged\r\n\r\n"
    before = len(tomcat_rig.acted())
    out = _through(
        tomcat_proxy,
        tp,
        b"POST /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nContent_Length: 0\r\n"
        b"Connection: close\r\n\r\n" % len(smuggled) + smuggled,
    )
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    out = _through(
        tomcat_proxy, tp, b"GET /public/next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    time.sleep(0.2)
    acted = tomcat_rig.acted()[before:]
    assert [line.split("|")[:3] for line in acted] == [
        ["POST", "/public/a", str(len(smuggled))],
        ["GET", "/public/next", "0"],
    ], acted
    assert not any("forged" in line for line in acted), acted


@pytest.mark.parametrize(
    "path", ["/public/..;/admin/x", "/public/..;v=1/admin/x", "/.;/admin/x", "/;/admin/x"]
)
def test_int020_tomcat_dot_segment_parameters(
    tp: Pki, tomcat_rig: Tomcat, tomcat_proxy: int, path: str
) -> None:
    """Tomcat resolves these to /admin/x (shown directly); through the proxy they are refused
    with 400 and Tomcat acts on nothing."""
    before = len(tomcat_rig.acted())
    direct = _raw(
        tomcat_rig.port, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert direct.startswith(b"HTTP/1.1 200"), direct[:200]
    assert tomcat_rig.acted()[before:] == ["GET|/admin/x|0|null|null"]
    before += 1
    out = _through(
        tomcat_proxy, tp, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert out.startswith(b"HTTP/1.1 400"), out[:300]
    time.sleep(0.2)
    assert tomcat_rig.acted()[before:] == []


@pytest.mark.parametrize(
    ("path", "status", "acted"),
    [
        ("/admin;jsessionid=1/x", 403, None),
        ("/public/../admin/x", 403, None),
        ("/public/a;v=1/b", 200, "/public/a/b"),
        ("/public/%7Ea/x/../b", 200, "/public/~a/b"),
    ],
)
def test_int022_tomcat_acts_on_the_path_the_proxy_matched(
    tp: Pki, tomcat_rig: Tomcat, tomcat_proxy: int, path: str, status: int, acted: str | None
) -> None:
    before = len(tomcat_rig.acted())
    out = _through(
        tomcat_proxy, tp, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:300]
    time.sleep(0.2)
    assert [line.split("|")[1] for line in tomcat_rig.acted()[before:]] == (
        [acted] if acted else []
    )
