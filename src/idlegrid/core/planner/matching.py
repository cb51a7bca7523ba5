"""Combinatorial kernels of DT-FM's cost: bottleneck perfect matching and open-loop TSP paths.

Both are exact where DT-FM's are (bottleneck matching always; the path up to
`EXACT_PATH_MAX` stages via Held–Karp), and pure Python + numpy so the core needs no scipy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

EXACT_PATH_MAX = 13  # Held–Karp holds d·2^(d-1) states; 13 stages ≈ 53k, still milliseconds

IntArray = npt.NDArray[np.int64]
FloatMatrix = npt.NDArray[np.float64]


def _augment(a: int, adj: list[int], match_of_col: list[int], seen: list[int]) -> bool:
    cols = adj[a] & ~seen[0]
    while cols:
        low = cols & -cols
        b = low.bit_length() - 1
        cols ^= low
        seen[0] |= low
        if match_of_col[b] < 0 or _augment(match_of_col[b], adj, match_of_col, seen):
            match_of_col[b] = a
            return True
    return False


def _perfect_matching(adj: list[int], k: int) -> list[int] | None:
    """Kuhn's augmenting paths on row bitmasks; returns col of each row or None."""
    match_of_col = [-1] * k
    for a in range(k):
        if not _augment(a, adj, match_of_col, [0]):
            return None
    row_to_col = [0] * k
    for b, a in enumerate(match_of_col):
        row_to_col[a] = b
    return row_to_col


def bottleneck_matching(w: FloatMatrix) -> tuple[float, list[int]]:
    """Perfect matching of rows to columns minimising the largest weight: (value, col of row).

    Threshold + augment: match greedily under the trivial lower bound, then extend the
    matching one row at a time along the augmenting path whose heaviest edge is lightest
    (a minimax Dijkstra). Each free row has such a path within the optimum (Berge), so
    the largest path value seen is the bottleneck value."""
    k = w.shape[0]
    wl: list[list[float]] = w.tolist()
    lower = max(float(w.min(axis=1).max()), float(w.min(axis=0).max()))
    adj = [sum(1 << c for c in range(k) if row[c] <= lower) for row in wl]
    match_of_col = [-1] * k
    free = [r for r in range(k) if not _augment(r, adj, match_of_col, [0])]
    col_of_row = [-1] * k
    for c, r in enumerate(match_of_col):
        if r >= 0:
            col_of_row[r] = c
    value = lower
    for root in free:
        best = list(wl[root])
        via = [root] * k
        done = [False] * k
        while True:
            c = min((x for x in range(k) if not done[x]), key=best.__getitem__)
            done[c] = True
            r = match_of_col[c]
            if r < 0:
                break
            reach, row = best[c], wl[r]
            for x in range(k):
                if not done[x]:
                    cand = row[x] if row[x] > reach else reach
                    if cand < best[x]:
                        best[x], via[x] = cand, r
        value = max(value, best[c])
        while True:  # flip the path back to the root
            r = via[c]
            prev = col_of_row[r]
            match_of_col[c], col_of_row[r] = r, c
            if r == root:
                break
            c = prev
    return float(max(wl[i][col_of_row[i]] for i in range(k))), col_of_row


@lru_cache(maxsize=16)
def _held_karp_layers(d: int) -> list[tuple[IntArray, IntArray, IntArray]]:
    layers = []
    masks = np.arange(1 << d, dtype=np.int64)
    popcount = np.array([bin(m).count("1") for m in range(1 << d)])
    for size in range(2, d + 1):
        ms = masks[popcount == size]
        mask_l, end_l = [], []
        for j in range(d):
            sel = ms[(ms >> j) & 1 == 1]
            mask_l.append(sel)
            end_l.append(np.full(len(sel), j, dtype=np.int64))
        m = np.concatenate(mask_l)
        e = np.concatenate(end_l)
        prev = m ^ (1 << e)
        # rows of candidate predecessors: dp[prev·d + i] for every i
        prev_flat = prev[:, None] * d + np.arange(d)[None, :]
        layers.append((m * d + e, prev_flat, e))
    return layers


def _held_karp_path(w: FloatMatrix, with_order: bool = True) -> tuple[float, list[int]]:
    d = w.shape[0]
    dp = np.full((1 << d) * d, np.inf)  # dp[mask·d + j]: cheapest path over mask ending at j
    parent = np.full((1 << d) * d, -1, dtype=np.int64)
    starts = np.arange(d)
    dp[(1 << starts) * d + starts] = 0.0  # open path: any group may start it
    wt = np.ascontiguousarray(w.T)
    for flat, prevs_flat, ends in _held_karp_layers(d):
        cand = dp[prevs_flat] + wt[ends]  # arrive at `end` from each i of the previous set
        if with_order:
            arg = cand.argmin(axis=1)
            dp[flat] = cand[np.arange(len(flat)), arg]
            parent[flat] = arg
        else:
            dp[flat] = cand.min(axis=1)
    last = dp[((1 << d) - 1) * d :]
    end = int(last.argmin())
    cost = float(last[end])
    if not with_order:
        return cost, []
    order, mask = [end], (1 << d) - 1
    while len(order) < d:
        prev = int(parent[mask * d + order[-1]])
        mask ^= 1 << order[-1]
        order.append(prev)
    order.reverse()
    return cost, order


def path_cost(w: FloatMatrix, order: list[int]) -> float:
    """Cost of visiting `order` as an open path."""
    return float(sum(w[a, b] for a, b in zip(order, order[1:], strict=False)))


def _two_opt_path(w: FloatMatrix) -> tuple[float, list[int]]:
    d = w.shape[0]
    best_cost, best = np.inf, list(range(d))
    for start in range(d):  # nearest neighbour from every start, then 2-opt segment reversals
        order, left = [start], set(range(d)) - {start}
        while left:
            nxt = min(left, key=lambda j: (w[order[-1], j], j))
            order.append(nxt)
            left.remove(nxt)
        cost = path_cost(w, order)
        improved = True
        while improved:
            improved = False
            for i in range(d - 1):
                for k in range(i + 1, d):
                    cand = order[:i] + order[i : k + 1][::-1] + order[k + 1 :]
                    c = path_cost(w, cand)
                    if c < cost - 1e-12:
                        order, cost, improved = cand, c, True
        if cost < best_cost:
            best_cost, best = cost, order
    return float(best_cost), best


def shortest_open_path(w: FloatMatrix, with_order: bool = True) -> tuple[float, list[int]]:
    """Cheapest order visiting every node once without returning: exact up to 13 nodes.

    with_order=False skips the back-tracking when only the cost is wanted (order is [])."""
    d = w.shape[0]
    if d == 1:
        return 0.0, [0]
    if d <= EXACT_PATH_MAX:
        return _held_karp_path(w, with_order)
    return _two_opt_path(w)
