"""After the handshake: who the client is, once per connection, and whether it may stay.

Rules:
1. The peer's identity, its encoded identity headers and its decision cache are computed once
   per connection (`Peer`), never per request: the policy decision for a known peer and route
   is a dictionary hit.
2. Checks OpenSSL does not make (strict.py's --strict-client-certs; revocation.py's CRLs with
   --crl-expired allow and a stale CRL) run here, before the connection exists: a refused
   client gets `Refused`, which the TLS layer answers with an HTTP 403 naming the reason (the
   handshake is over, so no alert can, as nginx answers a certificate it refuses after its
   handshake with a 400 page) and the listener logs and counts as a failed handshake.
3. A resumed session has no verified chain of its own: the chain its leaf was last verified
   with is recalled (chains.py); an unknown one is refused wherever a chain is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Final

from cryptography import x509

from mtls_proxy.core.dialects import rfc9440_chain, tomcat_tls
from mtls_proxy.core.identity import identity_from_der
from mtls_proxy.core.paths import match_path
from mtls_proxy.core.policy import decide_route
from mtls_proxy.core.strict import strict_refusal
from mtls_proxy.dataplane.handshakes import SEEN
from mtls_proxy.dataplane.tlsconn import RefusedAfterHandshake
from mtls_proxy.http1.response import error_response
from mtls_proxy.material.chains import verified_ders
from mtls_proxy.telemetry.tracing import connection_attributes

if TYPE_CHECKING:
    import asyncio
    import ssl

    from mtls_proxy.core.headers import IdentityBlock
    from mtls_proxy.core.identity import PeerIdentity
    from mtls_proxy.core.policy import Decision, Policy, Route
    from mtls_proxy.dataplane.plane import DataPlane
    from mtls_proxy.material.generation import Generation
    from mtls_proxy.telemetry.tracing import Attributes

# A client's identity depends on its certificate's bytes alone: parsed once per certificate,
# not per connection, and one object shared by its connections (a pool of 100 connections from
# one service holds one PeerIdentity, its DER and strings, not 100: issue 18, memory). Bounded;
# keyed by the whole DER, so two certificates never share one.
_identity = functools.lru_cache(maxsize=4096)(identity_from_der)

logger = logging.getLogger("mtls_proxy.proxy")  # a stable name: log filters outlive module paths
SSL_DER: Final = 2  # _ssl.ENCODING_DER, for Certificate.public_bytes (Python 3.13+)


class Refused(RefusedAfterHandshake):
    """A client refused after its handshake: *reason* is the handshakes_total label, *why* the
    log's and the client's explanation, *answer* the HTTP response it gets."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason, self.why = reason, why
        self.answer = error_response(
            403, "client_certificate_refused", f"{reason}: {why}", False, True
        )


class Peer:
    """The client of one connection, as every request on it sees it."""

    __slots__ = (
        "_decision",
        "block",
        "identity",
        "identity_too_large",
        "issuers",
        "resumed",
        "span_attrs",
        "sslobj",
    )

    def __init__(
        self,
        identity: PeerIdentity | None,
        sslobj: ssl.SSLObject | None,
        block: IdentityBlock,
        resumed: bool,
        issuers: tuple[x509.Certificate, ...] | None,
        limit: int,
    ) -> None:
        self.identity, self.sslobj, self.block = identity, sslobj, block
        # A resumed session: the issuers its leaf was verified with (chains.py; None: unknown).
        self.resumed, self.issuers = resumed, issuers
        self.identity_too_large = len(block.lines) + len(block.xfcc or b"") > limit
        self._decision: tuple[object, object, Decision] | None = None
        self.span_attrs: Attributes | None = None  # with --otlp-endpoint (connection_facts)

    def decide(self, policy: Policy, method: bytes, path: bytes) -> Decision:
        """The policy's decision for this peer on *method* *path* (rule 1: the peer is fixed,
        so a decision only changes with the policy, swapped whole on reload, or the route)."""
        route: Route | None = (
            policy.route_for(method.decode("latin-1"), match_path(path)) if policy.routes else None
        )
        cached = self._decision
        if cached is not None and cached[0] is policy and cached[1] is route:
            return cached[2]
        decision = decide_route(policy, route, self.identity)
        self._decision = (policy, route, decision)
        return decision

    def verified_chain(self) -> list[x509.Certificate] | None:
        """The client's chain as OpenSSL verified it (leaf first, anchor last): at this
        handshake, or for a resumed session at the full handshake of its leaf (rule 3).
        Empty without a client certificate; None when it is not known (fail closed)."""
        sslobj = self.sslobj
        if self.identity is None or sslobj is None:
            return []
        if self.resumed:
            if self.issuers is None:
                return None
            leaf = sslobj.getpeercert(binary_form=True)
            return [x509.load_der_x509_certificate(leaf), *self.issuers] if leaf else None
        return [x509.load_der_x509_certificate(d) for d in verified_ders(sslobj)] or None


def admit(plane: DataPlane, gen: Generation, sslobj: ssl.SSLObject) -> Peer:
    """The connection's `Peer`, or `Refused` (rule 2)."""
    cfg = plane.cfg
    der = sslobj.getpeercert(binary_form=True)
    identity = _identity(der) if der else None
    resumed, issuers = False, None
    if identity is not None:
        if sslobj.session_reused:
            resumed, issuers = True, plane.chains.recall(identity.sha256)
        else:
            plane.chains.remember(identity.sha256, verified_ders(sslobj)[1:])
    block = gen.identity_block(identity)
    if identity is not None:
        extra = connection_identity(cfg.identity_headers, sslobj)
        if extra:
            block = dataclasses.replace(block, lines=block.lines + extra)
    peer = Peer(identity, sslobj, block, resumed, issuers, cfg.max_identity_header_bytes)
    if identity is not None and der and (gen.revocation is not None or cfg.strict_client_certs):
        if cfg.strict_client_certs:
            problem = strict_refusal(x509.load_der_x509_certificate(der))
            if problem is not None:
                raise Refused("bad_certificate", f"--strict-client-certs: {problem}")
        if gen.revocation is not None:
            chain = peer.verified_chain()
            if chain is None:
                raise Refused("unknown_ca", "a resumed session whose verified chain is not known")
            reason = gen.revocation.refuses(chain)
            if reason is not None:
                raise Refused(reason, "refused by the CRLs enforced after the handshake")
    if peer.identity_too_large:
        logger.warning(
            "identity headers exceed --max-identity-header-bytes; requests on "
            "this connection get 431",
            extra={
                "bytes": len(block.lines) + len(block.xfcc or b""),
                "limit": cfg.max_identity_header_bytes,
                "peer_sha256": identity.sha256 if identity else None,
            },
        )
    return peer


def connection_identity(dialects: tuple[str, ...], sslobj: ssl.SSLObject) -> bytes:
    """The identity lines that depend on the connection: RFC 9440's chain, Tomcat's TLS info."""
    pairs: list[tuple[str, str]] = []
    if "rfc9440" in dialects:
        # The certificates the client sent after its leaf: public from Python 3.13, the same C
        # method on the inner object since 3.10.
        get_chain = getattr(sslobj, "get_unverified_chain", None) or getattr(
            getattr(sslobj, "_sslobj", None), "get_unverified_chain", None
        )
        if get_chain is not None:
            chain = get_chain() or []
            pairs += rfc9440_chain(tuple(c.public_bytes(SSL_DER) for c in chain[1:]))
    if "tomcat" in dialects:
        cipher = sslobj.cipher()
        session = sslobj.session
        pairs += tomcat_tls(
            cipher[0] if cipher else None,
            session.id if session else None,
            cipher[2] if cipher else None,
        )
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode("ascii")


def connection_facts(
    plane: DataPlane, admitted: Peer, transport: asyncio.BaseTransport
) -> tuple[bytes, bytes, str]:
    """(client IP, our port, the access record's connection part) of a new client connection,
    whatever protocol it speaks; with spans, also the connection's span attributes (on
    *admitted*). Runs in the handshake's context: handshakes.SEEN holds the SNI (the
    server-side SSLObject has none)."""
    peername = transport.get_extra_info("peername")
    client_ip = str(peername[0]).encode() if isinstance(peername, tuple) else b"unix"
    sockname = transport.get_extra_info("sockname")
    port = b"%d" % sockname[1] if isinstance(sockname, tuple) else b""
    fields = ""
    if plane.access_log is not None or plane.tracing is not None:
        seen = SEEN.get()
        sslobj = admitted.sslobj
        cipher = sslobj.cipher() if sslobj is not None else None
        facts = (
            client_ip.decode(),
            peername[1] if isinstance(peername, tuple) else None,
            sslobj.version() if sslobj is not None else None,
            cipher[0] if cipher else None,
            seen.sni if seen is not None else None,
        )
        if plane.access_log is not None:
            fields = plane.access_log.connection_fields(admitted.identity, *facts)
        if plane.tracing is not None:
            admitted.span_attrs = connection_attributes(admitted.identity, *facts)
    return client_ip, port, fields
