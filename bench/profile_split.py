#!/usr/bin/env python3
"""Split a py-spy profile of mtls-proxy into where the CPU goes (bench/profile.sh calls this).

  profile_split.py STACKS.txt      # py-spy record --format raw [--native] output

Every sample is charged to one bucket by its innermost frames:
  TLS (OpenSSL)          a libssl/libcrypto frame, or Python's ssl module (SSLObject.read/write)
  syscalls / kernel      send/recv/epoll and other libc calls under uvloop or our code
  h2 (state machine)     h2/* (connection, stream, events, flow-control windows, settings)
  hyperframe (framing)   hyperframe/* (frame parse and serialize)
  hpack                  hpack/* (header encode/decode, Huffman)
  mtls_proxy: FILE       our code, by module (its own time, and what it calls in C)
  asyncio / uvloop       the event loop (uvloop's C code, asyncio's Python)
  other                  everything else (stdlib, interpreter with no Python frame)
With --native, time in the interpreter or in C calls is charged to the innermost Python frame
above it, unless the native part is OpenSSL, libc's system calls or uvloop.
"""

import collections
import re
import sys
from pathlib import Path

PY = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+\.py)(?::\d+)?\)$")
NATIVE = re.compile(r"^(?P<fn>.+?) \((?P<lib>[^()]+)\)$")
SYSCALLS = {
    "send",
    "sendmsg",
    "__send",
    "recv",
    "__libc_recv",
    "__libc_send",
    "recvmsg",
    "read",
    "__libc_read",
    "write",
    "__libc_write",
    "writev",
    "epoll_wait",
    "epoll_ctl",
    "__GI_epoll_wait",
    "syscall",
}


def bucket_py(fn, path):
    p = path.replace("\\", "/")
    if "/hpack/" in p or p.startswith("hpack/"):
        return "hpack"
    if "/hyperframe/" in p or p.startswith("hyperframe/"):
        return "hyperframe (framing)"
    if "/h2/" in p or p.startswith("h2/"):
        return "h2 (state machine)"
    if "mtls_proxy/" in p:
        if p.endswith("dataplane/tlsconn.py"):
            return "TLS (mtls_proxy tlsconn.py)"
        return "mtls_proxy: " + p.split("mtls_proxy/", 1)[1]
    if p.endswith("/ssl.py") or p == "ssl.py":
        return "TLS (ssl module)"
    if "/asyncio/" in p or "uvloop" in p:
        return "asyncio / uvloop"
    return "other: " + p.rsplit("/", 1)[-1]


def classify(frames):
    """frames: outermost first."""
    native_tail = []
    for f in reversed(frames):
        m = PY.match(f)
        if m:
            for nf in native_tail:
                lib = nf[1]
                if "libssl" in lib or "libcrypto" in lib:
                    return "TLS (OpenSSL)"
            for nf in native_tail:
                if nf[0] in SYSCALLS or "kernel" in nf[1]:
                    return "syscalls / kernel"
            for nf in native_tail:
                if "uvloop" in nf[1] or "loop.cpython" in nf[1]:
                    return "asyncio / uvloop"
            return bucket_py(m["fn"], m["file"])
        m = NATIVE.match(f)
        native_tail.append((m["fn"], m["lib"]) if m else (f, ""))
    for _fn, lib in native_tail:
        if "libssl" in lib or "libcrypto" in lib:
            return "TLS (OpenSSL)"
        if "uvloop" in lib or "loop.cpython" in lib:
            return "asyncio / uvloop"
    return "other (no Python frame)"


def main(path):
    buckets, total = collections.Counter(), 0
    selfs = collections.Counter()
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        buckets[classify(frames)] += n
        selfs[frames[-1]] += n
    if not total:
        print("no samples")
        return 1
    groups = collections.Counter()
    for b, n in buckets.items():
        g = "mtls_proxy (ours)" if b.startswith("mtls_proxy: ") else b
        g = "other" if g.startswith("other") else g
        groups[g] += n
    print(f"samples: {total}")
    print("split:")
    for g, n in groups.most_common():
        print(f"  {100 * n / total:5.1f}%  {g}")
    print("our code by module:")
    for b, n in buckets.most_common():
        if b.startswith("mtls_proxy: "):
            print(f"  {100 * n / total:5.1f}%  {b[12:]}")
    print("top self frames:")
    for f, n in selfs.most_common(25):
        print(f"  {100 * n / total:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
