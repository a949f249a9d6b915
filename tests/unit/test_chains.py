"""chains.ChainMemo: the verified chains behind resumed sessions, bounded and interned."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from mtls_proxy.cli import pki
from mtls_proxy.material.chains import ChainMemo

DER = serialization.Encoding.DER


def test_remembers_the_last_chain_of_each_leaf_and_shares_parsed_issuers() -> None:
    root = pki.make_ca("root")
    inter = pki.make_ca("inter", issuer=root)
    chain = (inter.cert.public_bytes(DER), root.cert.public_bytes(DER))
    memo = ChainMemo()
    assert memo.recall("leaf-a") is None
    memo.remember("leaf-a", chain)
    memo.remember("leaf-b", tuple(bytes(d) for d in chain))  # equal bytes, other objects
    a, b = memo.recall("leaf-a"), memo.recall("leaf-b")
    assert a is not None and [c.subject for c in a] == [inter.cert.subject, root.cert.subject]
    assert a is b  # parsed once for every leaf of that chain
    memo.remember("leaf-a", chain[1:])  # verified again through another path: the last wins
    assert memo.recall("leaf-a") == (root.cert,)


def test_the_least_recently_used_leaf_goes_first() -> None:
    root = pki.make_ca("root")
    memo = ChainMemo(limit=2)
    issuers = (root.cert.public_bytes(DER),)
    memo.remember("one", issuers)
    memo.remember("two", issuers)
    assert memo.recall("one") is not None  # a resumption: "one" is now the most recent
    memo.remember("three", issuers)
    assert memo.recall("two") is None
    assert memo.recall("one") is not None and memo.recall("three") is not None


def test_a_leaf_trusted_itself_is_remembered_with_no_issuers() -> None:
    """A pinned self-signed client: its verified chain is the leaf alone. Remembered as ()
    (known, nothing above it), which is not None (unknown: refused)."""
    memo = ChainMemo()
    memo.remember("pinned", ())
    assert memo.recall("pinned") == ()
    assert memo.recall("other") is None
