#!/usr/bin/env python3
"""Side-by-side benchmark of mTLS reverse proxies on one machine (loopback only).

Usually started through ./run.sh (see README.md).  For every target and round:
  check  correctness: allowed client -> 200 + injected X-Client-Subject echoed by the upstream;
         no client cert / unauthorized client-b / untrusted CA -> rejected (TLS alert or 4xx)
  ka     keep-alive throughput + latency: wrk (+ LD_PRELOAD client-cert shim), -c CONNS, DURATION s
  new    full mTLS handshakes/s: `openssl s_time -new` (serial, one client) for HS_DURATION s
  reuse  resumed handshakes/s:   `openssl s_time -reuse` for HS_DURATION s
  close  full-handshake capacity: wrk with `Connection: close` (every request = new TCP connection +
         full TLS handshake; the shim drops wrk's cached session), -c CLOSE_CONNS, HS_DURATION s
  close_resume (opt-in) the same with TLS 1.3 resumption (wrk's default behaviour)
  h2     (opt-in) HTTP/2 GETs over keep-alive mTLS: h2load (+ the same client-cert shim),
         H2_CONNS connections x H2_STREAMS concurrent streams each, DURATION s
  grpc   (opt-in) small unary gRPC calls over keep-alive mTLS: h2load POSTs gRPC-framed messages;
         the target is restarted in gRPC mode, in front of a grpcio upstream (h2c), checked with
         a real grpcio client, and the calls the upstream served are counted against h2load's
CPU time of the target's process tree, the upstream and the load generator is sampled from /proc
around each phase, so cost per request / per handshake can be compared even on a busy machine.
Every process the harness starts is put in its own session; it is stopped by killing that recorded
process group (never by name).  All load phases are bounded in time.
"""

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import re
import resource
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

BENCH = Path(__file__).resolve().parent
PKI = BENCH / "pki"
SHIM = BENCH / "tools" / "wrk_clientcert.so"
HOST = "127.0.0.1"
# Preferred ports; if one is taken (the machine is shared) the next free port is used instead,
# and the actual port is passed to the target in BENCH_PORT / BENCH_UPSTREAM*.
UPSTREAM_PORT = int(os.environ.get("BENCH_UPSTREAM_PORT", "18080"))
ORIGINATOR_PORT = int(os.environ.get("BENCH_ORIGINATOR_PORT", "18090"))
GRPC_UPSTREAM_PORT = int(os.environ.get("BENCH_GRPC_UPSTREAM_PORT", "18081"))
PORTS = {
    "nginx": 18443,
    "haproxy": 18444,
    "caddy": 18445,
    "aiohttp": 18446,
    "aiohttp-uvloop": 18447,
    "nginx-direct": 18448,
    "grpc-relay": 18449,
}
EXTERNAL_PORT_BASE = 18460
DEFAULT_TARGETS = [
    "upstream-plain",
    "nginx-direct",
    "nginx",
    "haproxy",
    "caddy",
    "aiohttp",
    "aiohttp-uvloop",
]
REFERENCE = {"upstream-plain", "nginx-direct"}  # not proxies: ceilings of the harness
HTTP_PHASES = {"ka", "new", "reuse", "close", "close_resume", "h2"}
ALL_PHASES = HTTP_PHASES | {"grpc"}
# Built-in targets without HTTP/2 (h2load would fall back to HTTP/1.1): no h2 phase for them.
NO_H2 = {"upstream-plain", "aiohttp", "aiohttp-uvloop"}
# Built-in targets that speak gRPC only (no HTTP/1.1 phases), and those with no gRPC mode.
GRPC_ONLY = {"grpc-relay"}
NO_GRPC = {"nginx-direct", "caddy", "aiohttp", "aiohttp-uvloop"}
GRPC_METHOD = "/bench.Bench/Echo"
GRPC_MSG = b"bench-grpc-call-0123456789abcdef"  # 32 bytes; framed: 37 bytes of DATA
BODY_LEN = 64
HZ = os.sysconf("SC_CLK_TCK")
ALLOWED_CN = "client-a"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes
def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_start_time(pid):
    try:
        return _stat_fields(pid)[19]
    except OSError:
        return None


class Proc:
    """A process started in its own session; stopped by killing its recorded process group."""

    registry: ClassVar[list["Proc"]] = []

    def __init__(self, name, argv, env, logdir, cpus=None):
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        self.name = name
        self.logf = (logdir / f"{name}.log").open("ab")  # closed by stop()
        self.p = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.p.pid
        self.pidfile = logdir / f"{name}.pid"
        self.pidfile.write_text(f"{self.pid} {_proc_start_time(self.pid)}\n")
        Proc.registry.append(self)

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # leader gone; children of the group may remain
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        self.logf.close()
        if self in Proc.registry:
            Proc.registry.remove(self)

    @classmethod
    def stop_all(cls):
        for p in list(reversed(cls.registry)):
            p.stop()


def reap_stale(rundir):
    """Stop groups left by a crashed earlier run (only if pid AND start time still match)."""
    for pf in rundir.glob("*.pid"):
        try:
            pid, start = pf.read_text().split()
            if _proc_start_time(pid) == start:
                log(f"[cleanup] stopping stale process group {pid} from {pf.name}")
                os.killpg(int(pid), signal.SIGKILL)
        except (ValueError, OSError):
            pass
        pf.unlink(missing_ok=True)


def tree(pid):
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(_stat_fields(d.name)[1])
                kids.setdefault(ppid, []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += kids.get(p, [])
    return out


def cpu_seconds(pid):
    """user+sys CPU seconds of a process tree, including reaped children (cutime/cstime)."""
    if pid is None:
        return 0.0
    t = 0
    for p in tree(pid):
        try:
            f = _stat_fields(p)
            t += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        except (OSError, ValueError, IndexError):
            pass
    return t / HZ


def machine_ticks():
    with Path("/proc/stat").open() as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:8]), idle, steal


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuWindow:
    """CPU used by target / upstream / originator / load generator / machine over a time window."""

    def __init__(self, procs):
        self.procs = procs  # name -> pid

    def __enter__(self):
        self.t0 = time.monotonic()
        self.c0 = {k: cpu_seconds(v) for k, v in self.procs.items()}
        self.lg0 = children_cpu()
        self.m0 = machine_ticks()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        self.cpu = {k: cpu_seconds(v) - self.c0[k] for k, v in self.procs.items()}
        self.cpu["loadgen"] = children_cpu() - self.lg0
        m1 = machine_ticks()
        tot = max(1, m1[0] - self.m0[0])
        self.busy = 1 - (m1[1] - self.m0[1]) / tot
        self.steal = (m1[2] - self.m0[2]) / tot
        return False

    def as_dict(self):
        d = {f"cpu_{k}": round(v / self.wall, 3) for k, v in self.cpu.items()}  # cores used
        ours = sum(self.cpu.values()) / self.wall
        d.update(
            machine_busy=round(self.busy, 3),
            machine_steal=round(self.steal, 3),
            wall_s=round(self.wall, 2),
            cpu_other=round(max(0.0, self.busy * (os.cpu_count() or 1) - ours), 3),
        )  # cores used by others
        return d


def wait_port(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


_taken = set()


def pick_port(preferred):
    """preferred port if free, else the next free one (ports picked in this run are not reused)."""
    for p in range(preferred, preferred + 200):
        if p not in _taken and port_free(p):
            _taken.add(p)
            if p != preferred:
                log(f"[bench] port {preferred} is busy, using {p}")
            return p
    raise SystemExit(f"no free port near {preferred}")


# ----------------------------------------------------------------------------- correctness
def client_ctx(cert=None, key=None):
    ctx = ssl.create_default_context(cafile=str(PKI / "root.crt"))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def one_request(port, ctx, headers=None):
    conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/check", headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return {
            "status": r.status,
            "headers": {k.lower(): v for k, v in r.getheaders()},
            "body_len": len(body),
        }
    except (ssl.SSLError, ConnectionError, OSError, http.client.HTTPException) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"[:160]}
    finally:
        conn.close()


def correctness(port):
    res = {}
    a = one_request(
        port,
        client_ctx(PKI / "client-a-chain.pem", PKI / "client-a.key"),
        {"X-Client-Subject": "spoofed", "X-Client-URI": "spoofed"},
    )
    subj = a.get("headers", {}).get("x-client-subject", "")
    uri = a.get("headers", {}).get("x-client-uri", "")
    res["allowed"] = {
        "ok": a["status"] == 200
        and a.get("body_len") == BODY_LEN
        and f"CN={ALLOWED_CN}" in subj
        and "spoofed" not in subj
        and "spoofed" not in uri,
        "status": a["status"],
        "subject": subj,
        "uri": uri,
        "error": a.get("error"),
    }

    def rejected(r, want_status=None):
        if r["status"] is None:
            return True, "tls-rejected"
        ok = 400 <= r["status"] < 500 and (want_status is None or r["status"] == want_status)
        return ok, f"HTTP {r['status']}"

    for name, ctx, want in (
        ("no_cert", client_ctx(), None),
        ("client_b", client_ctx(PKI / "client-b-chain.pem", PKI / "client-b.key"), 403),
        ("untrusted_ca", client_ctx(PKI / "client-rogue.crt", PKI / "client-rogue.key"), None),
    ):
        r = one_request(port, ctx)
        ok, how = rejected(r, want)
        res[name] = {"ok": ok, "how": how}
    res["ok"] = all(v["ok"] for v in res.values() if isinstance(v, dict))
    return res


def plain_check(port):
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/check", headers={"X-Client-Subject": "CN=plain"})
        r = conn.getresponse()
        body = r.read()
        ok = (
            r.status == 200
            and len(body) == BODY_LEN
            and r.getheader("X-Client-Subject") == "CN=plain"
        )
        return {
            "ok": ok,
            "allowed": {"ok": ok, "status": r.status, "subject": r.getheader("X-Client-Subject")},
        }
    except (OSError, http.client.HTTPException) as e:
        return {"ok": False, "error": str(e)}
    finally:
        conn.close()


def _grpc_channel(port, cert=None, key=None):
    import grpc  # only the gRPC phase needs grpcio

    creds = grpc.ssl_channel_credentials(
        (PKI / "root.crt").read_bytes(),
        Path(key).read_bytes() if key else None,
        Path(cert).read_bytes() if cert else None,
    )
    return grpc.secure_channel(f"{HOST}:{port}", creds)


def grpc_call(channel, metadata=()):
    """One unary Echo call: {'code': 'OK'|..., 'initial': {...}, 'body_ok': bool}."""
    import grpc

    try:
        resp, call = channel.unary_unary(GRPC_METHOD).with_call(
            GRPC_MSG, metadata=[("x-bench-echo", "1"), *metadata], timeout=5
        )
        return {
            "code": "OK",
            "initial": dict(call.initial_metadata() or ()),
            "body_ok": resp == GRPC_MSG,
        }
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": (e.details() or "")[:120]}


def grpc_check(port):
    """The gRPC counterpart of correctness(): a real grpcio client over mTLS."""
    res = {}
    with _grpc_channel(port, PKI / "client-a-chain.pem", PKI / "client-a.key") as ch:
        a = grpc_call(ch, [("x-client-subject", "spoofed"), ("x-client-uri", "spoofed")])
    subj = str(a.get("initial", {}).get("x-client-subject", ""))
    uri = str(a.get("initial", {}).get("x-client-uri", ""))
    res["allowed"] = {
        "ok": a["code"] == "OK"
        and a.get("body_ok")
        and f"CN={ALLOWED_CN}" in subj
        and "spoofed" not in subj
        and "spoofed" not in uri,
        "status": a["code"],
        "subject": subj,
        "uri": uri,
        "error": a.get("details"),
    }
    for name, cert, key in (
        ("no_cert", None, None),
        ("client_b", PKI / "client-b-chain.pem", PKI / "client-b.key"),
        ("untrusted_ca", PKI / "client-rogue.crt", PKI / "client-rogue.key"),
    ):
        with _grpc_channel(port, cert, key) as ch:
            r = grpc_call(ch)
        res[name] = {"ok": r["code"] != "OK", "how": r["code"]}
    res["ok"] = all(v["ok"] for v in res.values() if isinstance(v, dict))
    return res


def grpc_upstream_count(port):
    """Echo calls the grpcio upstream has served (its Count method, h2c, not through a proxy)."""
    import grpc

    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        return int(ch.unary_unary("/bench.Bench/Count")(b"", timeout=5))


# ----------------------------------------------------------------------------- load tools
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(txt):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", txt)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_wrk(out):
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    r["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        r[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["sock_errors"] = sum(map(int, m.groups())) if m else 0
    return r


def parse_h2load(out):
    """h2load's summary: 2xx responses per second, failures, mean time per request, ALPN."""
    r = {"rps": 0.0, "requests": 0, "non2xx": 0, "failed": 0, "mean_ms": None, "alpn": None}
    m = re.search(r"Application protocol: (\S+)", out)
    r["alpn"] = m.group(1) if m else None
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["requests"] = int(m.group(1))
        r["non2xx"] = sum(map(int, m.groups()[1:]))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if m:
        r["failed"] = int(m.group(5)) + int(m.group(6)) + int(m.group(7))
    m = re.search(r"finished in ([\d.]+)(\w+),", out)
    secs = (_ms(m.group(1) + m.group(2)) or 0) / 1e3 if m else 0
    if secs:
        r["rps"] = round(r["requests"] / secs, 1)
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    r["mean_ms"] = _ms(m.group(3)) if m else None
    return r


class Harness:
    def __init__(self, args, outdir):
        self.a = args
        self.out = outdir
        self.raw = outdir / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.rundir = BENCH / "run"
        self.rundir.mkdir(exist_ok=True)
        self.upstream = None
        self.grpc_up = None
        self.grpc_port = None
        self.grpc_body = self.out / "grpc-request.bin"  # one gRPC message: 5-byte prefix + body
        self.grpc_body.write_bytes(b"\x00" + len(GRPC_MSG).to_bytes(4, "big") + GRPC_MSG)
        pin = "" if args.pin in ("", "none") else args.pin
        if pin and not re.fullmatch(r"[\d,-]+/[\d,-]+", pin):
            raise SystemExit(
                f"--pin wants TARGET_CPUS/HARNESS_CPUS, e.g. 1/0, or none (got {args.pin!r})"
            )
        self.pin_target = pin.split("/")[0] if pin else None
        self.pin_harness = pin.split("/")[1] if pin else None

    # -- environment passed to every target command (documented in README.md)
    def target_env(self, name, port):
        env = dict(os.environ)
        env.update(
            BENCH_DIR=str(BENCH),
            BENCH_NAME=name,
            BENCH_HOST=HOST,
            BENCH_PORT=str(port),
            BENCH_SERVER_CERT=str(PKI / "server-chain.pem"),
            BENCH_SERVER_KEY=str(PKI / "server.key"),
            BENCH_SERVER_PEM=str(PKI / "server-full.pem"),
            BENCH_CLIENT_CA=str(PKI / "client-ca.pem"),
            BENCH_UPSTREAM=f"{HOST}:{self.up_port}",
            BENCH_UPSTREAM_HOST=HOST,
            BENCH_UPSTREAM_PORT=str(self.up_port),
            BENCH_UPSTREAM_URL=f"http://{HOST}:{self.up_port}",
            BENCH_ALLOWED_CN=ALLOWED_CN,
            BENCH_ALLOWED_URI="spiffe://example.org/ns/default/sa/client-a",
            BENCH_RUNDIR=str(self.rundir / name),
            BENCH_PYTHON=str(BENCH / ".venv" / "bin" / "python"),
            # h2/grpc phases: targets offer ALPN h2 (HTTP/1.1 clients are served as before)
            BENCH_HTTP2="1" if self.a.phases & {"h2", "grpc"} else "0",
            BENCH_MODE="http",
        )
        if self.grpc_port:
            env["BENCH_GRPC_UPSTREAM"] = f"{HOST}:{self.grpc_port}"
        (self.rundir / name).mkdir(exist_ok=True)
        return env

    def start_upstream(self):
        env = self.target_env("upstream", self.up_port)
        self.upstream = Proc(
            "upstream",
            ["bash", str(BENCH / "tools" / "upstream.sh")],
            env,
            self.rundir,
            self.pin_harness,
        )
        if not wait_port(self.up_port, self.upstream):
            raise SystemExit("upstream nginx did not start; see run/upstream.log")

    def start_grpc_upstream(self):
        env = self.target_env("grpc-upstream", self.grpc_port)
        self.grpc_up = Proc(
            "grpc-upstream",
            [
                str(BENCH / ".venv" / "bin" / "python"),
                str(BENCH / "tools" / "grpc_upstream.py"),
                "--host",
                HOST,
                "--port",
                str(self.grpc_port),
            ],
            env,
            self.rundir,
            self.pin_harness,
        )
        if not wait_port(self.grpc_port, self.grpc_up):
            raise SystemExit("the grpcio upstream did not start; see run/grpc-upstream.log")

    def start_originator(self, target_port, tls):
        """haproxy that accepts plain HTTP from wrk and opens keep-alive (m)TLS to the target."""
        d = self.rundir / "originator"
        d.mkdir(exist_ok=True)
        srv = (
            f"server t {HOST}:{target_port} ssl crt {PKI / 'client-a-full.pem'} "
            f"ca-file {PKI / 'root.crt'} verify required"
            if tls
            else f"server t {HOST}:{target_port}"
        )
        op = self.orig_port
        (d / "haproxy.cfg").write_text(f"""global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe
    bind {HOST}:{op}
    default_backend be
backend be
    http-reuse always
    {srv}
""")
        p = Proc(
            "originator",
            ["haproxy", "-db", "-f", str(d / "haproxy.cfg")],
            dict(os.environ),
            self.rundir,
            self.pin_harness,
        )
        if not wait_port(op, p):
            p.stop()
            raise RuntimeError("originator haproxy did not start; see run/originator.log")
        return p

    def loadcmd(self, argv):
        return (["taskset", "-c", self.pin_harness] if self.pin_harness else []) + argv

    def run_cmd(self, argv, timeout, env=None, tag=None):
        t0 = time.monotonic()
        try:
            cp = subprocess.run(
                self.loadcmd(argv),
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
            out, rc = cp.stdout + cp.stderr, cp.returncode
        except subprocess.TimeoutExpired as e:  # subprocess.run kills the child on timeout
            parts = [
                x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                for x in (e.stdout, e.stderr)
            ]
            out, rc = "".join(parts) + "\n# TIMEOUT", -9
        wall = time.monotonic() - t0
        if tag:
            (self.raw / f"{tag}.txt").write_text(
                f"$ {shlex.join(argv)}\n# rc={rc} wall={wall:.2f}s\n{out}"
            )
        return out, rc, wall

    def wrk_env(self, resume=True):
        env = dict(os.environ)
        env.update(
            LD_PRELOAD=str(SHIM),
            WRK_CLIENT_CERT=str(PKI / "client-a-chain.pem"),
            WRK_CLIENT_KEY=str(PKI / "client-a.key"),
            WRK_TLS_RESUME="1" if resume else "0",
        )
        return env

    def wrk(self, url, conns, dur, tag, extra=(), tls=True, resume=True):
        argv = [
            "wrk",
            f"-t{self.a.threads}",
            f"-c{conns}",
            f"-d{dur}s",
            "--latency",
            "--timeout",
            "5s",
            *extra,
            url,
        ]
        out, rc, _ = self.run_cmd(argv, dur + 30, self.wrk_env(resume) if tls else None, tag)
        r = parse_wrk(out)
        r["rc"] = rc
        return r

    def h2load(self, url, dur, tag, grpc=False, tls=True):
        """h2load -t1 with H2_CONNS connections x H2_STREAMS concurrent streams, the client
        certificate from the same LD_PRELOAD shim as wrk (h2load links libssl dynamically and
        makes one SSL_CTX with SSL_CTX_new)."""
        argv = [
            "h2load",
            "-t1",
            f"-c{self.a.h2_conns}",
            f"-m{self.a.h2_streams}",
            f"-D{dur}",
        ]
        if grpc:
            argv += [
                "-d",
                str(self.grpc_body),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
            ]
        argv.append(url)
        out, rc, _ = self.run_cmd(argv, dur + 30, self.wrk_env() if tls else None, tag)
        r = parse_h2load(out)
        r["rc"] = rc
        return r

    def grpc_load(self, url, dur, tag, tls=True):
        """h2load with gRPC calls, and the calls the upstream served meanwhile."""
        c0 = grpc_upstream_count(self.grpc_port)
        r = self.h2load(url, dur, tag, grpc=True, tls=tls)
        r["upstream_calls"] = grpc_upstream_count(self.grpc_port) - c0
        return r

    def s_time(self, port, mode, dur, tag):
        argv = [
            "openssl",
            "s_time",
            "-connect",
            f"{HOST}:{port}",
            f"-{mode}",
            "-cert",
            str(PKI / "client-a.crt"),
            "-key",
            str(PKI / "client-a.key"),
            "-CAfile",
            str(PKI / "ca-bundle.pem"),  # lets the client auto-chain its intermediate
            "-time",
            str(dur),
            "-www",
            "/",
        ]
        out, rc, wall = self.run_cmd(argv, dur + 30, None, tag)
        m = re.search(r"(\d+) connections in [\d.]+s;", out)
        n = int(m.group(1)) if m else 0
        m = re.search(r"(\d+) bytes read per connection", out)
        body = "".join(ln for ln in out.splitlines() if re.fullmatch(r"[*r]+", ln.strip() or "x"))
        return {
            "conns": n,
            "rate": round(n / wall, 1) if n else 0.0,
            "rc": rc,
            "bytes_per_conn": int(m.group(1)) if m else None,
            "reused_frac": round(body.count("r") / max(1, len(body)), 3)
            if mode == "reuse"
            else 0.0,
        }

    def measure(self, pids, fn):
        """Run fn() inside a CPU window. If other processes used more than --noise-limit cores
        meanwhile (the machine is shared), pause 2 s and repeat, up to --noise-retries times;
        keep the quietest try."""
        best = None
        for attempt in range(self.a.noise_retries + 1):
            with CpuWindow(pids) as w:
                r = fn()
            r.update(w.as_dict())
            r["cpu_target_s"] = w.cpu["target"]
            r["tries"] = attempt + 1
            if best is None or r["cpu_other"] < best["cpu_other"]:
                best = r
            if r["cpu_other"] <= self.a.noise_limit:
                break
            log(
                f"[bench]   noisy ({r['cpu_other']:.2f} cores used by other processes), "
                "repeating phase"
            )
            time.sleep(2)
        best["tries"] = attempt + 1
        return best

    # -- one target, one round
    def run_target(self, spec, rnd):
        name = spec[0]
        res = {"target": name, "round": rnd, "ts": dt.datetime.now().isoformat(timespec="seconds")}
        if self.a.phases & HTTP_PHASES and name not in GRPC_ONLY:
            res.update(self._run_http(spec, rnd))
        if "grpc" in self.a.phases and name not in NO_GRPC:
            res.update(self._run_grpc(spec, rnd))
        return res

    def _start(self, spec, port, env):
        name, cmd = spec
        argv = (
            ["bash", str(BENCH / "targets" / f"{name}.sh")] if cmd is None else ["bash", "-c", cmd]
        )
        return Proc(name, argv, env, self.rundir, self.pin_target)

    def _run_grpc(self, spec, rnd):
        """The gRPC phase: the target restarted with the grpcio upstream (BENCH_MODE=grpc and
        BENCH_UPSTREAM* pointing at it), checked with grpcio, loaded with h2load."""
        name = spec[0]
        a = self.a
        res = {}
        url_path = GRPC_METHOD
        if name == "upstream-plain":  # the ceiling: h2load -> grpcio upstream, h2c, no proxy
            pids = {"target": self.grpc_up.pid, "upstream": None}
            url = f"http://{HOST}:{self.grpc_port}{url_path}"
            self.h2load(url, 1, f"{name}.r{rnd}.grpc-warm", grpc=True, tls=False)
            r = self.measure(
                pids, lambda: self.grpc_load(url, a.duration, f"{name}.r{rnd}.grpc", tls=False)
            )
            r["target_us_per_req"] = (
                round(r["cpu_target_s"] / r["requests"] * 1e6, 1) if r["requests"] else None
            )
            res["grpc"] = r
            return res
        port = self.ports[name]
        if not port_free(port):
            res["grpc_error"] = f"port {port} already in use"
            return res
        env = self.target_env(name, port)
        env.update(
            BENCH_MODE="grpc",
            BENCH_UPSTREAM=f"{HOST}:{self.grpc_port}",
            BENCH_UPSTREAM_PORT=str(self.grpc_port),
            BENCH_UPSTREAM_URL=f"http://{HOST}:{self.grpc_port}",
        )
        proc = self._start(spec, port, env)
        try:
            if not wait_port(port, proc):
                res["grpc_error"] = f"did not listen on {port} in gRPC mode; see run/{name}.log"
                return res
            time.sleep(0.3)
            res["check_grpc"] = chk = grpc_check(port)
            if not chk["allowed"]["ok"]:
                res["grpc_error"] = f"gRPC check failed: {chk['allowed']}"
                return res
            pids = {"target": proc.pid, "upstream": self.grpc_up.pid}
            url = f"https://{HOST}:{port}{url_path}"
            self.h2load(url, 1, f"{name}.r{rnd}.grpc-warm", grpc=True)
            r = self.measure(pids, lambda: self.grpc_load(url, a.duration, f"{name}.r{rnd}.grpc"))
            r["target_us_per_req"] = (
                round(r["cpu_target_s"] / r["requests"] * 1e6, 1) if r["requests"] else None
            )
            if r["alpn"] != "h2":
                res["grpc_error"] = f"h2load negotiated {r['alpn']!r}, not h2"
            res["grpc"] = r
            if not proc.alive():
                res["grpc_error"] = "target exited during the gRPC run"
        finally:
            proc.stop()
        return res

    def _run_http(self, spec, rnd):
        name = spec[0]
        res = {}
        a = self.a
        if (
            name == "upstream-plain"
        ):  # harness ceiling: load generator -> plain upstream, no TLS, no proxy
            res["check"] = plain_check(self.up_port)
            if "ka" not in a.phases:
                return res
            pids = {"target": None, "upstream": self.upstream.pid}
            orig = (
                self.start_originator(self.up_port, tls=False)
                if a.loadgen == "originator"
                else None
            )
            try:
                url = f"http://{HOST}:{self.orig_port if orig else self.up_port}/"
                if orig:
                    pids["originator"] = orig.pid
                r = self.measure(
                    pids, lambda: self.wrk(url, a.conns, a.duration, f"{name}.r{rnd}.ka", tls=False)
                )
            finally:
                if orig:
                    orig.stop()
            r["cpu_target"] = r.pop("cpu_upstream")  # the upstream *is* the target here
            res["ka"] = r
            return res
        port = self.ports[name]
        if not port_free(port):
            res["error"] = f"port {port} already in use"
            return res
        env = self.target_env(name, port)
        proc = self._start(spec, port, env)
        try:
            if not wait_port(port, proc):
                res["error"] = f"did not listen on {port}; see run/{name}.log"
                return res
            time.sleep(0.3)
            res["check"] = chk = correctness(port)
            # The floor injects no identity (it is the relay with no proxy logic): a 200 for the
            # allowed client is all it owes; every other target must pass the whole check.
            floor_ok = name == "floor" and chk["allowed"]["status"] == 200
            if not chk["allowed"]["ok"] and not floor_ok:
                res["error"] = (
                    "allowed client did not get 200 + injected header; load tests skipped"
                )
                return res
            pids = {"target": proc.pid, "upstream": self.upstream.pid}
            phases = a.phases
            if "ka" in phases:
                if a.loadgen == "originator":
                    orig = self.start_originator(port, tls=True)
                    try:
                        pids["originator"] = orig.pid
                        self.wrk(
                            f"http://{HOST}:{self.orig_port}/",
                            a.conns,
                            1,
                            f"{name}.r{rnd}.warm",
                            tls=False,
                        )
                        r = self.measure(
                            pids,
                            lambda: self.wrk(
                                f"http://{HOST}:{self.orig_port}/",
                                a.conns,
                                a.duration,
                                f"{name}.r{rnd}.ka",
                                tls=False,
                            ),
                        )
                    finally:
                        orig.stop()
                        pids.pop("originator", None)
                else:
                    self.wrk(
                        f"https://{HOST}:{port}/", a.conns, 1, f"{name}.r{rnd}.warm"
                    )  # warm-up, 1 s
                    r = self.measure(
                        pids,
                        lambda: self.wrk(
                            f"https://{HOST}:{port}/", a.conns, a.duration, f"{name}.r{rnd}.ka"
                        ),
                    )
                r["target_us_per_req"] = (
                    round(r["cpu_target_s"] / r["requests"] * 1e6, 1) if r["requests"] else None
                )
                res["ka"] = r
            for mode in ("new", "reuse"):
                if mode in phases:
                    r = self.measure(
                        pids,
                        lambda mode=mode: self.s_time(
                            port, mode, a.hs_duration, f"{name}.r{rnd}.{mode}"
                        ),
                    )
                    r["target_us_per_conn"] = (
                        round(r["cpu_target_s"] / r["conns"] * 1e6) if r["conns"] else None
                    )
                    res[mode] = r
            # wrk with "Connection: close": one request per connection, CLOSE_CONNS in parallel.
            # close = full handshake each time (the shim drops the session);
            # close_resume = TLS 1.3 resumption.
            for ph, resume in (("close", False), ("close_resume", True)):
                if ph in phases:
                    r = self.measure(
                        pids,
                        lambda ph=ph, resume=resume: self.wrk(
                            f"https://{HOST}:{port}/",
                            a.close_conns,
                            a.hs_duration,
                            f"{name}.r{rnd}.{ph}",
                            extra=("-H", "Connection: close"),
                            resume=resume,
                        ),
                    )
                    r["target_us_per_conn"] = (
                        round(r["cpu_target_s"] / r["requests"] * 1e6) if r["requests"] else None
                    )
                    res[ph] = r
            # HTTP/2 GETs: h2load, many streams per keep-alive connection, the HTTP/1.1 upstream.
            if "h2" in phases and name not in NO_H2:
                url = f"https://{HOST}:{port}/"
                self.h2load(url, 1, f"{name}.r{rnd}.h2-warm")
                r = self.measure(pids, lambda: self.h2load(url, a.duration, f"{name}.r{rnd}.h2"))
                r["target_us_per_req"] = (
                    round(r["cpu_target_s"] / r["requests"] * 1e6, 1) if r["requests"] else None
                )
                if r["alpn"] != "h2":
                    res["error"] = f"h2load negotiated {r['alpn']!r}, not h2"
                res["h2"] = r
            if not proc.alive():
                res["error"] = "target exited during the run"
        finally:
            proc.stop()
        return res


# ----------------------------------------------------------------------------- summary
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results, targets, baseline):
    rows = {}
    for name in targets:
        rs = [r for r in results if r["target"] == name]

        def g(ph, k, rs=rs):
            return med([r.get(ph, {}).get(k) for r in rs if ph in r])

        ka = [r["ka"]["rps"] for r in rs if "ka" in r]
        rows[name] = {
            "runs": len(rs),
            "check": _check_cell(rs),
            "errors": sorted({r[k] for r in rs for k in ("error", "grpc_error") if r.get(k)}),
            "rps": g("ka", "rps"),
            "p50": g("ka", "p50_ms"),
            "p99": g("ka", "p99_ms"),
            "ka_bad": g("ka", "non2xx") or 0,
            "ka_sockerr": g("ka", "sock_errors") or 0,
            "cpu_t": g("ka", "cpu_target"),
            "us_req": g("ka", "target_us_per_req"),
            "busy": g("ka", "machine_busy"),
            "steal": g("ka", "machine_steal"),
            "other": g("ka", "cpu_other"),
            "cpu_lg": g("ka", "cpu_loadgen"),
            "cpu_up": g("ka", "cpu_upstream"),
            "hs_new": g("new", "rate"),
            "us_new": g("new", "target_us_per_conn"),
            "hs_reuse": g("reuse", "rate"),
            "reuse_frac": g("reuse", "reused_frac"),
            "close": g("close", "rps"),
            "us_close": g("close", "target_us_per_conn"),
            "cpu_t_close": g("close", "cpu_target"),
            "close_bad": (g("close", "non2xx") or 0) + (g("close", "sock_errors") or 0),
            "close_res": g("close_resume", "rps"),
            "us_close_res": g("close_resume", "target_us_per_conn"),
            "spread_rps": (min(ka), max(ka)) if ka else None,
            "h2": g("h2", "rps"),
            "us_h2": g("h2", "target_us_per_req"),
            "mean_h2": g("h2", "mean_ms"),
            "cpu_t_h2": g("h2", "cpu_target"),
            "other_h2": g("h2", "cpu_other"),
            "h2_bad": (g("h2", "non2xx") or 0) + (g("h2", "failed") or 0),
            "grpc": g("grpc", "rps"),
            "us_grpc": g("grpc", "target_us_per_req"),
            "mean_grpc": g("grpc", "mean_ms"),
            "cpu_t_grpc": g("grpc", "cpu_target"),
            "cpu_up_grpc": g("grpc", "cpu_upstream"),
            "cpu_lg_grpc": g("grpc", "cpu_loadgen"),
            "other_grpc": g("grpc", "cpu_other"),
            "grpc_bad": (g("grpc", "non2xx") or 0) + (g("grpc", "failed") or 0),
            "grpc_reached": med(
                [
                    r["grpc"]["upstream_calls"] / r["grpc"]["requests"]
                    for r in rs
                    if r.get("grpc", {}).get("requests")
                ]
            ),
        }
    # Ratios to the baseline: the median over rounds of (target / baseline measured in the same
    # round), which cancels slow drift of a shared machine better than a ratio of medians; falls
    # back to the latter.
    keys = {
        "rps": ("ka", "rps", False),
        "hs_new": ("new", "rate", False),
        "close": ("close", "rps", False),
        "close_res": ("close_resume", "rps", False),
        "us_req": ("ka", "target_us_per_req", True),
        "us_close": ("close", "target_us_per_conn", True),
        "us_new": ("new", "target_us_per_conn", True),
        "h2": ("h2", "rps", False),
        "us_h2": ("h2", "target_us_per_req", True),
        "grpc": ("grpc", "rps", False),
        "us_grpc": ("grpc", "target_us_per_req", True),
    }
    by_round = {}
    for r in results:
        by_round.setdefault(r["round"], {})[r["target"]] = r
    for name, row in rows.items():
        for k, (ph, field, inv) in keys.items():
            per = []
            for rnd in by_round.values():
                v = rnd.get(name, {}).get(ph, {}).get(field)
                b = rnd.get(baseline, {}).get(ph, {}).get(field)
                if v and b:
                    per.append(b / v if inv else v / b)
            v, b = row.get(k), (rows.get(baseline) or {}).get(k)
            row[f"ratio_{k}"] = (
                med(per) if per else ((b / v if inv else v / b) if (v and b) else None)
            )
    return rows


def _check_cell(rs):
    checks = [r[k] for r in rs for k in ("check", "check_grpc") if k in r]
    if not checks:
        return "-"
    return "ok" if all(c.get("ok") for c in checks) else "FAIL"


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, baseline):
    b = baseline
    h1 = any(
        r.get(k) is not None for r in rows.values() for k in ("rps", "hs_new", "hs_reuse", "close")
    )
    h2 = any(r.get(k) is not None for r in rows.values() for k in ("h2", "grpc"))
    out = (_table_h1(rows, b) if h1 or not h2 else []) + (_table_h2(rows, b) if h2 else [])
    notes = _notes(rows)
    return "\n".join(out) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def _table_h2(rows, b):
    out = [
        "",
        f"| target | h2 GET req/s | x {b} | µs CPU/req | x {b} (cost) | mean ms | target cores "
        f"| gRPC calls/s | x {b} | µs CPU/call | x {b} (cost) | mean ms | target cores "
        f"| gRPC upstream cores | other cores (h2, gRPC) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for n, r in rows.items():
        if r.get("h2") is None and r.get("grpc") is None:
            continue
        tag = f"{n} (ref)" if n in REFERENCE else n
        cells = [
            tag,
            fmt(r["h2"], ",.0f"),
            fmt(r["ratio_h2"], ".2f"),
            fmt(r["us_h2"], ".1f"),
            fmt(r["ratio_us_h2"], ".2f"),
            fmt(r["mean_h2"], ".2f"),
            fmt(r["cpu_t_h2"], ".2f"),
            fmt(r["grpc"], ",.0f"),
            fmt(r["ratio_grpc"], ".2f"),
            fmt(r["us_grpc"], ".1f"),
            fmt(r["ratio_us_grpc"], ".2f"),
            fmt(r["mean_grpc"], ".2f"),
            fmt(r["cpu_t_grpc"], ".2f"),
            fmt(r["cpu_up_grpc"], ".2f"),
            f"{fmt(r['other_h2'], '.2f')}, {fmt(r['other_grpc'], '.2f')}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _table_h1(rows, b):
    out = [
        f"| target | req/s | p50 ms | p99 ms | x {b} | hs/s new (s_time) | hs/s reuse (s_time) "
        f"| full hs/s (wrk close) | x {b} | resumed hs/s (wrk close) | check |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for n, r in rows.items():
        tag = f"{n} (ref)" if n in REFERENCE else n
        cells = [
            tag,
            fmt(r["rps"], ",.0f"),
            fmt(r["p50"], ".2f"),
            fmt(r["p99"], ".2f"),
            fmt(r["ratio_rps"], ".2f"),
            fmt(r["hs_new"], ".0f"),
            fmt(r["hs_reuse"], ".0f"),
            fmt(r["close"], ".0f"),
            fmt(r["ratio_close"], ".2f"),
            fmt(r["close_res"], ".0f"),
            r["check"],
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        f"| target | target cores (ka) | target µs CPU/req | x {b} (cost) "
        f"| target µs CPU/full hs (close) | x {b} (cost) | target µs CPU/hs (s_time new) "
        f"| target µs CPU/resumed hs | loadgen cores | upstream cores | other cores "
        f"| req/s min..max |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for n, r in rows.items():
        sp = r["spread_rps"]
        cells = [
            n,
            fmt(r["cpu_t"], ".2f"),
            fmt(r["us_req"], ".1f"),
            fmt(r["ratio_us_req"], ".2f"),
            fmt(r["us_close"], ".0f"),
            fmt(r["ratio_us_close"], ".2f"),
            fmt(r["us_new"], ".0f"),
            fmt(r["us_close_res"], ".0f"),
            fmt(r["cpu_lg"], ".2f"),
            fmt(r["cpu_up"], ".2f"),
            fmt(r["other"], ".2f"),
            "-" if not sp else f"{sp[0]:,.0f}..{sp[1]:,.0f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _notes(rows):
    notes = []
    for n, r in rows.items():
        if r.get("h2_bad") or r.get("grpc_bad"):
            notes.append(
                f"- {n}: median non-2xx+failed h2 requests={r['h2_bad']}, gRPC={r['grpc_bad']}"
            )
        if r.get("grpc_reached") is not None and not 0.99 <= r["grpc_reached"] <= 1.05:
            notes.append(
                f"- {n}: the upstream served {r['grpc_reached']:.3f} calls per 2xx that h2load "
                "counted (expected about 1)"
            )
        for e in r["errors"]:
            notes.append(f"- {n}: {e}")
        if r["ka_bad"] or r["ka_sockerr"] or r["close_bad"]:
            notes.append(
                f"- {n}: median non-2xx={r['ka_bad']} socket errors={r['ka_sockerr']} "
                f"(keep-alive); non-2xx+socket errors={r['close_bad']} (close)"
            )
        if r["hs_reuse"] and r["reuse_frac"] is not None and r["reuse_frac"] < 0.9:
            notes.append(
                f"- {n}: only {r['reuse_frac']:.0%} of s_time -reuse connections were resumed"
            )
        if r["other"] and r["other"] > 0.15:
            notes.append(
                f"- {n}: other processes used {r['other']:.2f} cores during keep-alive (noise)"
            )
    return notes


# ----------------------------------------------------------------------------- main
def parse_targets(specs):
    out = []
    for s in specs:
        if "=" in s:
            name, cmd = s.split("=", 1)
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise SystemExit(f"bad external target name {name!r}")
            out.append((name, cmd))
        else:
            if s != "upstream-plain" and not (BENCH / "targets" / f"{s}.sh").exists():
                raise SystemExit(
                    f"unknown target {s!r} (no targets/{s}.sh); external: NAME='command'"
                )
            out.append((s, None))
    return out


def main():
    env = os.environ.get
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "targets",
        nargs="*",
        help="target names (targets/NAME.sh), or NAME='shell command' "
        f"for an external target. Default: {' '.join(DEFAULT_TARGETS)}",
    )
    p.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "3")))
    p.add_argument(
        "--duration", type=int, default=int(env("BENCH_DURATION", "10")), help="keep-alive phase, s"
    )
    p.add_argument(
        "--hs-duration",
        type=int,
        default=int(env("BENCH_HS_DURATION", "10")),
        help="each handshake phase (new/reuse/close), s",
    )
    p.add_argument("--conns", type=int, default=int(env("BENCH_CONNS", "32")))
    p.add_argument("--close-conns", type=int, default=int(env("BENCH_CLOSE_CONNS", "32")))
    p.add_argument("--threads", type=int, default=int(env("BENCH_WRK_THREADS", "1")))
    p.add_argument(
        "--h2-conns",
        type=int,
        default=int(env("BENCH_H2_CONNS", "16")),
        help="h2/grpc phases: h2load connections",
    )
    p.add_argument(
        "--h2-streams",
        type=int,
        default=int(env("BENCH_H2_STREAMS", "10")),
        help="h2/grpc phases: concurrent streams per connection (h2load -m)",
    )
    p.add_argument(
        "--phases",
        default=env("BENCH_PHASES", "ka,new,reuse,close"),
        help="comma list of ka,new,reuse,close,close_resume,h2,grpc",
    )
    p.add_argument(
        "--loadgen",
        choices=["shim", "originator"],
        default=env("BENCH_LOADGEN", "shim"),
        help="shim: wrk + LD_PRELOAD client cert (default); "
        "originator: wrk -> haproxy -> mTLS target",
    )
    p.add_argument(
        "--pin",
        default=env("BENCH_PIN", "1/0" if (os.cpu_count() or 1) >= 2 else "none"),
        help="CPU pinning 'TARGET_CPUS/HARNESS_CPUS' (default '1/0': target on CPU 1; upstream, "
        "load generator and originator on CPU 0), or 'none'",
    )
    p.add_argument(
        "--noise-limit",
        type=float,
        default=float(env("BENCH_NOISE_LIMIT", "0.25")),
        help="cores used by other processes above which a phase is repeated",
    )
    p.add_argument("--noise-retries", type=int, default=int(env("BENCH_NOISE_RETRIES", "1")))
    p.add_argument("--baseline", default="nginx")
    p.add_argument("--out", default=env("BENCH_OUT", ""))
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS_DIR",
        help="no measuring: pool the rounds of earlier runs (results/<stamp>/) "
        "and print the tables",
    )
    a = p.parse_args()
    if a.merge:
        return merge(a.merge, a.baseline)
    a.phases = set(a.phases.split(","))
    if a.phases - ALL_PHASES:
        raise SystemExit(f"unknown phases: {sorted(a.phases - ALL_PHASES)}")
    specs = parse_targets(a.targets or DEFAULT_TARGETS)
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate target names")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(a.out) if a.out else BENCH / "results" / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    h = Harness(a, outdir)
    reap_stale(h.rundir)
    for f in h.rundir.glob("*.log"):
        f.unlink()
    h.up_port = pick_port(UPSTREAM_PORT)
    h.orig_port = pick_port(ORIGINATOR_PORT)
    if "grpc" in a.phases:
        h.grpc_port = pick_port(GRPC_UPSTREAM_PORT)
    ext = iter(range(EXTERNAL_PORT_BASE, EXTERNAL_PORT_BASE + 1000))
    h.ports = {n: pick_port(PORTS.get(n) or next(ext)) for n, c in specs if n != "upstream-plain"}

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    meta = {
        "started": stamp,
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()},
        "targets": names,
        "nproc": os.cpu_count(),
        "uname": os.uname().release,
        "versions": versions(),
    }
    results = []
    try:
        h.start_upstream()
        if h.grpc_port:
            h.start_grpc_upstream()
        log(f"[bench] results -> {outdir}")
        for rnd in range(a.runs):
            order = specs[rnd % len(specs) :] + specs[: rnd % len(specs)]  # rotate to spread drift
            for spec in order:
                log(f"[bench] round {rnd + 1}/{a.runs}: {spec[0]} ...")
                try:
                    r = h.run_target(spec, rnd)
                except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as e:
                    r = {"target": spec[0], "round": rnd, "error": f"{type(e).__name__}: {e}"}
                results.append(r)
                brief = r.get("ka", {})
                log(
                    f"[bench]   check={r.get('check', {}).get('ok')} req/s={brief.get('rps')} "
                    f"p99={brief.get('p99_ms')} new={r.get('new', {}).get('rate')} "
                    f"close={r.get('close', {}).get('rps')} {r.get('error', '')}"
                )
                (outdir / "results.json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=1)
                )
    except KeyboardInterrupt as e:
        log(f"[bench] interrupted ({e}); cleaning up")
    finally:
        Proc.stop_all()
    rows = summarize(results, names, a.baseline)
    txt = table(rows, a.baseline)
    (outdir / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (outdir / "table.md").write_text(
        f"<!-- {stamp} runs={a.runs} conns={a.conns} duration={a.duration}s "
        f"hs={a.hs_duration}s loadgen={a.loadgen} pin={a.pin or 'none'} "
        f"phases={','.join(sorted(a.phases))} h2={a.h2_conns}x{a.h2_streams} -->\n" + txt
    )
    print(txt)
    print("correctness:")
    for r in results:
        for ck, label in (("check", ""), ("check_grpc", " (gRPC)")):
            if r.get("round") != 0 or ck not in r:
                continue
            c = r[ck]
            al = c.get("allowed", {})
            print(
                f"  {r['target'] + label:23s} ok={c.get('ok')} allowed={al.get('status')} "
                f"subject={al.get('subject')!r} uri={al.get('uri')!r} "
                + " ".join(
                    f"{k}={v.get('how')}"
                    for k, v in c.items()
                    if isinstance(v, dict) and "how" in v
                )
            )
    tries = [
        ph.get("tries", 1)
        for r in results
        for ph in r.values()
        if isinstance(ph, dict) and "tries" in ph
    ]
    if any(t > 1 for t in tries):
        print(
            f"noise: {sum(t > 1 for t in tries)} of {len(tries)} phases were repeated "
            f"because other processes used > {a.noise_limit} cores"
        )
    print(f"raw outputs: {outdir}")
    return 0 if all(r["check"] in ("ok", "-") and not r["errors"] for r in rows.values()) else 1


def merge(dirs, baseline):
    results, names = [], []
    for i, d in enumerate(dirs):
        data = json.loads((Path(d) / "results.json").read_text())
        for r in data["results"]:
            r = dict(r, round=f"{i}.{r['round']}")
            results.append(r)
        names += [n for n in data["meta"]["targets"] if n not in names]
    rows = summarize(results, names, baseline)
    n_rounds = len({r["round"] for r in results})
    print(f"<!-- merged {len(dirs)} runs, {n_rounds} rounds: {' '.join(str(d) for d in dirs)} -->")
    print(table(rows, baseline))
    return 0


def versions():
    def first(argv):
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (cp.stdout + cp.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return None

    v = {
        "nginx": first(["nginx", "-v"]),
        "haproxy": first(["haproxy", "-v"]),
        "caddy": first(["caddy", "version"]),
        "wrk": first(["wrk", "-v"]),
        "h2load": first(["h2load", "--version"]),
        "openssl": first(["openssl", "version"]),
        "python": sys.version.split()[0],
    }
    try:
        import aiohttp
        import uvloop

        v.update(aiohttp=aiohttp.__version__, uvloop=uvloop.__version__)
    except ImportError:
        pass
    try:
        import grpc

        v["grpcio"] = grpc.__version__
    except ImportError:
        pass
    return v


if __name__ == "__main__":
    sys.exit(main())
