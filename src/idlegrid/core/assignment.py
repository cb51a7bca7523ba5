"""The rectangular assignment problem (min-cost matching of rows to distinct columns), exact.

The market clears a batch of orders as one assignment (`market/auction.Book.clear`). The
problems are small (k orders × the k cheapest free devices of each), so the textbook
Hungarian method with potentials (Kuhn–Munkres, O(n²·m), its inner loop over columns
vectorised) is fast enough, and the core does not need scipy (113 MB) for one function.
`tests/unit/test_assignment.py` checks it against brute force.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def linear_sum_assignment(cost: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """Rows and the columns they get, minimising the total cost: min(n, m) pairs, rows
    ascending (scipy.optimize.linear_sum_assignment's contract, finite costs only)."""
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError("cost must be a matrix")
    if not np.isfinite(c).all():
        raise ValueError("cost must be finite (use a large number for a forbidden pair)")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return empty, empty
    # 1-based as in the textbook: column 0 is the virtual start of each augmenting path.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    row_of = np.zeros(m + 1, dtype=np.int64)  # row matched to each column (0: none)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            slack = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(slack)) + 1
            delta = slack[j1 - 1]
            done = np.flatnonzero(used)
            u[row_of[done]] += delta
            v[done] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the augmenting path back to its start
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    cols = np.flatnonzero(row_of[1:]) + 1
    rows = row_of[cols] - 1
    cols = cols - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)
