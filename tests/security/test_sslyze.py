"""docs/security.md, TOOL-01: sslyze against the running proxy, with a client
certificate. The facts it reports are compared with the summary recorded in
tests/security/sslyze-summary.json (regenerate with MTLS_PROXY_SSLYZE_RECORD=1) and with the
rules themselves: no SSL 3.0/TLS 1.0/1.1, only ECDHE + AEAD suites on TLS 1.2, and none of the
known vulnerabilities.

sslyze lives in its own virtualenv (.venv-sslyze, made by .ci/run): it pins its own
cryptography and a legacy OpenSSL (nassl)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Pki, Upstream, run_proxy

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("sslyze-summary.json")


def sslyze() -> str | None:
    for candidate in (
        os.environ.get("MTLS_PROXY_SSLYZE"),
        str(ROOT / ".venv-sslyze" / "bin" / "sslyze"),
        shutil.which("sslyze"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def summarize(result: dict[str, dict[str, object]]) -> dict[str, object]:
    def accepted(key: str) -> list[str]:
        res = result[key]["result"]
        assert isinstance(res, dict), (key, result[key].get("error_reason"))
        return sorted(c["cipher_suite"]["name"] for c in res["accepted_cipher_suites"])

    def field(key: str, name: str) -> object:
        res = result[key]["result"]
        assert isinstance(res, dict), (key, result[key].get("error_reason"))
        return res[name]

    return {
        # sslyze's SSL 2.0 client (nassl's legacy OpenSSL) cannot present a client certificate
        # (BUG_IN_SSLYZE); the system OpenSSL 3 has no SSL 2.0 at all.
        "ssl_2_0": result["ssl_2_0_cipher_suites"]["status"],
        "ssl_3_0": accepted("ssl_3_0_cipher_suites"),
        "tls_1_0": accepted("tls_1_0_cipher_suites"),
        "tls_1_1": accepted("tls_1_1_cipher_suites"),
        "tls_1_2": accepted("tls_1_2_cipher_suites"),
        "tls_1_3": accepted("tls_1_3_cipher_suites"),
        "compression": field("tls_compression", "supports_compression"),
        "ccs_injection": field("openssl_ccs_injection", "is_vulnerable_to_ccs_injection"),
        "fallback_scsv": field("tls_fallback_scsv", "supports_fallback_scsv"),
        "heartbleed": field("heartbleed", "is_vulnerable_to_heartbleed"),
        "robot": field("robot", "robot_result"),
        "secure_renegotiation": field("session_renegotiation", "supports_secure_renegotiation"),
        "client_renegotiation_dos": field(
            "session_renegotiation", "is_vulnerable_to_client_renegotiation_dos"
        ),
        "extended_master_secret": field("tls_extended_master_secret", "supports_ems_extension"),
    }


@pytest.mark.skipif(sslyze() is None, reason="sslyze: .ci/run installs it into .venv-sslyze")
def test_sslyze_finds_no_weak_protocol_suite_or_vulnerability(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    out = tmp_path / "sslyze.json"
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        r = subprocess.run(
            [
                str(sslyze()),
                "--cert",
                tp.crt("good"),
                "--key",
                tp.key("good"),
                "--json_out",
                str(out),
                f"127.0.0.1:{p.port}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    scan = json.loads(out.read_text())["server_scan_results"][0]
    assert scan["scan_status"] == "COMPLETED", scan.get("connectivity_error_trace")
    summary = summarize(scan["scan_result"])
    print(json.dumps(summary, indent=2))  # the summary, in the test log
    assert summary["ssl_3_0"] == summary["tls_1_0"] == summary["tls_1_1"] == []
    assert summary["tls_1_2"] and all(
        "ECDHE" in s and ("GCM" in s or "CHACHA20" in s)
        for s in summary["tls_1_2"]  # type: ignore[union-attr]
    )
    assert summary["tls_1_3"]
    assert summary["compression"] is False and summary["heartbleed"] is False
    assert summary["ccs_injection"] is False and summary["client_renegotiation_dos"] is False
    assert summary["robot"] == "NOT_VULNERABLE_RSA_NOT_SUPPORTED"
    assert summary["fallback_scsv"] is True and summary["extended_master_secret"] is True
    if os.environ.get("MTLS_PROXY_SSLYZE_RECORD"):
        RECORD.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    assert summary == json.loads(RECORD.read_text())
