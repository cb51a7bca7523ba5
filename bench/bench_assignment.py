"""core/assignment.linear_sum_assignment against scipy's, on the market's shapes.

`Book.clear` solves k orders × (up to k slots on each order's k cheapest devices), with
1e30 for pairs that do not fit. Times are medians of `--rounds` solves of the same
matrix, both solvers in the same run; the totals must agree exactly.

    PYTHONPATH=src python bench/bench_assignment.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy.optimize import linear_sum_assignment as scipy_lsa

from idlegrid.core.assignment import linear_sum_assignment


def _matrix(k: int, rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(1, 100, size=(k, 3 * k))
    c[rng.random(c.shape) < 0.4] = 1e30  # devices an order does not fit
    return c


def _median_ms(fn, c: np.ndarray, rounds: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    """Print one line per size: both medians and their ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,50,120,300")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for k in (int(x) for x in args.sizes.split(",")):
        c = _matrix(k, rng)
        ours, theirs = linear_sum_assignment(c), scipy_lsa(c)
        assert c[ours].sum() == c[theirs].sum(), "the optimum differs"
        a, b = (
            _median_ms(linear_sum_assignment, c, args.rounds),
            _median_ms(scipy_lsa, c, args.rounds),
        )
        print(f"k={k:4d} ({k}x{3 * k}): core {a:8.2f} ms  scipy {b:7.3f} ms  ratio {a / b:6.1f}")


if __name__ == "__main__":
    main()
