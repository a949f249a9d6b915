"""Every counterexample the differential fuzzer found, replayed against every upstream.

Each case is the minimal stream (after Hypothesis shrinking, sometimes made more telling by
hand) and the oracle of oracle.py judges it exactly as in the fuzz run. To add one: copy the
``write N`` lines of the failure report into ``case(...)``, give the number of requests the
client meant to send, and name the bug.
"""

from __future__ import annotations

import pytest

from tests.fuzz.oracle import Target, check
from tests.fuzz.streams import Stream


def req(line: str, *fields: str, body: bytes = b"") -> bytes:
    """One request: *line*, Host, *fields*, the blank line, *body*."""
    head = "".join(f"{f}\r\n" for f in (line, "Host: localhost", *fields))
    return head.encode() + b"\r\n" + body


def case(name: str, *writes: bytes, requests: int = 1) -> object:
    """A counterexample: the client's writes, and how many requests it meant to send."""
    return pytest.param(Stream(writes, (False,) * requests), id=name)


NEXT = req("GET /public/after HTTP/1.1")
SMUGGLED = req("GET /admin/smuggled HTTP/1.1", "x-client-subject: CN=forged")
CASES = [
    # (a) Content-Length + a Content_Length look-alike: the proxy framed the body by the real
    # field (llhttp) but forwarded "Content-Length: 0" and then the body bytes, which the upstream
    # read as a second request nobody logged or checked.
    case(
        "a-content_length-lookalike-smuggles-a-request",
        req(
            "POST /public/x HTTP/1.1",
            f"Content-Length: {len(SMUGGLED)}",
            "Content_Length: 0",
            body=SMUGGLED,
        ),
    ),
    case(
        "a-content_length-lookalike-minimal",
        req("POST /public/x HTTP/1.0", "Content-Length: 1", "Content_Length: 0", body=b"a"),
    ),
    # (b) A refusal that closes the connection, with a request pipelined behind it in the same
    # write: the one behind was still forwarded (and sometimes never logged).
    case("b-400-ambiguous-path-then-pipelined", req("GET /%2fadmin HTTP/1.1") + NEXT, requests=2),
    case(
        "b-501-gzip-chunked-then-pipelined",
        req("POST /public/x HTTP/1.1", "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")
        + NEXT,
        requests=2,
    ),
    case(
        "b-417-expect-then-pipelined",
        req("GET /public/x HTTP/1.1", "Expect: x") + NEXT,
        requests=2,
    ),
    case(
        "b-403-with-unread-body-then-pipelined",
        req("POST /admin/x HTTP/1.1", "Content-Length: 3", body=b"abc") + NEXT,
        requests=2,
    ),
    case(
        "b-connection-close-mid-pipeline",
        req("GET /public/x HTTP/1.1", "Connection: close") + NEXT,
        requests=2,
    ),
    case(
        "b-upgrade-with-body-then-pipelined",
        req(
            "POST /public/x HTTP/1.1",
            "Upgrade: h2c",
            "Connection: Upgrade",
            "Content-Length: 2",
            body=b"ab",
        )
        + NEXT,
        requests=2,
    ),
    # (c) Path parameters: the proxy matched /public (or the top level) while Tomcat removes
    # ";..." from each segment before resolving dot segments, and served /admin.
    case("c-public-dotdot-semicolon-admin", req("GET /public/..;/admin/x HTTP/1.1")),
    case("c-dot-semicolon-admin", req("GET /.;/admin HTTP/1.1")),
    case("c-semicolon-segment-admin", req("GET /;/admin HTTP/1.1")),
    case("c-dotdot-param-admin", req("GET /public/..;v=1/admin HTTP/1.1")),
    case("c-encoded-dotdot-semicolon", req("GET /public/%2e%2e;/admin/x HTTP/1.1")),
    # (d) Forwarding headers that frameworks act on reached the upstream from the client.
    case("d-x-forwarded-prefix", req("GET /public/x HTTP/1.1", "X-Forwarded-Prefix: /forged")),
    case("d-x-original-url", req("GET /public/x HTTP/1.1", "X-Original-URL: /admin/forged")),
    case("d-x-rewrite-url", req("GET /public/x HTTP/1.1", "X-Rewrite-URL: /admin/forged")),
    case("d-x-forwarded-port", req("GET /public/x HTTP/1.1", "X-Forwarded-Port: 4433-forged")),
    case("d-x-original-host", req("GET /public/x HTTP/1.1", "X-Original-Host: forged")),
    # Identity look-alikes: never broken, kept as the baseline the fuzzer started from.
    case(
        "identity-underscore-lookalikes",
        req(
            "GET /public/x HTTP/1.1",
            "x-client-subject: CN=forged",
            "X_Client_Subject: CN=forged",
            "X_Forwarded_For: forged",
        ),
    ),
]


@pytest.mark.parametrize("stream", CASES)
def test_fuzzer_counterexample_stays_fixed(target: Target, stream: Stream) -> None:
    check(target, stream)
