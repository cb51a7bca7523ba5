"""The pruned choose/replay used for large vocabularies give the exhaustive answers exactly."""

from __future__ import annotations

import numpy as np
import pytest

from idlegrid.core.trust import sampling

V = 3 * sampling.FAST_FROM


def _logits(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "peaked":  # an LM's shape: a few strong tokens over a broad low bulk
        x = rng.standard_normal(V) * 3.0
        x[rng.integers(0, V, 20)] += rng.uniform(8, 20, 20)
    elif kind == "flat":  # everything within a few logits: pruning keeps many
        x = rng.standard_normal(V) * 0.3
    elif kind == "ties":  # exact ties among the best and across the nucleus boundary
        x = np.round(rng.standard_normal(V), 1) * 2.0
        x[:5] = x.max() + 1.0
    else:  # one dominant token: nothing else is near it
        x = rng.standard_normal(V)
        x[7] = 80.0
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "dominant"])
def test_pruned_equals_exhaustive(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    for trial in range(12):
        x = _logits(kind, rng)
        temperature = [0.5, 1.0, 1.7][trial % 3]
        top_p = [1.0, 0.9, 0.5, 0.0][trial % 4]
        seed, pos = int(rng.integers(0, 2**62)), trial * 11
        got = sampling.choose(x, seed, pos, temperature, top_p)
        assert got == sampling.choose_exhaustive(x, seed, pos, temperature, top_p)
        second = int(np.argsort(x)[-2])
        for tok in {got, second, int(rng.integers(0, V))}:
            assert sampling.replay(
                x, tok, seed, pos, temperature, top_p
            ) == sampling.replay_exhaustive(x, tok, seed, pos, temperature, top_p)
        assert sampling.replay(x, got, seed, pos, temperature, top_p).margin >= 0
