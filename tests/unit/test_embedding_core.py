"""Embedding commitments, pooling and the tolerance judge: pure, no model."""

from __future__ import annotations

import numpy as np
import pytest

from idlegrid.core.trust import embedding as emb
from idlegrid.core.trust import peek
from idlegrid.errors import InvalidRequest

TOL = emb.EmbeddingTolerance(abs=2e-5, cos=0.99999)
CLASS = "torch/2.13.0/float32/cpu/t1"


def _vectors(n: int = 3, d: int = 8, seed: int = 0) -> np.ndarray:
    return emb.l2_normalise(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


def _commit(v: np.ndarray) -> emb.EmbeddingCommitment:
    inputs = [[101, 7 + i, 102] for i in range(len(v))]
    return emb.build("all-minilm:l6-v2", CLASS, inputs, v)


def _report(c: emb.EmbeddingCommitment, v: np.ndarray) -> emb.EmbeddingReport:
    return emb.EmbeddingReport(CLASS, c.header.context_hashes, c.header.token_counts, v)


def test_mean_pool_ignores_padding_and_normalise_gives_unit_rows() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], np.float32)
    pooled = emb.mean_pool(hidden, np.array([[1, 1, 0]]))
    assert pooled.tolist() == [[2.0, 3.0]]
    unit = emb.l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    assert np.allclose(unit, [[0.6, 0.8], [0.0, 0.0]])  # a zero row stays zero, no NaN


def test_commitment_round_trips_and_is_told_apart_from_a_generation() -> None:
    c = _commit(_vectors())
    blob = c.encode()
    assert emb.is_embedding(blob) and peek.peek_class(blob) == CLASS
    back = emb.decode(blob)
    assert back.header == c.header and np.array_equal(back.vectors, c.vectors)
    assert back.header.start == 9  # tokens billed: 3 inputs of 3
    assert back.header.digest() == c.header.digest()
    assert not emb.is_embedding(b"\x00\x00garbage")


def test_tampered_vectors_or_truncated_blobs_are_refused() -> None:
    blob = bytearray(_commit(_vectors()).encode())
    blob[-1] ^= 1  # a vector that no longer matches its hash
    with pytest.raises(InvalidRequest, match="hash"):
        emb.decode(bytes(blob))
    with pytest.raises(InvalidRequest):
        emb.decode(bytes(blob[:-4]))


def test_honest_noise_passes_and_the_digest_binds_the_vectors() -> None:
    v = _vectors()
    c = _commit(v)
    noisy = v + np.float32(1.6e-7)  # the worst honest error measured (docs/trust.md)
    verdict = emb.judge(c, _report(c, noisy), TOL)
    assert verdict.passed, verdict.reasons
    assert _commit(noisy).header.digest() != c.header.digest()


@pytest.mark.parametrize("shift", [1.3e-3, 0.37])  # bf16 and half the layers, as measured
def test_a_cheaper_models_vectors_fail(shift: float) -> None:
    v = _vectors()
    cheap = v.copy()
    cheap[1, 0] += shift
    c = _commit(cheap)
    verdict = emb.judge(c, _report(c, v), TOL)
    assert not verdict.passed and verdict.first_bad_chunk == 1


def test_other_inputs_or_inflated_counts_fail() -> None:
    v = _vectors()
    c = _commit(v)
    other = emb.build("m", CLASS, [[1], [2], [3]], v)
    r = emb.EmbeddingReport(CLASS, other.header.context_hashes, other.header.token_counts, v)
    reasons = " ".join(emb.judge(c, r, TOL).reasons)
    assert "token ids differ" in reasons and "token counts" in reasons


def test_report_round_trips() -> None:
    c = _commit(_vectors())
    r = _report(c, c.vectors)
    back = emb.decode_report(emb.encode_report(r))
    assert back.context_hashes == r.context_hashes and np.array_equal(back.vectors, r.vectors)
    with pytest.raises(InvalidRequest) as exc:
        emb.decode_report(b"\x01\x00x" + emb.MAGIC)
    assert exc.value.param == "report"


def test_a_values_canary_fails_a_recomputation_and_passes_an_echo() -> None:
    c = _commit(_vectors(d=384))
    canary = emb.tamper(c)
    back = emb.decode(canary.encode())  # a consistent blob: its hash is its vectors'
    assert back.header.vectors_hash == emb.vectors_hash(back.vectors)
    assert back.header.context_hashes == c.header.context_hashes
    assert np.allclose(np.linalg.norm(back.vectors, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(back.vectors[1:], c.vectors[1:])  # only the first vector turned
    honest = emb.judge(back, _report(c, c.vectors), TOL)
    assert not honest.passed and honest.first_bad_chunk == 0
    lazy = emb.judge(back, _report(c, back.vectors), TOL)  # echoes what it was given
    assert lazy.passed
    assert emb.tamper(c).encode() == canary.encode()  # the same answer, the same canary


def test_no_embedding_commitment_reads_as_constrained() -> None:
    """`peek_constrained` once parsed an embedding blob as an answer's head: for some models
    and vectors (1.5% here) its bytes said "grammar", so a redraw found no verifier able to
    replay one and the audit stayed pending for ever."""

    for model in ("all-minilm:l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "x"):
        for n in (1, 2, 3):
            for seed in range(60):
                v = _vectors(n=n, d=384, seed=seed)
                c = emb.build(model, CLASS, [[101, 7 + i, 102] for i in range(n)], v)
                for blob in (c.encode(), emb.tamper(c).encode()):
                    assert emb.is_embedding(blob)
                    assert peek.peek_class(blob) == CLASS
                    assert not peek.peek_constrained(blob), (model, n, seed)
