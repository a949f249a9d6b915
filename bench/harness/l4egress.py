#!/usr/bin/env python3
"""The l4 and egress phases: mtls-proxy's TCP mode and its egress client beside HAProxy, nginx
and a bare uvloop relay, as ratios measured in one run (README.md, "l4 and egress").

  l4      TLS in, plain TCP out: `serve --mode tcp` vs HAProxy `mode tcp` (`verify required`)
          vs tools/floor_relay.py --tls-in, all in front of tools/tcp_backend
  egress  plain in, TLS out:
          http  `client --http` vs nginx (`proxy_pass https://` + proxy_ssl_*, keepalive
                upstream), to a fixed mTLS origin: nginx with ssl_verify_client on, 64-byte body
          tcp   `client` (L4) vs HAProxy `mode tcp` with `server ... ssl crt ... verify required`
                vs floor_relay.py --tls-out, to a fixed mTLS origin: HAProxy `mode tcp` ->
                tcp_backend (the l4 phase's HAProxy configuration)

For each target and round: a correctness check, then
  conns  wrk -cCONNS with `Connection: close` for DURATION s (1 s warm-up first): each request
         is a new connection and one small round trip through the relay; over mTLS (l4) wrk
         sends client-a's certificate through the LD_PRELOAD shim with WRK_TLS_RESUME=0, so
         every connection is a full handshake; egress targets make their own upstream
         connections (and may resume their TLS sessions: HAProxy and mtls-proxy do)
  bulk1  one connection, BULK MiB one way (tools/bulk_client.py --mode sink)
  bulk2  one connection, BULK MiB each way at once (--mode echo)
  ka     (egress http only) wrk -cCONNS keep-alive GETs for DURATION s, after 1 s of warm-up
CPU of the target's process tree comes from /proc/PID/stat around each measurement; RSS from
/proc/PID/status (VmRSS after the check, VmHWM at the end of the round). Targets run on the
target CPU, everything else (backend, origins, load) on the harness CPU.
"""

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from bench import (
    BENCH,
    HOST,
    PKI,
    SHIM,
    CpuWindow,
    Proc,
    log,
    med,
    parse_wrk,
    pick_port,
    reap_stale,
    wait_port,
)

TOOLS = BENCH / "tools"
TOP_FRAMES = BENCH.parent / "top_frames.py"  # bench/top_frames.py
PY = str(BENCH / ".venv" / "bin" / "python")
GIB = 1 << 30
CLIENT_PEM = PKI / "client-a-full.pem"  # chain + key, HAProxy's form
CLIENT_CHAIN, CLIENT_KEY = PKI / "client-a-chain.pem", PKI / "client-a.key"
ROOT = PKI / "root.crt"
SERVER_CHAIN, SERVER_KEY = PKI / "server-chain.pem", PKI / "server.key"
SERVER_PEM, CLIENT_CA = PKI / "server-full.pem", PKI / "client-ca.pem"
VERIFY = "sni str(localhost) verifyhost localhost"  # HAProxy: the name sent and checked
BASELINE = {"l4": "haproxy", "egress-http": "nginx", "egress-tcp": "haproxy"}


# ----------------------------------------------------------------------------- configurations
def haproxy_tls_in(d, port, upstream_port):
    """HAProxy terminating mTLS in mode tcp: verify required + the same CN rule as the others."""
    cfg = d / "haproxy.cfg"
    cfg.write_text(f"""global
    nbthread 1
    maxconn 8192
    tune.ssl.cachesize 20000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend mtls
    bind {HOST}:{port} ssl crt {SERVER_PEM} ca-file {CLIENT_CA} verify required
    tcp-request session reject unless {{ ssl_c_s_dn(CN) -m str client-a }}
    default_backend be
backend be
    server up {HOST}:{upstream_port}
""")
    return ["haproxy", "-db", "-f", str(cfg)]


def haproxy_tls_out(d, port, origin_port):
    """HAProxy as a TLS-originating mode tcp relay: plain in, our client certificate out."""
    cfg = d / "haproxy.cfg"
    cfg.write_text(f"""global
    nbthread 1
    maxconn 8192
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend plain
    bind {HOST}:{port}
    default_backend be
backend be
    server s1 {HOST}:{origin_port} ssl crt {CLIENT_PEM} ca-file {ROOT} verify required {VERIFY}
""")
    return ["haproxy", "-db", "-f", str(cfg)]


def nginx_conf(d, http_block):
    conf = d / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server_tokens off;
{http_block}
}}
""")
    return ["nginx", "-p", str(d), "-c", str(conf)]


def nginx_origin(d, port):
    """The egress http origin: mTLS (ssl_verify_client on), a fixed 64-byte body, and the
    client certificate's subject echoed as X-Client-Subject."""
    body = "origin-ok 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"  # + "\n" = 64 bytes
    return nginx_conf(
        d,
        f"""    server {{
        listen {HOST}:{port} ssl reuseport backlog=4096;
        ssl_certificate {SERVER_CHAIN};
        ssl_certificate_key {SERVER_KEY};
        ssl_client_certificate {CLIENT_CA};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_session_cache shared:SSL:10m;
        location / {{
            default_type text/plain;
            add_header X-Client-Subject $ssl_client_s_dn always;
            return 200 "{body}\\n";
        }}
    }}""",
    )


def nginx_egress(d, port, origin_port):
    """nginx as an mTLS-originating HTTP proxy with pooled keep-alive upstream connections."""
    return nginx_conf(
        d,
        f"""    upstream origin {{
        server {HOST}:{origin_port};
        keepalive 64;
    }}
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        location / {{
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {CLIENT_CHAIN};
            proxy_ssl_certificate_key {CLIENT_KEY};
            proxy_ssl_trusted_certificate {ROOT};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_server_name on;
            proxy_ssl_name localhost;
        }}
    }}""",
    )


def floor_in(port, upstream_port):
    return [
        PY,
        str(TOOLS / "floor_relay.py"),
        "--listen",
        str(port),
        "--upstream",
        f"{HOST}:{upstream_port}",
        "--allow-cn",
        "client-a",
        "--tls-in",
        str(SERVER_CHAIN),
        str(SERVER_KEY),
        str(CLIENT_CA),
    ]


def floor_out(port, origin_port):
    return [
        PY,
        str(TOOLS / "floor_relay.py"),
        "--listen",
        str(port),
        "--upstream",
        f"{HOST}:{origin_port}",
        "--server-name",
        "localhost",
        "--tls-out",
        str(CLIENT_CHAIN),
        str(CLIENT_KEY),
        str(ROOT),
    ]


def mtls_serve_tcp(proxy, port, upstream_port):
    """serve --mode tcp in its default configuration (allow-list, access log, admin on)."""
    return [
        *proxy,
        "serve",
        "--mode",
        "tcp",
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"tcp://{HOST}:{upstream_port}",
        "--cert",
        str(SERVER_CHAIN),
        "--key",
        str(SERVER_KEY),
        "--cacert",
        str(CLIENT_CA),
        "--allow-cn",
        "client-a",
        "--admin",
        f"{HOST}:0",
    ]


def mtls_client(proxy, port, origin_port, http):
    """client (L4, or --http) in its default configuration (access log and admin on)."""
    return [
        *proxy,
        "client",
        "--listen",
        f"{HOST}:{port}",
        "--target",
        f"{HOST}:{origin_port}",
        "--override-server-name",
        "localhost",
        "--cert",
        str(CLIENT_CHAIN),
        "--key",
        str(CLIENT_KEY),
        "--cacert",
        str(ROOT),
        "--admin",
        f"{HOST}:0",
        *(["--http"] if http else []),
    ]


# ----------------------------------------------------------------------------- checks
def tls_ctx(cert=None, key=None):
    ctx = ssl.create_default_context(cafile=str(ROOT))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def round_trip(port, ctx=None, payload=b"E" + b"x" * 63):
    """Send payload to tcp_backend's echo through the relay; True if it came back whole."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as raw:
            s = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            return got == payload
    except (OSError, ssl.SSLError):
        return False


def check_l4(port):
    res = {
        "allowed": round_trip(port, tls_ctx(CLIENT_CHAIN, CLIENT_KEY)),
        "client_b_refused": not round_trip(
            port, tls_ctx(PKI / "client-b-chain.pem", PKI / "client-b.key")
        ),
        "no_cert_refused": not round_trip(port, tls_ctx()),
        "rogue_refused": not round_trip(
            port, tls_ctx(PKI / "client-rogue.crt", PKI / "client-rogue.key")
        ),
    }
    res["ok"] = all(res.values())
    return res


def check_egress_tcp(port):
    ok = round_trip(port)
    return {"allowed": ok, "ok": ok}


def check_egress_http(port):
    """A plain GET through the egress proxy: 200, the 64-byte body, and the origin saw
    client-a's certificate."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/check")
        r = conn.getresponse()
        body = r.read()
        subj = r.getheader("X-Client-Subject") or ""
        ok = r.status == 200 and len(body) == 64 and "CN=client-a" in subj
        return {"allowed": ok, "status": r.status, "subject": subj, "ok": ok}
    except (OSError, http.client.HTTPException) as e:
        return {"allowed": False, "error": str(e), "ok": False}
    finally:
        conn.close()


# ----------------------------------------------------------------------------- helpers
def proc_status(pid, field):
    """VmRSS / VmHWM of pid in MB (the target's main process)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class Run:
    def __init__(self, a, outdir):
        self.a = a
        self.out = outdir
        self.raw = outdir / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.rundir = BENCH / "run" / "l4egress"
        self.rundir.mkdir(parents=True, exist_ok=True)
        pin = "" if a.pin in ("", "none") else a.pin
        self.pin_target, self.pin_harness = pin.split("/") if pin else (None, None)
        self.proxy = shlex.split(a.proxy)

    def load(self, argv):
        return (["taskset", "-c", self.pin_harness] if self.pin_harness else []) + argv

    def run(self, argv, timeout, env=None, tag=None):
        t0 = time.monotonic()
        try:
            cp = subprocess.run(
                self.load(argv),
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
            out, rc = cp.stdout + cp.stderr, cp.returncode
        except subprocess.TimeoutExpired:
            out, rc = "# TIMEOUT", -9
        if tag:
            (self.raw / f"{tag}.txt").write_text(
                f"$ {shlex.join(argv)}\n# rc={rc} wall={time.monotonic() - t0:.2f}s\n{out}"
            )
        return out, rc

    def start(self, name, argv, cpus, port):
        d = self.rundir / name
        d.mkdir(exist_ok=True)
        p = Proc(name, argv, dict(os.environ), self.rundir, cpus)
        if not wait_port(port, p):
            p.stop()
            raise RuntimeError(f"{name} did not start; see {self.rundir}/{name}.log")
        return p

    def measure(self, pid, fn, phase, tag):
        """fn() inside a CPU window of the target's process tree; repeated (the quieter try
        kept) when other processes used more than --noise-limit cores meanwhile. With
        --profile PHASE, py-spy samples the target during that phase (raw/profile-TAG.txt)."""
        best = None
        for attempt in range(self.a.noise_retries + 1):
            spy = self.py_spy(pid, tag) if phase == self.a.profile else None
            with CpuWindow({"target": pid}) as w:
                r = fn()
            if spy:
                spy.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
                spy.wait(timeout=30)
                stacks = self.raw / f"profile-{tag}.txt"
                log(f"[l4egress]   py-spy samples: {stacks}")
                if TOP_FRAMES.exists():  # not in a copy of the harness alone
                    subprocess.run([sys.executable, str(TOP_FRAMES), str(stacks)], check=False)
            r.update(w.as_dict(), cpu_target_s=w.cpu["target"], tries=attempt + 1)
            if best is None or r["cpu_other"] < best["cpu_other"]:
                best = r
            if r["cpu_other"] <= self.a.noise_limit or attempt == self.a.noise_retries:
                break
            log(f"[l4egress]   noisy ({r['cpu_other']:.2f} other cores), repeating")
            time.sleep(1)
        return best

    def py_spy(self, pid, tag):
        out = self.raw / f"profile-{tag}.txt"
        argv = [self.a.py_spy, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw",
                "--output", str(out), "--nonblocking"]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wrk(self, url, tag, close, tls):
        env = None
        if tls:
            env = dict(
                os.environ,
                LD_PRELOAD=str(SHIM),
                WRK_CLIENT_CERT=str(CLIENT_CHAIN),
                WRK_CLIENT_KEY=str(CLIENT_KEY),
                WRK_TLS_RESUME="0",
            )
        extra = ["-H", "Connection: close"] if close else []
        argv = [
            "wrk",
            "-t1",
            f"-c{self.a.conns}",
            f"-d{self.a.duration}s",
            "--latency",
            "--timeout",
            "5s",
            *extra,
            url,
        ]
        self.run([*argv[:3], "-d1s", *argv[4:]], 40, env)  # warm-up
        out, rc = self.run(argv, self.a.duration + 30, env, tag)
        r = parse_wrk(out)
        r["rc"] = rc
        return r

    def bulk(self, port, mode, tls, tag):
        argv = [
            PY,
            str(TOOLS / "bulk_client.py"),
            "--port",
            str(port),
            "--mode",
            mode,
            "--size",
            str(self.a.bulk_mib << 20),
        ]
        if tls:
            argv += ["--tls", str(CLIENT_CHAIN), str(CLIENT_KEY), str(ROOT)]
        out, rc = self.run(argv, 180, None, tag)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"ok": False, "error": out[-300:]}
        r["rc"] = rc
        return r

    # -- one target of one group, one round
    def target(self, group, name, argv, port, rnd):
        res = {"group": group, "target": name, "round": rnd}
        p = self.start(f"{group}-{name}", argv, self.pin_target, port)
        try:
            time.sleep(0.3)
            res["check"] = {
                "l4": check_l4,
                "egress-tcp": check_egress_tcp,
                "egress-http": check_egress_http,
            }[group](port)
            res["rss_idle_mb"] = proc_status(p.pid, "VmRSS")
            if not res["check"]["ok"]:
                log(f"[l4egress]   {name}: check failed {res['check']}; no load")
                return res
            tls = group == "l4"
            scheme = "https" if tls else "http"
            tag = f"{group}-{name}-r{rnd}"
            if group == "egress-http":
                res["ka"] = self.measure(
                    p.pid,
                    lambda: self.wrk(f"http://{HOST}:{port}/", f"{tag}-ka", False, False),
                    "ka",
                    tag,
                )
                self._per(res["ka"], "requests", "us_per_req")
            else:
                url = f"{scheme}://{HOST}:{port}/"
                res["conns"] = self.measure(
                    p.pid, lambda: self.wrk(url, f"{tag}-conns", True, tls), "conns", tag
                )
                self._per(res["conns"], "requests", "us_per_conn")
                for ph, mode, factor in (("bulk1", "sink", 1), ("bulk2", "echo", 2)):
                    r = self.measure(
                        p.pid, lambda m=mode: self.bulk(port, m, tls, f"{tag}-{m}"), ph, tag
                    )
                    if r.get("ok") and r.get("seconds"):
                        moved = r["bytes"] * factor  # bytes through the relay, both ways summed
                        r["mb_s"] = round(moved / r["seconds"] / 1e6, 1)
                        r["cpu_s_per_gib"] = round(r["cpu_target_s"] / (moved / GIB), 3)
                    res[ph] = r
            res["rss_peak_mb"] = proc_status(p.pid, "VmHWM")
        finally:
            p.stop()
        return res

    @staticmethod
    def _per(r, count, key):
        n = r.get(count) or 0
        r[key] = round(r["cpu_target_s"] * 1e6 / n, 1) if n else None
        if r.get("non2xx") or r.get("sock_errors"):
            r["note"] = f"non2xx={r.get('non2xx')} sock_errors={r.get('sock_errors')}"


# ----------------------------------------------------------------------------- summary
METRICS = {  # (phase, key, higher is better)
    "conns_s": ("conns", "rps", True),
    "us_conn": ("conns", "us_per_conn", False),
    "b1_mbs": ("bulk1", "mb_s", True),
    "b1_cpu": ("bulk1", "cpu_s_per_gib", False),
    "b2_mbs": ("bulk2", "mb_s", True),
    "b2_cpu": ("bulk2", "cpu_s_per_gib", False),
    "ka_rps": ("ka", "rps", True),
    "ka_us": ("ka", "us_per_req", False),
    "ka_p99": ("ka", "p99_ms", False),
}


def value(r, metric):
    ph, key, _ = METRICS[metric]
    return (r.get(ph) or {}).get(key)


def summarize(results):
    rows = {}
    for r in results:
        row = rows.setdefault((r["group"], r["target"]), {"rounds": [], "ok": True})
        row["rounds"].append(r)
        row["ok"] &= bool(r.get("check", {}).get("ok"))
    for (group, _name), row in rows.items():
        base = rows.get((group, BASELINE[group]))
        for m, (_, _, higher) in METRICS.items():
            row[m] = med([value(r, m) for r in row["rounds"]])
            ratios = []
            for r in row["rounds"]:
                b = (
                    next((x for x in base["rounds"] if x["round"] == r["round"]), None)
                    if base
                    else None
                )
                v, bv = value(r, m), value(b, m) if b else None
                if v and bv:
                    ratios.append(v / bv if higher else bv / v)  # > 1: better than the baseline
            row["x_" + m] = round(med(ratios), 2) if ratios else None
        row["rss_idle_mb"] = med([r.get("rss_idle_mb") for r in row["rounds"]])
        row["rss_peak_mb"] = med([r.get("rss_peak_mb") for r in row["rounds"]])
        row["other"] = med(
            [
                max(
                    (r.get(ph) or {}).get("cpu_other", 0)
                    for ph in ("conns", "bulk1", "bulk2", "ka")
                )
                for r in row["rounds"]
            ]
        )
    for row in rows.values():
        del row["rounds"]
    return rows


def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


TCP_COLUMNS = [  # (header, row key, format)
    ("conns/s", "conns_s", ",.0f"),
    ("x", "x_conns_s", ".2f"),
    ("µs CPU/conn", "us_conn", ",.0f"),
    ("x (cost)", "x_us_conn", ".2f"),
    ("1-way MB/s", "b1_mbs", ",.0f"),
    ("x", "x_b1_mbs", ".2f"),
    ("CPU s/GiB", "b1_cpu", ".2f"),
    ("x (cost)", "x_b1_cpu", ".2f"),
    ("2-way MB/s", "b2_mbs", ",.0f"),
    ("x", "x_b2_mbs", ".2f"),
    ("CPU s/GiB", "b2_cpu", ".2f"),
    ("x (cost)", "x_b2_cpu", ".2f"),
]
HTTP_COLUMNS = [
    ("req/s", "ka_rps", ",.0f"),
    ("x", "x_ka_rps", ".2f"),
    ("µs CPU/req", "ka_us", ".1f"),
    ("x (cost)", "x_ka_us", ".2f"),
    ("p99 ms", "ka_p99", ".2f"),
]
COMMON = [
    ("RSS idle MB", "rss_idle_mb", ".0f"),
    ("RSS peak MB", "rss_peak_mb", ".0f"),
    ("other cores", "other", ".2f"),
]
TITLES = {
    "l4": "l4: mTLS in, plain TCP out (serve --mode tcp; x haproxy)",
    "egress-tcp": "egress tcp: plain in, mTLS out (client, L4 mode; x haproxy)",
    "egress-http": "egress http: plain HTTP in, mTLS out, keep-alive (client --http; x nginx)",
}


def tables(rows, runs):
    out = []
    for group in ("l4", "egress-tcp", "egress-http"):
        g = [(n, r) for (gr, n), r in rows.items() if gr == group]
        if not g:
            continue
        cols = (HTTP_COLUMNS if group == "egress-http" else TCP_COLUMNS) + COMMON
        out += [
            f"### {TITLES[group]}",
            "",
            "| target | " + " | ".join(h for h, _, _ in cols) + " | check |",
            "|---|" + "--:|" * len(cols) + "---|",
        ]
        for n, r in g:
            cells = " | ".join(fmt(r[k], f) for _, k, f in cols)
            out.append(f"| {n} | {cells} | {'ok' if r['ok'] else 'FAIL'} |")
        out.append("")
    out.append(
        f"Medians over {runs} rounds; every `x` is the per-round ratio to the group's "
        "baseline, then the median (> 1: better than the baseline, for costs too)."
    )
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main
def main():
    env = os.environ.get
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phases", default="l4,egress", help="comma list of l4,egress")
    p.add_argument(
        "--proxy",
        default=env("BENCH_MTLS_PROXY", "mtls-proxy"),
        help="command that runs mtls-proxy (words split like a shell)",
    )
    p.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "3")))
    p.add_argument(
        "--duration", type=int, default=int(env("BENCH_L4_DURATION", "5")), help="each wrk phase, s"
    )
    p.add_argument("--conns", type=int, default=int(env("BENCH_CONNS", "32")))
    p.add_argument("--bulk-mib", type=int, default=int(env("BENCH_BULK_MIB", "256")))
    p.add_argument(
        "--pin", default=env("BENCH_PIN", "1/0" if (os.cpu_count() or 1) >= 2 else "none")
    )
    p.add_argument("--noise-limit", type=float, default=float(env("BENCH_NOISE_LIMIT", "0.25")))
    p.add_argument("--noise-retries", type=int, default=int(env("BENCH_NOISE_RETRIES", "0")))
    p.add_argument("--out", default="")
    p.add_argument("--only", help="comma list of GROUP/TARGET, e.g. egress-http/mtls-proxy")
    p.add_argument("--profile", help="py-spy the target during this phase: conns|bulk1|bulk2|ka")
    p.add_argument("--py-spy", default="py-spy", help="the py-spy executable (--profile)")
    a, ignored = p.parse_known_args()  # bench/run.sh passes the harness's options too
    if ignored:
        log(f"[l4egress] ignoring {' '.join(ignored)} (options of bench.py)")
    phases = set(a.phases.split(","))
    if not phases or phases - {"l4", "egress"}:
        raise SystemExit(f"l4egress.py: unknown phases {sorted(phases - {'l4', 'egress'})}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(a.out) if a.out else BENCH / "results" / f"l4egress-{stamp}"
    outdir.mkdir(parents=True, exist_ok=True)
    run = Run(a, outdir)
    reap_stale(run.rundir)

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    backend_port, origin_tcp, origin_http = pick_port(18500), pick_port(18501), pick_port(18502)
    port = {}
    groups = []  # (group, name, argv builder)
    if "l4" in phases:
        for name, build in (
            ("haproxy", lambda d, pt: haproxy_tls_in(d, pt, backend_port)),
            ("floor", lambda d, pt: floor_in(pt, backend_port)),
            ("mtls-proxy", lambda d, pt: mtls_serve_tcp(run.proxy, pt, backend_port)),
        ):
            groups.append(("l4", name, build))
    if "egress" in phases:
        for name, build in (
            ("nginx", lambda d, pt: nginx_egress(d, pt, origin_http)),
            ("mtls-proxy", lambda d, pt: mtls_client(run.proxy, pt, origin_http, True)),
        ):
            groups.append(("egress-http", name, build))
        for name, build in (
            ("haproxy", lambda d, pt: haproxy_tls_out(d, pt, origin_tcp)),
            ("floor", lambda d, pt: floor_out(pt, origin_tcp)),
            ("mtls-proxy", lambda d, pt: mtls_client(run.proxy, pt, origin_tcp, False)),
        ):
            groups.append(("egress-tcp", name, build))
    if a.only:
        groups = [x for x in groups if f"{x[0]}/{x[1]}" in a.only.split(",")]
    for i, (g, n, _) in enumerate(groups):
        port[(g, n)] = pick_port(18510 + i)

    meta = {"started": stamp, "args": vars(a), "nproc": os.cpu_count(), "uname": os.uname().release}
    results = []
    t_start = time.monotonic()
    try:
        h = run.pin_harness
        run.start("backend", [str(TOOLS / "tcp_backend"), str(backend_port)], h, backend_port)
        if "egress" in phases:
            d = run.rundir / "origin-tcp"
            d.mkdir(exist_ok=True)
            run.start("origin-tcp", haproxy_tls_in(d, origin_tcp, backend_port), h, origin_tcp)
            d = run.rundir / "origin-http"
            d.mkdir(exist_ok=True)
            run.start("origin-http", nginx_origin(d, origin_http), h, origin_http)
        log(f"[bench] results -> {outdir}")
        for rnd in range(a.runs):
            order = groups[rnd % len(groups) :] + groups[: rnd % len(groups)]  # spread drift
            for g, n, build in order:
                d = run.rundir / f"{g}-{n}"
                d.mkdir(exist_ok=True)
                log(f"[l4egress] round {rnd + 1}/{a.runs}: {g} {n} ...")
                try:
                    r = run.target(g, n, build(d, port[(g, n)]), port[(g, n)], rnd)
                except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as e:
                    r = {"group": g, "target": n, "round": rnd, "error": f"{type(e).__name__}: {e}"}
                results.append(r)
                brief = {k: value(r, k) for k in ("conns_s", "b1_mbs", "b2_mbs", "ka_rps")}
                log(
                    f"[l4egress]   check={r.get('check', {}).get('ok')} "
                    + " ".join(f"{k}={v}" for k, v in brief.items() if v is not None)
                    + f" {r.get('error', '')}"
                )
                (outdir / "results.json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=1)
                )
    except KeyboardInterrupt as e:
        log(f"[l4egress] interrupted ({e}); cleaning up")
    finally:
        Proc.stop_all()
    rows = summarize(results)
    txt = tables(rows, a.runs)
    meta["wall_s"] = round(time.monotonic() - t_start)
    (outdir / "summary.json").write_text(
        json.dumps({"meta": meta, "rows": {f"{g} {n}": r for (g, n), r in rows.items()}}, indent=1)
    )
    (outdir / "table.md").write_text(
        f"<!-- l4egress {stamp} runs={a.runs} conns={a.conns} duration={a.duration}s "
        f"bulk={a.bulk_mib}MiB pin={a.pin} phases={a.phases} wall={meta['wall_s']}s -->\n" + txt
    )
    print(txt)
    print(f"[bench] results -> {outdir}")
    return 0 if rows and all(r["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
