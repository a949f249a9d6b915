"""A real Tomcat (Debian's tomcat10 jars) with SSLValve behind the proxy: the servlet sees the
client certificate as jakarta.servlet.request.X509Certificate, exactly as if Tomcat had
terminated mTLS itself; without the proxy's header it sees none."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.helpers import Pki, client_ctx, get, run_proxy

TOMCAT_HOME = Path("/usr/share/tomcat10")
SERVLET = """
import jakarta.servlet.http.*;
import java.security.cert.X509Certificate;

public class CertServlet extends HttpServlet {
    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp)
            throws java.io.IOException {
        X509Certificate[] certs =
            (X509Certificate[]) req.getAttribute("jakarta.servlet.request.X509Certificate");
        resp.setContentType("text/plain");
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


@pytest.fixture(scope="module")
def tomcat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
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
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


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
