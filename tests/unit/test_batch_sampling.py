"""The vectorised sampler of a batched step draws exactly the per-row sampler's tokens.

The verifier replays every token with `sampling.choose`'s definition, so the batched
provider's one-pass `choose_rows` must agree with it bit for bit, on every row, whatever
the logits, seeds, positions, temperatures and top_p of the other rows."""

from __future__ import annotations

import numpy as np
import pytest

from idlegrid.core.trust import batch_sampling as bs
from idlegrid.core.trust import sampling

TEMPERATURES = [0.0, 1e-3, 0.05, 0.3, 0.7, 1.0, 1.3, 2.0, 5.0, 100.0]
TOP_PS = [1.0, 1.0, 1.0, 0.9, 0.5]


def _logits(rng: np.random.Generator, n: int, v: int, dtype: type) -> np.ndarray:
    kind = rng.integers(0, 4)
    if kind == 0:  # a language model's spread
        x = rng.normal(0.0, rng.uniform(1.0, 6.0), (n, v))
    elif kind == 1:  # one token far ahead of the rest
        x = rng.normal(0.0, 1.0, (n, v))
        x[np.arange(n), rng.integers(0, v, n)] += rng.uniform(5.0, 40.0, n)
    elif kind == 2:  # coarse values: many exact ties, also at the top
        x = np.round(rng.normal(0.0, 3.0, (n, v)))
    else:  # large offsets, where float32 spacing is widest
        x = rng.normal(0.0, 4.0, (n, v)) + rng.uniform(-300.0, 300.0, (n, 1))
    return x.astype(dtype)


def _reference(lg: np.ndarray, seeds: list, pos: list, temps: list, tops: list) -> list[int]:
    return [sampling.choose(lg[i], seeds[i], pos[i], temps[i], tops[i]) for i in range(len(lg))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_choose_rows_equals_choose_on_every_row(dtype: type) -> None:
    rng = np.random.default_rng(19)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(1, 9))
        v = int(rng.choice([sampling.FAST_FROM, 5000, 20_000]))
        lg = _logits(rng, n, v, dtype)
        seeds = [int(x) for x in rng.integers(0, 2**63, n)]
        pos = [int(x) for x in rng.integers(0, 10_000, n)]
        temps = [float(rng.choice(TEMPERATURES)) for _ in range(n)]
        tops = [float(rng.choice(TOP_PS)) for _ in range(n)]
        assert bs.choose_rows(lg, seeds, pos, temps, tops) == _reference(
            lg, seeds, pos, temps, tops
        )
        checked += n
    assert checked > 200


def test_choose_rows_on_the_full_vocabulary_at_one_temperature() -> None:
    rng = np.random.default_rng(7)
    for t in (0.7, 1.0, 1.5):
        lg = rng.normal(0.0, 4.0, (4, 262_144)).astype(np.float32)
        seeds = [int(x) for x in rng.integers(0, 2**63, 4)]
        pos = [int(x) for x in rng.integers(0, 4096, 4)]
        temps, tops = [t] * 4, [1.0] * 4
        assert bs.choose_rows(lg, seeds, pos, temps, tops) == _reference(
            lg, seeds, pos, temps, tops
        )


def test_the_draw_depends_on_each_rows_own_seed_and_position() -> None:
    rng = np.random.default_rng(3)
    lg = np.repeat(rng.normal(0.0, 1.0, (1, 8192)).astype(np.float32), 8, axis=0)
    toks = bs.choose_rows(lg, list(range(8)), [5] * 8, [1.0] * 8, [1.0] * 8)
    assert len(set(toks)) > 1  # same logits, other seeds: other tokens
    assert toks == _reference(lg, list(range(8)), [5] * 8, [1.0] * 8, [1.0] * 8)
    again = bs.choose_rows(lg[:3], [0, 1, 2], [5, 5, 5], [1.0] * 3, [1.0] * 3)
    assert again == toks[:3]  # a row's token does not depend on the other rows


def test_the_hash_bound_finds_every_token_above_it() -> None:
    key = np.array([sampling.position_key(11, 4), sampling.position_key(12, 9)], np.uint64)
    bound = np.array([(2**53 - 2**44) << 11, (2**53 - 2**46) << 11], dtype=np.uint64)
    v = 50_000
    r, c = bs._hash_above(key, bound, v)
    for row in range(2):
        full = sampling._hash53_all(int(11 + row), int(4 + 5 * row), v)
        want = np.flatnonzero(full >= np.uint64(int(bound[row]) >> 11))
        assert len(want) > 0
        assert np.array_equal(np.sort(c[r == row]), want)


def test_each_rows_winning_score_is_the_references_to_the_bit() -> None:
    """Tokens alone hide one-ulp differences; the winning scores show them."""
    rng = np.random.default_rng(23)
    below_cut = 0
    for _ in range(40):
        n, v = 8, int(rng.choice([5000, 20_000]))
        lg = _logits(rng, n, v, np.float32)
        keys_in = [
            (int(x), int(y))
            for x, y in zip(rng.integers(0, 2**63, n), rng.integers(0, 9999, n), strict=True)
        ]
        temps = np.array([rng.choice([0.3, 0.7, 1.0, 2.0, 5.0]) for _ in range(n)])
        keys = [sampling.position_key(sd, p) for sd, p in keys_in]
        toks, scores = bs._choose_fast(lg, keys, temps)
        for i in range(n):
            z = sampling._scaled(lg[i], float(temps[i]))
            want = sampling._best_of(z, keys_in[i][0], keys_in[i][1], -1)
            assert (toks[i], scores[i]) == want
            below_cut += bool(z[toks[i]] < bs.CUT)
    assert below_cut > 0  # some winners came from the hashed tail, not the likely set
