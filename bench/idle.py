"""Hold N idle mTLS keep-alive connections open to a running proxy and report its memory.

    python bench/idle.py --port 18443 --pid PID --cert C --key K --ca CA [--conns 10000]

Opens the connections (64 handshakes in flight at a time), sends one request on each so that
every connection is a real keep-alive connection, then reads the proxy's RSS from /proc, checks
that requests on *other* connections are still served, and closes everything. Loopback only;
bounded by --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import sys
import time
from pathlib import Path


def _tree(pid: int) -> list[int]:
    """*pid* and its descendants (nginx's worker, HAProxy's master-worker): a peer's memory
    is its whole process tree."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    if not total:
        raise RuntimeError("no VmRSS")
    return total / 1024


async def one(
    port: int, ctx: ssl.SSLContext, sem: asyncio.Semaphore
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with sem:
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        w.write(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(x.split(b":")[1])
                for x in head.split(b"\r\n")
                if x.lower().startswith(b"content-length:")
            ),
            0,
        )
        await r.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:100])
        return r, w


async def main(a: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.conns * 2 + 1000), hard))
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    sem = asyncio.Semaphore(64)
    base = rss_mb(a.pid)
    t0 = time.monotonic()
    conns = await asyncio.gather(*(one(a.port, ctx, sem) for _ in range(a.conns)))
    opened = time.monotonic() - t0
    await asyncio.sleep(1)
    held = rss_mb(a.pid)
    # A target (or its upstream) that dropped connections would look lighter than it is.
    still = sum(not r.at_eof() for r, _ in conns)
    # Requests on other connections are still served while the idle ones are held.
    t1 = time.monotonic()
    extra = await asyncio.gather(*(one(a.port, ctx, sem) for _ in range(20)))
    served = time.monotonic() - t1
    for _, w in (*conns, *extra):
        w.close()
    print(
        f"idle connections: {len(conns)} opened in {opened:.1f}s, {still} still open; "
        f"proxy RSS {base:.0f} MB -> "
        f"{held:.0f} MB ({(held - base) * 1024 / len(conns):.1f} KB per connection); "
        f"20 requests on new connections meanwhile: {served:.2f}s"
    )
    return 0 if held < a.limit_mb and still == len(conns) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--limit-mb", type=float, default=400)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    sys.exit(runner(asyncio.wait_for(main(args), args.timeout)))
