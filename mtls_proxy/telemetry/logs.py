"""Logging setup: one JSON object per line (default) or plain text.

Either way one record is one line: values from certificates, clients and secrets go through
escape.py (JSON's own string escapes do the same job in the JSON format). A text record is the
JSON record written differently: ``TIME LEVEL LOGGER: MSG`` and then every other key, in the same
order, as ``key=value`` with the same value (escape.py rule 4: null is ``-``); the same UTC time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
import time
from json.encoder import encode_basestring_ascii  # the C-accelerated string encoder
from typing import TYPE_CHECKING, Final, TextIO

from mtls_proxy.core.escape import for_text_log, text_log_field

if TYPE_CHECKING:
    from mtls_proxy.core.identity import PeerIdentity

_STD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


def _utc(created: float) -> str:
    """A record's time in both formats: RFC 3339 UTC with milliseconds, as AccessLog._time."""
    return (
        dt.datetime.fromtimestamp(created, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """Formats records as JSON with time, level, logger, msg and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render *record* as one JSON line."""
        out: dict[str, object] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message key=value ...``: the `extra` fields too (as in JSON), and
    everything escaped (escape.py), so that a SAN holding a line break cannot forge a record."""

    def format(self, record: logging.LogRecord) -> str:
        """Render *record* as one line."""
        parts = [
            f"{_utc(record.created)} {record.levelname} {record.name}: "
            + for_text_log(record.getMessage())
        ]
        for key, value in record.__dict__.items():
            if key not in _STD:
                parts.append(f"{for_text_log(key)}={text_log_field(value)}")
        if record.exc_info:
            # The traceback stays in the record (its lines as \x0a), not on lines of its own.
            parts.append(f"exc={text_log_field(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    """Route all logs to stderr in *fmt*."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchfiles logs every batch of changes at info; ours says which ones matter.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


_ABORTED: Final = ', "aborted": true'


def _json_value(v: object) -> str:
    if isinstance(v, str):
        return encode_basestring_ascii(v)
    if v is None:
        return "null"
    if v is True or v is False:
        return "true" if v else "false"
    return str(v) if isinstance(v, int | float) else encode_basestring_ascii(str(v))


class AccessLog:
    """One record per request, written in batches: the access log is on the hot path.

    Records are formatted like JsonFormatter's (or the text format) but skip the logging
    machinery, and the lines produced in one event-loop iteration leave in one write.
    """

    def __init__(self, fmt: str = "json", stream: TextIO | None = None) -> None:
        self._json = fmt == "json"
        self._stream = stream or sys.stderr
        self._lines: list[str] = []
        self._second = -1
        self._prefix = ""

    def _time(self, now: float) -> str:
        sec = int(now)
        if sec != self._second:
            self._second = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1000):03d}Z"

    def connection_fields(
        self,
        peer: PeerIdentity | None,
        client: str,
        client_port: int | None = None,
        tls_version: str | None = None,
        cipher: str | None = None,
        sni: str | None = None,
    ) -> str:
        """The part of every record that is fixed for one connection, encoded once: the
        client's address and port, its certificate's SHA-256, subject and SPIFFE ID, the TLS
        version and cipher, and the SNI the client sent (nulls where there is none)."""
        sha = peer.sha256 if peer else None
        subject = peer.subject if peer else None
        spiffe = peer.spiffe_id if peer else None
        fields = {
            "client": client,
            "client_port": client_port,
            "peer_sha256": sha,
            "peer": subject,
            "spiffe_id": spiffe,
            "tls_version": tls_version,
            "cipher": cipher,
            "sni": sni,
        }
        if self._json:
            return ", ".join(f'"{k}": {_json_value(v)}' for k, v in fields.items())
        return " ".join(f"{k}={text_log_field(v)}" for k, v in fields.items())

    def request(
        self,
        conn: str,
        method: str,
        path: str,
        status: int,
        upstream_status: int,
        decision: str,
        rule: str | None,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
        aborted: bool,
        reason: str | None = None,
        request_id: str = "-",
        upstream_ms: float | None = None,
        protocol: str | None = None,
        grpc_status: int | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Queue the access record of one request, written at the end of this loop iteration.
        *protocol* (http1, h2) is recorded with --http2 on; *grpc_status* for a gRPC call.

        In JSON, *request_id* and *method* are written as they are: the one is [A-Za-z0-9._-]
        (headers.py) or the proxy's, the other a name from llhttp's table of methods (or "-")."""
        ts = self._time(time.time())
        tail = "" if protocol is None else _protocol_tail(self._json, protocol, grpc_status)
        if self._json:
            line = (
                f'{{"time": "{ts}", "level": "info", "logger": "mtls_proxy.access", '
                f'"msg": "access", {conn}, "request_id": "{request_id}", '
                f'"trace_id": {_json_value(trace_id)}, '
                f'"method": "{method}", '
                f'"path": {_json_value(path)}, "status": {status}, "upstream_status": '
                f'{upstream_status or "null"}, "decision": "{decision}", "rule": '
                f'{_json_value(rule)}, "reason": '
                f'{"null" if reason is None else _json_value(reason)}, "duration_ms": '
                f'{duration_ms}, "upstream_ms": {"null" if upstream_ms is None else upstream_ms}, '
                f'"bytes_in": {bytes_in}, '
                f'"bytes_out": {bytes_out}'
                f"{_ABORTED if aborted else ''}{tail}}}\n"
            )
        else:
            # The JSON record's keys and values (escape.py rule 4): 0 and None are its nulls.
            line = (
                f"{ts} INFO mtls_proxy.access: access {conn} "
                f"request_id={text_log_field(request_id)} "  # a client's may be "-"
                f"trace_id={trace_id or '-'} "
                f"method={text_log_field(method)} "
                f"path={text_log_field(path)} status={status} "
                f"upstream_status={upstream_status or '-'} "
                f"decision={decision} rule={text_log_field(rule)} reason={text_log_field(reason)} "
                f"duration_ms={duration_ms} "
                f"upstream_ms={'-' if upstream_ms is None else upstream_ms} bytes_in={bytes_in} "
                f"bytes_out={bytes_out}{' aborted=true' if aborted else ''}{tail}\n"
            )
        if not self._lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        """Write the queued records."""
        if self._lines:
            data = "".join(self._lines)
            self._lines.clear()
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone (closed pipe): never let logging break the data plane


def _protocol_tail(as_json: bool, protocol: str, grpc_status: int | None) -> str:
    """The protocol and gRPC status of an access record (--http2 on): trusted values only."""
    if as_json:
        tail = f', "protocol": "{protocol}"'
        return tail if grpc_status is None else f'{tail}, "grpc_status": {grpc_status}'
    tail = f" protocol={protocol}"
    return tail if grpc_status is None else f"{tail} grpc_status={grpc_status}"


class RateLimiter:
    """At most *per_second* records a second (a flood of bad handshakes must not turn into a
    flood of log lines); what it holds back is counted and reported with the next record."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._second = -1
        self._count = 0
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: drop this record. Else: log it, with this many suppressed since the last."""
        second = int(now)
        if second != self._second:
            self._second, self._count = second, 0
        self._count += 1
        if self._count > self.per_second:
            self.suppressed += 1
            return None
        held, self.suppressed = self.suppressed, 0
        return held
