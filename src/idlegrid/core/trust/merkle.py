"""Binary SHA-256 Merkle trees with domain-separated leaves and nodes (RFC 6962 style).

Leaves hash as H(0x00 || data) and inner nodes as H(0x01 || left || right), so a leaf can
never be passed off as an inner node (second-preimage attacks). An odd node is promoted
unchanged to the next level rather than duplicated, which keeps proofs unambiguous.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an inner node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    level = [leaf_hash(d) for d in leaves]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over the leaves' data (the empty tree has the hash of nothing)."""
    if not leaves:
        return EMPTY_ROOT
    return _levels(leaves)[-1][0]


@dataclass(frozen=True)
class Proof:
    """Sibling hashes from a leaf up to the root; `right[i]` says the sibling is on the right."""

    index: int
    siblings: tuple[bytes, ...]
    right: tuple[bool, ...]


def merkle_proof(leaves: Sequence[bytes], index: int) -> Proof:
    """Inclusion proof of leaf `index`."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of {len(leaves)}")
    siblings: list[bytes] = []
    right: list[bool] = []
    i = index
    for level in _levels(leaves)[:-1]:
        sib = i ^ 1
        if sib < len(level):
            siblings.append(level[sib])
            right.append(sib > i)
        i //= 2
    return Proof(index, tuple(siblings), tuple(right))


def verify_proof(root: bytes, data: bytes, proof: Proof) -> bool:
    """True if `data` is the leaf the proof places under `root`."""
    h = leaf_hash(data)
    for sib, is_right in zip(proof.siblings, proof.right, strict=True):
        h = node_hash(h, sib) if is_right else node_hash(sib, h)
    return h == root
