"""Send one stream through the proxy and judge what the upstream acted on against the proxy's log.

Rules (the oracle), for every stream plus the sentinel request that follows it:
1. Every request an upstream acted on is one the proxy logged as allowed, with the same method,
   path (query excluded) and body length (multisets). A bodiless request may be seen twice: the
   proxy retries it once on a pooled connection the upstream reset.
2. The route the proxy applied (its access record's ``rule``) is the route of the path the
   upstream acted on (Tomcat: ``getServletPath() + getPathInfo()``).
3. Identity and forwarding headers are the proxy's own: the upstream sees exactly the identity
   and forwarding names of a clean request (names compared lower-cased with ``_`` as ``-``), with
   the same values (except per-connection ones), and none of them contains ``forged``.
4. A request the proxy logged as answered 200 by the upstream was acted on by it (else the
   response belonged to another request: a desynchronized connection).
5. The proxy never sends bytes the strict parser or h11 refuses.
6. Once the proxy closed the client connection after an answer, nothing more went upstream: a
   request it logged after the client's last complete answer was not forwarded.
A sentinel ``GET /__sync/N`` on a fresh connection follows every stream: it reuses the pooled
upstream connection, so a desync left behind shows in this example, not in a later one.
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mtls_proxy.core.headers import IDENTITY_NAMES, PROXY_SET
from tests.fuzz.streams import FORGED, Stream
from tests.fuzz.upstreams import Acted, Recorder
from tests.helpers import Proxy

IDLE_S = 0.5  # no byte for this long and nothing in flight: the proxy waits for more input
PATIENCE_S = 3.0  # how long to wait for in-flight work (upstream acted, proxy not logged yet)
_IDENTITY = frozenset(n.decode() for n in IDENTITY_NAMES)
_PROXY_SET = frozenset(n.decode() for n in PROXY_SET)
_PER_CONNECTION = frozenset({"ssl-session-id", "x-forwarded-host"})
# Identity and forwarding families: only the proxy may set a header of these (rule 3).
_WATCHED_PREFIXES = ("x-forwarded-", "x-original-", "x-rewrite-", "x-client-", "ssl-")
_WATCHED = _IDENTITY | _PROXY_SET | {"true-client-ip", "x-client-ip", "x-cluster-client-ip"}


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def exact_name(name: str) -> bool:
    """An identity or forwarding header (rule 3): only the proxy's own may reach the upstream."""
    n = norm(name)
    return n in _WATCHED or n.startswith(_WATCHED_PREFIXES)


def path_class(path: str) -> str:
    """Which route of the fuzzing policy a path falls under."""
    for prefix in ("/admin", "/public"):
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "(top level)"


def rule_class(rule: object) -> str:
    """The route the proxy applied, from an access record's rule ('route * /public: uri=...')."""
    text = str(rule or "")
    return text.split(":", 1)[0].split(" ")[2] if text.startswith("route ") else "(top level)"


@dataclass(repr=False)
class Target:
    """One upstream behind one proxy, started once for tests/fuzz."""

    kind: str
    proxy: Proxy
    upstream: Recorder
    ctx: ssl.SSLContext
    errors: Callable[[], list[str]] = list  # the upstream's parse errors (strict, h11)
    baseline: tuple[tuple[str, str], ...] = ()
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __repr__(self) -> str:
        return f"<{self.kind} upstream behind the proxy on port {self.proxy.port}>"

    def _repr_pretty_(self, p: object, cycle: bool) -> None:  # Hypothesis's printer
        p.text(repr(self))  # type: ignore[attr-defined]

    def access(self, start: int) -> list[dict[str, object]]:
        out = []
        for line in self.proxy.logs[start:]:
            if '"msg": "access"' in line:
                out.append(json.loads(line))
        return out

    def connect(self, timeout: float) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=timeout)
        s = self.ctx.wrap_socket(raw, server_hostname="localhost")
        s.settimeout(timeout)
        return s


@dataclass
class Outcome:
    stream: Stream
    received: bytes
    ended: str
    records: list[dict[str, object]]
    acted: list[Acted]
    errors: list[str]
    sentinel: str


def _responses(buf: bytes, heads: tuple[bool, ...]) -> int:
    """How many complete final responses *buf* holds (1xx skipped)."""
    n = pos = 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return n
        lines = buf[pos:end].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ")[1])
        except (IndexError, ValueError):
            return n
        fields = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])
        }
        pos = end + 4
        if 100 <= status < 200:
            continue
        if (n < len(heads) and heads[n]) or status in (204, 304):
            pass
        elif b"content-length" in fields:
            pos += int(fields[b"content-length"])
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return n
                size = int(buf[pos:eol].split(b";")[0], 16)
                pos = eol + 2 + size + 2
                if size == 0:
                    break
        else:
            return n  # delimited by the close
        if pos > len(buf):
            return n
        n += 1


def _exchange(t: Target, stream: Stream, in_flight: Callable[[], bool]) -> tuple[bytes, str]:
    """Write the stream; read until every response came, the proxy closed, or it went idle."""
    buf = b""
    with t.connect(IDLE_S) as s:
        for i, w in enumerate(stream.writes):
            if i:
                time.sleep(0.003)  # separate reads at the proxy
            try:
                s.sendall(w)
            except OSError:
                break  # the proxy closed: read what it said
        patience = time.monotonic() + PATIENCE_S
        while True:
            done = _responses(buf, stream.heads) >= len(stream.heads)
            s.settimeout(0.05 if done else IDLE_S)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if in_flight() and time.monotonic() < patience:
                    continue
                return buf, "all answered" if done else "idle"
            except OSError as exc:
                return buf, f"reset ({type(exc).__name__})"
            if not chunk:
                return buf, "closed by the proxy"
            buf += chunk


def _sync(t: Target, log_start: int) -> str:
    """A sentinel request; return once the proxy logged it and the upstream is quiet."""
    path = f"/__sync/{next(t.counter)}"
    try:
        with t.connect(5) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            while s.recv(65536):
                pass
    except OSError:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
        r.get("path") == path for r in t.access(log_start)
    ):
        time.sleep(0.005)
    n = len(t.upstream.records())
    while True:
        time.sleep(0.02)
        m = len(t.upstream.records())
        if m == n or time.monotonic() > deadline:
            return path
        n = m


def run(t: Target, stream: Stream) -> Outcome:
    log0, up0, err0 = len(t.proxy.logs), len(t.upstream.records()), len(t.errors())

    def in_flight() -> bool:
        allowed = [r for r in t.access(log0) if r.get("decision") != "deny"]
        return len(t.upstream.records()) - up0 > len(allowed)

    received, ended = _exchange(t, stream, in_flight)
    sentinel = _sync(t, log0)
    return Outcome(
        stream,
        received,
        ended,
        t.access(log0),
        t.upstream.records()[up0:],
        t.errors()[err0:],
        sentinel,
    )


Key = tuple[str, str, int]  # method, path without the query, body length


def _key(method: object, path: object, body: object) -> Key:
    return str(method), str(path).split("?", 1)[0], int(body)  # type: ignore[call-overload]


def _accounting(o: Outcome) -> tuple[list[str], dict[Key, object]]:
    """Rules 1 and 4; also the rule each allowed request was decided by."""
    out: list[str] = []
    allowed: Counter[Key] = Counter()
    answered: Counter[Key] = Counter()
    denied: Counter[Key] = Counter()
    rules: dict[Key, object] = {}
    for r in o.records:
        key = _key(r["method"], r["path"], r["bytes_in"])
        if r.get("decision") == "deny":
            denied[key] += 1
            continue
        allowed[key] += 1
        rules[key] = r.get("rule")
        if r.get("upstream_status") == 200 and key[1] != "*":
            answered[key] += 1
    seen = Counter(_key(a.method, a.target, a.body_len) for a in o.acted)
    for key, n in seen.items():
        if n > allowed[key] * (2 if key[2] == 0 else 1):
            why = (
                f"the proxy DENIED it ({denied[key]}x)"
                if denied[key]
                else f"the proxy logged it allowed {allowed[key]}x"
                if allowed[key]
                else "the proxy never logged it"
            )
            out.append(f"upstream acted {n}x on {key[0]} {key[1]!r} body={key[2]}: {why}")
    for key, n in answered.items():
        if seen[key] < n:
            out.append(
                f"the proxy logged {n} upstream 200(s) for {key[0]} {key[1]!r} body={key[2]} "
                f"but the upstream acted on it {seen[key]}x (a response to another request?)"
            )
    return out, rules


def _each_request(t: Target, a: Acted, rule: object, known: bool) -> list[str]:
    """Rules 2 and 3 for one request the upstream acted on."""
    out: list[str] = []
    decided, acted = rule_class(rule), path_class(a.path)
    if known and decided != acted and "/admin" in (decided, acted):
        out.append(
            f"route bypass: the proxy applied {decided} to {a.target!r} "
            f"but the upstream acted on path {a.path!r} ({acted})"
        )
    mine = Counter(norm(k) for k, _ in a.headers if exact_name(k))
    theirs = Counter(k for k, _ in t.baseline)
    if mine != theirs:
        out.append(
            f"{a.method} {a.target!r}: identity/forwarding headers are not the proxy's own: "
            f"extra {sorted((mine - theirs).elements())}, "
            f"missing {sorted((theirs - mine).elements())}"
        )
    else:
        values = {(norm(k), v) for k, v in a.headers if exact_name(k)}
        changed = sorted(
            k for k, v in t.baseline if k not in _PER_CONNECTION and (k, v) not in values
        )
        if changed:
            out.append(f"{a.method} {a.target!r}: identity header values changed: {changed}")
    out.extend(
        f"{a.method} {a.target!r}: the client's {k}: {v!r} reached the upstream"
        for k, v in a.headers
        if exact_name(k) and FORGED in v.lower()
    )
    return out


def violations(t: Target, o: Outcome) -> list[str]:
    """Every broken rule (see the module docstring), as sentences."""
    out, rules = _accounting(o)
    for a in o.acted:
        key = _key(a.method, a.target, a.body_len)
        out += _each_request(t, a, rules.get(key), key in rules)
    out += [f"the {t.kind} upstream refused the proxy's bytes: {e}" for e in o.errors]  # rule 5
    if o.ended == "closed by the proxy" or o.ended.startswith("reset"):  # rule 6
        mine = [r for r in o.records if r["path"] != o.sentinel]
        answers = _responses(o.received, tuple(r["method"] == "HEAD" for r in mine))
        out += [
            f"{r['method']} {r['path']!r} was forwarded (upstream answered {r['upstream_status']})"
            " after the proxy's last answer on a connection it closed"
            for r in mine[answers:]
            if r.get("upstream_status") and not r.get("aborted")
        ]
    return out


def report(t: Target, o: Outcome, found: list[str]) -> str:
    """Everything needed to replay and understand a counterexample."""
    lines = [
        f"upstream: {t.kind}",
        f"stream: {len(o.stream.data)} bytes in {len(o.stream.writes)} write(s)",
    ]
    lines += [f"  write {i}: {w!r}" for i, w in enumerate(o.stream.writes, 1)]
    recv = o.received if len(o.received) < 3000 else o.received[:3000] + b"..."
    lines += [f"client received ({o.ended}): {recv!r}", "proxy access log:"]
    lines += [
        f"  {r['method']} {r['path']!r} status={r['status']} upstream={r['upstream_status']} "
        f"decision={r['decision']} rule={r.get('rule')!r} bytes_in={r['bytes_in']}"
        + ("   <- sentinel" if r["path"] == o.sentinel else "")
        for r in o.records
    ]
    lines.append(f"{t.kind} upstream acted on:")
    for a in o.acted:
        base = {k for k, _ in t.baseline}
        watched = [(k, v[:60]) for k, v in a.headers if exact_name(k) and norm(k) not in base]
        lines.append(
            f"  {a.method} {a.target!r} (routes on {a.path!r}) body={a.body_len} conn={a.conn}"
            + (f" foreign identity/forwarding headers={watched}" if watched else "")
            + ("   <- sentinel" if a.target == o.sentinel else "")
        )
    lines += ["violations:", *(f"  - {v}" for v in found)]
    return "\n".join(lines)


def check(t: Target, stream: Stream) -> Outcome:
    """Run *stream* and fail with a full report if any rule is broken."""
    o = run(t, stream)
    found = violations(t, o)
    if found:
        raise AssertionError("\n" + report(t, o, found))
    return o
