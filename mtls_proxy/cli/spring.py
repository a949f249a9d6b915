"""What Spring Boot needs to use an exported keystore: the ``spring.ssl.bundle`` properties (server
side, or client side for a client certificate), printed by ``pki export``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

if TYPE_CHECKING:
    from pathlib import Path


def is_client_only(cert: x509.Certificate) -> bool:
    """True for a client certificate: its EKU allows clientAuth and not serverAuth."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False  # any purpose: the server side, as before
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku


def spring_properties(
    out: Path, fmt: str, password: str, alias: str, *, client: bool = False
) -> str:
    """The Spring Boot properties that use what export() wrote: a server's (``server.ssl.*``)
    or, for a client certificate, an SSL bundle for RestClient/WebClient and the JVM's
    ``javax.net.ssl.*`` system properties (a client has no use for ``server.ssl``)."""
    if client:
        return _client_properties(out, fmt, password, alias)
    if fmt == "pem":
        return "\n".join(
            [
                "# Spring Boot 3.1+ (SSL bundles)",
                *_pem_bundle(out),
                "server.ssl.bundle=mtls",
                "server.ssl.client-auth=need",
            ]
        )
    ext, typ = _store_type(fmt)
    return "\n".join(
        [
            "# Spring Boot (any version)",
            f"server.ssl.key-store=file:{out}/keystore.{ext}",
            f"server.ssl.key-store-password={password}",
            f"server.ssl.key-store-type={typ}",
            f"server.ssl.key-alias={alias}",
            f"server.ssl.trust-store=file:{out}/truststore.{ext}",
            f"server.ssl.trust-store-password={password}",
            f"server.ssl.trust-store-type={typ}",
            "server.ssl.client-auth=need",
            "# or Spring Boot 3.1+ SSL bundles",
            *_jks_bundle(out, fmt, password),
            "server.ssl.bundle=mtls",
        ]
    )


def _store_type(fmt: str) -> tuple[str, str]:
    """The file extension and Java's store type of an export format (p12 or jks)."""
    return ("p12", "PKCS12") if fmt == "p12" else ("jks", "JKS")


def _pem_bundle(out: Path) -> list[str]:
    """The ``mtls`` SSL bundle of a PEM export."""
    return [
        f"spring.ssl.bundle.pem.mtls.keystore.certificate=file:{out}/tls.crt",
        f"spring.ssl.bundle.pem.mtls.keystore.private-key=file:{out}/tls.key",
        f"spring.ssl.bundle.pem.mtls.truststore.certificate=file:{out}/ca.crt",
    ]


def _jks_bundle(out: Path, fmt: str, password: str) -> list[str]:
    """The ``mtls`` SSL bundle of a p12 or jks export (key and trust store)."""
    ext, typ = _store_type(fmt)
    return [
        f"spring.ssl.bundle.jks.mtls.{store}.{prop}={value}"
        for store in ("keystore", "truststore")
        for prop, value in (
            ("location", f"file:{out}/{store}.{ext}"),
            ("password", password),
            ("type", typ),
        )
    ]


def _client_properties(out: Path, fmt: str, password: str, alias: str) -> str:
    use = [
        '# use it: RestClient.builder().apply(restClientSsl.fromBundle("mtls")),',
        '# WebClient.builder().apply(webClientSsl.fromBundle("mtls")) or',
        '# restTemplateBuilder.sslBundle(sslBundles.getBundle("mtls"))',
    ]
    if fmt == "pem":  # javax.net.ssl reads keystores only: no system properties for PEM
        return "\n".join(["# Spring Boot 3.1+ client SSL bundle", *_pem_bundle(out), *use])
    ext, typ = _store_type(fmt)
    return "\n".join(
        [
            "# Spring Boot 3.1+ client SSL bundle",
            f"spring.ssl.bundle.jks.mtls.key.alias={alias}",
            *_jks_bundle(out, fmt, password),
            *use,
            "# or JVM-wide (HttpsURLConnection, java.net.http.HttpClient): system properties",
            f"-Djavax.net.ssl.keyStore={out}/keystore.{ext}",
            f"-Djavax.net.ssl.keyStorePassword={password}",
            f"-Djavax.net.ssl.keyStoreType={typ}",
            f"-Djavax.net.ssl.trustStore={out}/truststore.{ext}",
            f"-Djavax.net.ssl.trustStorePassword={password}",
            f"-Djavax.net.ssl.trustStoreType={typ}",
        ]
    )
