"""core/assignment.py against brute force: the exact optimum on small rectangular
matrices, forbidden pairs (a large cost), ties, and scipy's output contract."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core.assignment import linear_sum_assignment

FORBIDDEN = 1e30  # what the market uses (market/auction.INFEASIBLE)


def _brute(c: np.ndarray) -> float:
    n, m = c.shape
    if n <= m:
        return min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return _brute(c.T)


@st.composite
def _matrices(draw: st.DrawFn) -> np.ndarray:
    n, m = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    values = st.one_of(st.integers(0, 20).map(float), st.just(FORBIDDEN))
    return np.array(draw(st.lists(values, min_size=n * m, max_size=n * m))).reshape(n, m)


@settings(max_examples=300, deadline=None)
@given(_matrices())
def test_the_total_is_the_brute_force_optimum(c: np.ndarray) -> None:
    rows, cols = linear_sum_assignment(c)
    assert len(rows) == len(cols) == min(c.shape)
    assert list(rows) == sorted(set(rows.tolist())) and len(set(cols.tolist())) == len(cols)
    assert c[rows, cols].sum() == pytest.approx(_brute(c), rel=1e-12, abs=1e-9)


def test_random_float_matrices_against_brute_force() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        c = rng.uniform(0, 100, size=(int(rng.integers(1, 7)), int(rng.integers(1, 7))))
        rows, cols = linear_sum_assignment(c)
        assert c[rows, cols].sum() == pytest.approx(_brute(c), rel=1e-12)


def test_empty_and_bad_input() -> None:
    rows, cols = linear_sum_assignment(np.zeros((0, 3)))
    assert rows.size == cols.size == 0
    with pytest.raises(ValueError, match="finite"):
        linear_sum_assignment([[1.0, np.inf]])
    with pytest.raises(ValueError, match="matrix"):
        linear_sum_assignment([1.0, 2.0])


def test_a_larger_problem_matches_a_known_optimum() -> None:
    # A permutation matrix hidden in noise: the diagonal of a shuffled cheap pattern.
    rng = np.random.default_rng(3)
    n = 60
    c = rng.uniform(10, 20, size=(n, n + 15))
    perm = rng.permutation(n + 15)[:n]
    c[np.arange(n), perm] = 1.0
    rows, cols = linear_sum_assignment(c)
    assert list(cols) == list(perm) and c[rows, cols].sum() == n
