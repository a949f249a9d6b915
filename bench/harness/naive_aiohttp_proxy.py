#!/usr/bin/env python3
"""Naive mTLS reverse proxy: aiohttp server (ssl.CERT_REQUIRED) + one aiohttp ClientSession.

The straightforward Python baseline: 1 process, no tuning beyond access_log=None.
  python naive_aiohttp_proxy.py --port 18446 --cert chain.pem --key key.pem --client-ca root.pem \
      --upstream http://127.0.0.1:18080 [--uvloop] [--allowed-cn client-a]
"""

import argparse
import asyncio
import ssl
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
STRIP_IN = HOP | {
    "x-client-subject",
    "x-client-uri",
}  # never trust client-supplied identity headers
SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


def subject_dn(cert):  # RFC 2253 order (most specific first): "CN=client-a,O=bench"
    return ",".join(
        "+".join(f"{SHORT.get(k, k)}={v}" for k, v in rdn) for rdn in reversed(cert["subject"])
    )


async def proxy(request: web.Request) -> web.StreamResponse:
    cert = request.transport.get_extra_info("peercert")  # verified by the handshake (CERT_REQUIRED)
    cn = [v for rdn in cert["subject"] for k, v in rdn if k == "commonName"]
    if request.app["allowed_cn"] not in cn:
        return web.Response(status=403, text="forbidden\n")
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in STRIP_IN)
    headers["X-Client-Subject"] = subject_dn(cert)
    uris = [v for t, v in cert.get("subjectAltName", ()) if t == "URI"]
    if uris:
        headers["X-Client-URI"] = uris[0]
    body = await request.read()
    async with request.app["session"].request(
        request.method,
        request.app["upstream"] + request.path_qs,
        headers=headers,
        data=body or None,
        allow_redirects=False,
    ) as up:
        data = await up.read()
        out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
        return web.Response(status=up.status, body=data, headers=out)


async def on_startup(app):
    print(
        f"naive_aiohttp_proxy: loop={type(asyncio.get_running_loop()).__module__}",
        file=sys.stderr,
        flush=True,
    )
    app["session"] = ClientSession(
        connector=TCPConnector(limit=0, keepalive_timeout=120),
        timeout=ClientTimeout(total=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


async def on_cleanup(app):
    await app["session"].close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--allowed-cn", default="client-a")
    p.add_argument("--uvloop", action="store_true")
    a = p.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=a.client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(a.cert, a.key)
    app = web.Application()
    app.update(upstream=a.upstream.rstrip("/"), allowed_cn=a.allowed_cn)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host=a.host, port=a.port, ssl_context=ctx, access_log=None, print=None)


if __name__ == "__main__":
    main()
