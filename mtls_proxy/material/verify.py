"""The listener's client-certificate verdict, reached without a network (``explain``, the tests).

There is one verifier: the listener's. A second one (cryptography's X.509 verifier, as explain
used) disagrees with it at the edges, and did: a CN-only client certificate from our own ``pki``
was untrusted for it and allowed by the listener; an intermediate as the CA bundle was trusted for
it while the listener refused every client. So the verdict here is the listener's own:

Rules:
1. The server side is an SSLObject of contexts.server_context(cfg, material), the function that
   builds the listener's context: the same trust, CRLs, purpose (sslclient), security level,
   --trust-anchors, --crl-check and --strict-client-certs flags. Only our own certificate is a
   throwaway one: it takes no part in verifying the client.
2. The reason is classify_handshake_error's label of the server side's error, as the listener
   counts it in mtls_proxy_handshakes_total; the message is OpenSSL's verify message.
3. Without the client's private key (``check_chain``): a TLS 1.2 ClientHello, then a Certificate
   message carrying the chain, both written by hand. OpenSSL verifies a client's chain as soon as
   it reads that message (tls_process_client_certificate), before the CertificateVerify that
   would need the key; the verdict is in. TLS 1.2 because a TLS 1.3 Certificate message is
   encrypted; the chain is verified the same way in both versions, so a context limited to
   TLS 1.3 is opened to 1.2 for this private use only.
4. With the key (``handshake``): a whole handshake in memory between a client context holding
   the chain and key and the server side, so the key is proven too.
5. Then the checks the listener makes right after a handshake (admission.py): --strict-client-certs
   (strict.py) and, with --crl-expired allow and a stale CRL, the CRLs (revocation.py), with the
   same labels.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtls_proxy.core.config import Config
from mtls_proxy.core.revocation import TrustView
from mtls_proxy.core.strict import strict_refusal
from mtls_proxy.material.chains import verified_ders
from mtls_proxy.material.contexts import (
    classify_handshake_error,
    openssl_checks_crls,
    server_context,
)
from mtls_proxy.material.tls import Material

SERVER_NAME: Final = "verifier.mtls-proxy.invalid"
_ALERT, _HANDSHAKE = 21, 22
_CERTIFICATE, _CERTIFICATE_REQUEST, _SERVER_HELLO_DONE = 11, 13, 14
_MAX_RECORD: Final = 16384
# What an OpenSSL 3 client offers for TLS 1.2 with ECDHE + AEAD (the only suites the listener
# takes), every group and signature scheme the listener might want: the handshake must get as
# far as the client's Certificate whatever the listener's configuration.
_SUITES: Final = (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)
_GROUPS: Final = (0x001D, 0x0017, 0x001E, 0x0018, 0x0019)
_SIGALGS: Final = (0x0403, 0x0503, 0x0603, 0x0807, 0x0808, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501)


class VerifierError(Exception):
    """The in-memory handshake did not reach the point where the client chain is verified."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the listener decides about a client chain."""

    reason: str | None  # None: accepted; else the handshakes_total reason label
    message: str  # OpenSSL's verify message, or the post-handshake check's
    chain: tuple[bytes, ...] = ()  # the chain OpenSSL verified, leaf first, DER (when it did)
    # What a refused client reads: the TLS alert's name (as OpenSSL reports it on the client
    # side, e.g. "unknown_ca"), or "HTTP 403" for a refusal after the handshake.
    alert: str | None = None

    @property
    def accepted(self) -> bool:
        """The listener would let this client finish the handshake."""
        return self.reason is None


def listener_context(
    cfg: Config,
    ca_certs: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
) -> tuple[ssl.SSLContext, Material]:
    """The listener's context for this trust (rule 1), with a throwaway identity of our own."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    material = Material("(verifier)", key, (cert,), None, tuple(ca_certs), crls=tuple(crls))
    return server_context(cfg, material), material


def revocation_view(cfg: Config, material: Material) -> TrustView | None:
    """The CRLs the listener enforces after the handshake, if any: with --crl-expired allow
    and a stale CRL, OpenSSL is not given the CRLs (it would refuse every client of that CA,
    and cannot relax one issuer only); revocation.py checks them after each handshake, and
    with needs_crls refuses a chain whose CAs lack a CRL, as OpenSSL's chain/leaf mode would
    (revocation.py rule 6). Used by the listener (generation.py) and by explain."""
    if openssl_checks_crls(cfg, material) or not material.crls:
        return None
    return TrustView.build(
        material.ca_certs,
        material.crls,
        leaf_only=cfg.tls.crl_check == "leaf",
        needs_crls=True,
    )


def after_handshake(cfg: Config, view: TrustView | None, verdict: Verdict) -> Verdict:
    """Rule 5: the listener's checks after an accepted handshake (admission.py)."""
    if (
        not verdict.accepted
        or not verdict.chain
        or not (cfg.strict_client_certs or view is not None)
    ):
        return verdict
    try:
        chain = [x509.load_der_x509_certificate(d) for d in verdict.chain]
    except ValueError as exc:  # OpenSSL took it, cryptography cannot read it: fail closed
        return Verdict(
            "other", f"the chain cannot be read for the checks ({exc})", verdict.chain, _AFTER
        )
    if cfg.strict_client_certs:
        problem = strict_refusal(chain[0])
        if problem is not None:
            return Verdict(
                "bad_certificate", f"--strict-client-certs: {problem}", verdict.chain, _AFTER
            )
    if view is not None:
        reason = view.refuses(chain)
        if reason is not None:
            return Verdict(
                reason, "refused by the CRLs enforced after the handshake", verdict.chain, _AFTER
            )
    return verdict


# A refusal after the handshake is an HTTP answer (admission.py), no alert can be sent then.
_AFTER: Final = "HTTP 403"
# TLS alert descriptions (RFC 8446 6.2) a verification can end with.
_ALERTS: Final = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    80: "internal_error",
    116: "certificate_required",
}


def alert_of(exc: ssl.SSLError) -> str | None:
    """The alert a client-side SSLError reports: OpenSSL's reason is SSLV3_ALERT_<NAME>,
    TLSV1_ALERT_<NAME> or TLSV13_ALERT_<NAME>."""
    reason = exc.reason or ""
    return reason.split("_ALERT_", 1)[1].lower() if "_ALERT_" in reason else None


def _alert_record(flight: bytes) -> str | None:
    """The alert in a plaintext TLS record (TLS 1.2 before ChangeCipherSpec), if any."""
    if len(flight) >= 7 and flight[0] == _ALERT:
        return _ALERTS.get(flight[6], f"alert {flight[6]}")
    return None


def _refused(exc: BaseException, alert: str | None) -> Verdict:
    message = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
    return Verdict(classify_handshake_error(exc), str(message), alert=alert)


# -- rule 3: the chain alone -----------------------------------------------------------------
def _record(content: int, body: bytes) -> bytes:
    return struct.pack(">BHH", content, 0x0303, len(body)) + body


def _handshake_msg(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def _u16s(values: Sequence[int], prefix: int = 2) -> bytes:
    data = b"".join(struct.pack(">H", v) for v in values)
    return len(data).to_bytes(prefix, "big") + data


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack(">HH", kind, len(body)) + body


def client_hello() -> bytes:
    """A TLS 1.2 ClientHello record an OpenSSL server answers with a full handshake."""
    exts = (
        _ext(10, _u16s(_GROUPS))  # supported_groups
        + _ext(11, b"\x01\x00")  # ec_point_formats: uncompressed
        + _ext(13, _u16s(_SIGALGS))  # signature_algorithms
        + _ext(23, b"")  # extended_master_secret
        + _ext(0xFF01, b"\x00")  # renegotiation_info (initial handshake)
    )
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + b"\x00"  # no session to resume
        + _u16s(_SUITES)
        + b"\x01\x00"  # compression: null only
        + len(exts).to_bytes(2, "big")
        + exts
    )
    return _record(_HANDSHAKE, _handshake_msg(1, body))


def certificate_records(ders: Sequence[bytes]) -> bytes:
    """The client's Certificate message, split into records as a TLS stack would."""
    certs = b"".join(len(d).to_bytes(3, "big") + d for d in ders)
    msg = _handshake_msg(_CERTIFICATE, len(certs).to_bytes(3, "big") + certs)
    return b"".join(
        _record(_HANDSHAKE, msg[i : i + _MAX_RECORD]) for i in range(0, len(msg), _MAX_RECORD)
    )


def _handshake_types(flight: bytes) -> list[int]:
    """The handshake message types in the server's (plaintext) first flight."""
    data, i = b"", 0
    while i + 5 <= len(flight):
        content, length = flight[i], int.from_bytes(flight[i + 3 : i + 5], "big")
        if content == _HANDSHAKE:
            data += flight[i + 5 : i + 5 + length]
        i += 5 + length
    types, j = [], 0
    while j + 4 <= len(data):
        types.append(data[j])
        j += 4 + int.from_bytes(data[j + 1 : j + 4], "big")
    return types


def check_chain(ctx: ssl.SSLContext, ders: Sequence[bytes]) -> Verdict:
    """OpenSSL's verdict on the chain *ders* (leaf first) as *ctx* verifies clients (rule 3).

    *ctx* must be a context of our own (listener_context): it is opened to TLS 1.2."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(client_hello())
    try:
        server.do_handshake()
    except ssl.SSLWantReadError:
        pass
    except ssl.SSLError as exc:
        raise VerifierError(f"the verifier's ClientHello was refused ({exc})") from None
    types = _handshake_types(outgoing.read())
    if _CERTIFICATE_REQUEST not in types or types[-1:] != [_SERVER_HELLO_DONE]:
        raise VerifierError(f"unexpected server flight (handshake messages {types})")
    incoming.write(certificate_records(ders))
    try:
        server.do_handshake()
    except ssl.SSLWantReadError:
        # Waiting for the ClientKeyExchange: the chain passed.
        return Verdict(None, "ok", verified_ders(server))
    except (ssl.SSLError, OSError) as exc:
        return _refused(exc, _alert_record(outgoing.read()))
    raise VerifierError("the handshake completed without a key exchange")


# -- rule 4: a whole handshake ---------------------------------------------------------------
def _client_reads(peer: ssl.SSLObject, c_in: ssl.MemoryBIO, flight: bytes) -> str | None:
    """The alert the client side reports once it reads the server's last flight (encrypted in
    TLS 1.3: only the client can name it)."""
    c_in.write(flight)
    try:
        peer.do_handshake()
        peer.read(1)
    except ssl.SSLError as exc:
        return alert_of(exc)
    return None


def client_context(material: Material) -> ssl.SSLContext:
    """A client that trusts the verifier's throwaway identity and imposes nothing of its own
    (security level 0): the listener's decision is what is observed."""
    cert = material.leaf.public_bytes(serialization.Encoding.PEM).decode()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cert)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def handshake(ctx: ssl.SSLContext, client: ssl.SSLContext) -> Verdict:
    """A whole handshake in memory between *client* (holding a chain and key) and *ctx*."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    peer = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=SERVER_NAME)
    client_error: ssl.SSLError | None = None
    for _ in range(8):
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            client_error = exc  # its alert reaches the server, which says why in its terms
        s_in.write(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            return _refused(exc, _client_reads(peer, c_in, s_out.read()))
        else:
            return Verdict(None, "ok", verified_ders(server))
        c_in.write(s_out.read())
        if client_error is not None and not c_out.pending and not s_out.pending:
            raise VerifierError(f"the verifier's client failed ({client_error})")
    raise VerifierError("the in-memory handshake did not finish")
