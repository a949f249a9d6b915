"""Exception hierarchy: each proxy error carries its HTTP status and the only text a client sees."""

from __future__ import annotations

from typing import ClassVar


class ConfigError(Exception):
    """Bad configuration or bad input material; the CLI prints every problem and exits 2."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class ProxyError(Exception):
    """An error answered to the client with ``status`` and a short JSON body."""

    status: ClassVar[int] = 500
    error: ClassVar[str] = "internal_error"
    public_message: ClassVar[str] = "proxy error"


class BadRequest(ProxyError):
    """The request is malformed (framing, head syntax, missing Host...)."""

    status = 400
    error = "bad_request"
    public_message = "malformed request"


class HeaderTooLarge(ProxyError):
    """The request head exceeds --max-header-bytes, a header line --max-line-bytes, or the
    number of fields --max-headers."""

    status = 431
    error = "request_header_fields_too_large"
    public_message = "request head too large"


class URITooLong(ProxyError):
    """The request target exceeds --max-line-bytes."""

    status = 414
    error = "uri_too_long"
    public_message = "request target too long"


class IdentityTooLarge(ProxyError):
    """The identity headers would exceed --max-identity-header-bytes: fail closed."""

    status = 431
    error = "identity_headers_too_large"
    public_message = "client certificate identity too large to forward"


class NotImplementedCoding(ProxyError):
    """A transfer coding other than chunked (RFC 9112 §6.1: 501)."""

    status = 501
    error = "not_implemented"
    public_message = "unsupported transfer-encoding"


class VersionNotSupported(ProxyError):
    """An HTTP version other than 1.0/1.1."""

    status = 505
    error = "http_version_not_supported"
    public_message = "only HTTP/1.0 and HTTP/1.1 are supported"


class MethodNotAllowed(ProxyError):
    """CONNECT: a sidecar never tunnels."""

    status = 405
    error = "method_not_allowed"
    public_message = "CONNECT is not supported"


class ExpectationFailed(ProxyError):
    """An Expect value other than 100-continue (RFC 9110 §10.1.1)."""

    status = 417
    error = "expectation_failed"
    public_message = "unsupported expectation"


class RequestTimeout(ProxyError):
    """The client was too slow sending the head or the body."""

    status = 408
    error = "request_timeout"
    public_message = "request not received in time"


class UpstreamUnavailable(ProxyError):
    """Connecting to the upstream failed, or it answered garbage."""

    status = 502
    error = "bad_gateway"
    public_message = "upstream unavailable"


class UpstreamTimeout(ProxyError):
    """The upstream did not answer within --upstream-timeout."""

    status = 504
    error = "gateway_timeout"
    public_message = "upstream timed out"
