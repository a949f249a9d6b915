"""--log-format text carries the records of --log-format json: the same keys, the same values
(null as ``-``, booleans as ``true``/``false``), the same timestamps (real proxy, real clients)."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time

from tests.helpers import (
    Pki,
    Upstream,
    client_ctx,
    connect,
    get,
    handshake_rejected,
    read_response,
    run_proxy,
)

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# One text record: TIME LEVEL LOGGER: MSG key=value ... (a value "quoted" when it must be).
PREFIX = re.compile(r"(?P<time>\S+) (?P<level>[A-Z]+) (?P<logger>\S+): ")
FIELD = re.compile(r' (?P<key>[a-z_0-9]+)=(?P<value>"(?:[^"\\]|\\.)*"|[^ "]*)(?= |$)')
# Values that differ from one run to the next: compared for null or not only.
VARYING = {"time", "duration_ms", "upstream_ms", "client_port", "request_id", "pid", "workers"}
VARYING |= {"listen", "admin", "error", "cipher"}


def _value(raw: str) -> object:
    """A text field's value as the JSON record has it (docs/logs.md, Text format)."""
    if raw == "-":
        return None
    if raw in ("true", "false"):
        return raw == "true"
    if raw.startswith('"'):
        raw = raw[1:-1].replace('\\"', '"')
    elif re.fullmatch(r"-?\d+", raw):
        return int(raw)
    elif re.fullmatch(r"-?\d+\.\d+", raw):
        return float(raw)
    # escape.py rules 1-2 are Python's string escapes.
    return raw.encode().decode("unicode_escape")


def parse_text(line: str) -> dict[str, object]:
    """A text record as a dict with the keys of its JSON record."""
    m = PREFIX.match(line)
    assert m is not None, line
    rest = " " + line[m.end() :].rstrip("\n")
    first = FIELD.search(rest)
    fields = rest[first.start() :] if first else ""
    out: dict[str, object] = {
        "time": m["time"],
        "level": m["level"].lower(),
        "logger": m["logger"],
        "msg": rest[1 : len(rest) - len(fields)].encode().decode("unicode_escape"),
    }
    at = 0
    for f in FIELD.finditer(fields):
        assert f.start() == at, (line, fields[at:])  # nothing between the fields
        at = f.end()
        out[f["key"]] = _value(f["value"])
    assert at == len(fields), (line, fields[at:])
    return out


def _exercise(tp: Pki, port: int) -> None:
    """One of each: an allowed request, a denied one, an aborted one, a failed handshake."""
    assert get(port, client_ctx(tp, "good"), "/ok")[0] == 200
    assert get(port, client_ctx(tp, "other"), "/no")[0] == 403
    with connect(port, client_ctx(tp, "good")) as s:
        s.sendall(b"GET /close-mid HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s, bytearray(), head_only=True)[0] == 200
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass
    handshake_rejected(port, client_ctx(tp, "expired"))
    with socket.create_connection(("127.0.0.1", port)) as raw:  # no TLS: no SNI, no version
        raw.sendall(b"hello\r\n\r\n")
        with contextlib.suppress(OSError):
            raw.recv(100)
    time.sleep(0.5)  # access records leave in batches


WANTED = ("ready", "access", "handshake failed", "upstream error")


def _records(recs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in recs if r.get("msg") in WANTED]


def test_text_records_have_the_keys_and_values_of_json_records(tp: Pki, upstream: Upstream) -> None:
    url = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, url) as p:
        _exercise(tp, p.port)
        json_recs = _records(p.records())
    with run_proxy(tp, url, "--log-format", "text") as p:
        port, lines = p.port, p.logs
        _exercise(tp, port)
        text_recs = _records([parse_text(line) for line in list(lines)])
    assert [r["msg"] for r in text_recs] == [r["msg"] for r in json_recs], text_recs
    assert len(json_recs) == 7  # ready, 3 access, 1 upstream error, 2 handshake failed
    assert [r.get("aborted") for r in json_recs if r["msg"] == "access"] == [None, None, True]
    for j, t in zip(json_recs, text_recs, strict=True):
        assert list(t) == list(j), (t, j)  # the same keys, in the same order
        for key, value in j.items():
            if key in VARYING:
                assert (t[key] is None) == (value is None), (key, t, j)
            else:
                assert t[key] == value, (key, t, j)
        assert TIME.fullmatch(str(t["time"])) and TIME.fullmatch(str(j["time"])), (t, j)


def _hello_with_sni(sni: bytes) -> bytes:
    """A real TLS ClientHello record whose server_name is *sni*, bytes as they are (Python's
    client only sends IDNA names: another name of the same length is swapped in)."""
    stand_in = "q" * (len(sni) - 5) + ".test"
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=stand_in)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    record = out.read()
    assert record.count(stand_in.encode()) == 1
    return record.replace(stand_in.encode(), sni)


def _send_hello(port: int, sni: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(_hello_with_sni(sni))
        raw.settimeout(5)
        with contextlib.suppress(OSError):
            raw.recv(65536)  # the ServerHello; then the client leaves: handshake failed


RAW_BYTE = b"a\xffb.test"  # a byte that is no UTF-8 (nor ASCII)
TYPED = b"a\\xffb.test"  # the text a\xffb.test, typed as it is


def test_an_sni_byte_and_its_escape_typed_as_text_are_logged_apart(
    tp: Pki, upstream: Upstream
) -> None:
    url = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(tp, url) as p:
        for sni in (RAW_BYTE, TYPED):
            _send_hello(p.port, sni)
        deadline = time.monotonic() + 5
        while len(recs := [r for r in p.records() if r.get("msg") == "handshake failed"]) < 2:
            assert time.monotonic() < deadline, p.logs
            time.sleep(0.05)
        json_lines = [line for line in p.logs if '"handshake failed"' in line]
    raw, typed = (r["sni"] for r in recs)
    assert raw != typed
    assert typed == TYPED.decode()  # the text as it was sent
    assert raw == "a\xffb.test"  # one character per byte: U+00FF is the byte 0xff
    assert '"sni": "a\\u00ffb.test"' in json_lines[0] and '"sni": "a\\\\xffb.test"' in json_lines[1]
    with run_proxy(tp, url, "--log-format", "text") as p:
        port, lines = p.port, p.logs
        for sni in (RAW_BYTE, TYPED):
            _send_hello(port, sni)
        deadline = time.monotonic() + 5
        while len(text := [line for line in list(lines) if " handshake failed " in line]) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
    assert " sni=a\\xffb.test " in text[0] and " sni=a\\\\xffb.test " in text[1], text
    assert [parse_text(line)["sni"] for line in text] == [raw, typed]
