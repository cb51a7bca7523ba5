"""Memetic search (genetic algorithm + local moves) over plans, anytime and seeded.

Genome: the D_PP × D_DP plan matrix. Under the `dtfm` objective only the partition into
groups matters (order and matching are solved exactly inside the score), so moves swap
devices between groups. Under `full` every cell matters, so moves also swap devices
inside a stage (re-matching pipelines) and reorder stages.

Determinism: all randomness comes from the injected `np.random.Generator` and the sequence
of candidates does not depend on the clock, so one seed always walks the same trajectory;
a time budget only decides where it stops, and the best-so-far is monotone along it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from idlegrid.core.planner.cost import CostModel, FloatMatrix, IntMatrix
from idlegrid.core.planner.matching import bottleneck_matching, shortest_open_path

Score = tuple[float, float]
EPS = 1e-9
_CACHE_LIMIT = 200_000


@dataclass
class Budget:
    """Stops the search after `seconds` on the injected clock or `evaluations` scores."""

    clock: Callable[[], float]
    seconds: float
    evaluations: int | None = None
    used: int = 0
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def spent(self) -> bool:
        """True once either limit is reached."""
        if self.evaluations is not None and self.used >= self.evaluations:
            return True
        return self.clock() - self.start >= self.seconds

    def elapsed(self) -> float:
        """Seconds on the clock since the budget started."""
        return self.clock() - self.start


def better(a: Score, b: Score) -> bool:
    """Lexicographic improvement with a tolerance on the primary cost."""
    if a[0] < b[0] - EPS * max(1.0, abs(b[0])):
        return True
    return abs(a[0] - b[0]) <= EPS * max(1.0, abs(b[0])) and a[1] < b[1] - EPS * max(1.0, abs(b[1]))


class DtfmObjective:
    """DT-FM's COMM-COST of a partition, with per-group and per-pair caches."""

    partition_only = True

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self._groups: dict[tuple[int, ...], float] = {}
        # (sorted group, sorted group) with the first < second → (bottleneck, closeness)
        self._links: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, float]] = {}

    def _group(self, key: tuple[int, ...]) -> float:
        v = self._groups.get(key)
        if v is None:
            if len(self._groups) > _CACHE_LIMIT:
                self._groups.clear()
            v = self._groups[key] = self.model.dtfm_group(np.asarray(key))
        return v

    def score(self, x: IntMatrix, bound: float | None = None) -> Score:
        """(COMM-COST, tie-break) of the partition in x's rows.

        With `bound`, a candidate provably costlier than it returns (lower bound, inf)
        without its remaining matchings or path: only improvements need exact values."""
        keys = [tuple(sorted(int(v) for v in row)) for row in x]
        dp = [self._group(k) for k in keys]
        worst = max(dp)
        if bound is not None and worst > bound * (1 + EPS) + EPS:
            return worst, np.inf
        d, k = x.shape
        if d == 1:
            return worst, worst
        w, smooth = np.zeros((d, d)), np.zeros((d, d))
        missing = []
        for a in range(d):
            for b in range(a + 1, d):
                pair = (keys[a], keys[b]) if keys[a] < keys[b] else (keys[b], keys[a])
                hit = self._links.get(pair)
                if hit is None:
                    missing.append((a, b))
                else:
                    w[a, b] = w[b, a] = hit[0]
                    smooth[a, b] = hit[1]
        if missing:
            rows = np.array([keys[a] for a, _ in missing])
            cols = np.array([keys[b] for _, b in missing])
            sub = self.model.w_pp[rows[:, :, None], cols[:, None, :]]
            row_min, col_min = sub.min(axis=2), sub.min(axis=1)
            # Every matching costs at least its worst row's (column's) cheapest edge ...
            lower = np.maximum(row_min.max(axis=1), col_min.max(axis=1))
            # ... and how cheap each device's best partner is measures how close two groups
            # are to a good matching even while the bottleneck has not moved yet.
            near = (row_min.sum(axis=1) + col_min.sum(axis=1)) / (2 * k)
            for (a, b), lo, nr in zip(missing, lower.tolist(), near.tolist(), strict=True):
                w[a, b] = w[b, a] = lo
                smooth[a, b] = nr
            if bound is not None:
                lb = worst + 2 * path_lower_bound(w)
                if lb > bound * (1 + EPS) + EPS:
                    return lb, np.inf
            if len(self._links) > _CACHE_LIMIT:
                self._links.clear()
            for i, (a, b) in enumerate(missing):
                exact = bottleneck_matching(sub[i])[0]
                w[a, b] = w[b, a] = exact
                self._links[(keys[a], keys[b])] = (exact, smooth[a, b])
        if bound is not None:
            lb = worst + 2 * path_lower_bound(w)
            if lb > bound * (1 + EPS) + EPS:
                return lb, np.inf
        path = shortest_open_path(w, with_order=False)[0]
        # The max terms are flat almost everywhere: the mean over all groups and the mean
        # pair closeness reward moves that improve what is not (yet) the bottleneck.
        pairs = d * (d - 1) / 2
        tie = float(np.mean(dp)) + 2 * (d - 1) * float(smooth.sum()) / pairs
        return worst + 2 * path, tie

    def canonical(self, x: IntMatrix) -> IntMatrix:
        """The plan with the optimal stage order and pipeline matching for x's partition."""
        groups = np.array([sorted(int(v) for v in row) for row in x], dtype=np.int64)
        return self.model.dtfm_partition(groups)[1]


def path_lower_bound(w: FloatMatrix) -> float:
    """A Hamiltonian path's cost is at least half of every node's two cheapest edges, minus
    the second-cheapest edges of the two endpoints (which use only one)."""
    d = w.shape[0]
    if d == 2:
        return float(w[0, 1])
    off = w + np.diag(np.full(d, np.inf))
    two = np.partition(off, 1, axis=1)[:, :2]
    second = np.sort(two[:, 1])
    return float((two.sum() - second[-2:].sum()) / 2)


class FullObjective:
    """The full model's iteration time of the plan exactly as laid out."""

    partition_only = False

    def __init__(self, model: CostModel) -> None:
        self.model = model

    def score(self, x: IntMatrix, bound: float | None = None) -> Score:
        """(iteration time, tie-break) of the plan; `bound` is not needed, evaluation is cheap."""
        return self.model.full_score(x)

    def canonical(self, x: IntMatrix) -> IntMatrix:
        """Order and match x's groups as DT-FM would; local moves refine from there."""
        groups = np.array([sorted(int(v) for v in row) for row in x], dtype=np.int64)
        return self.model.dtfm_partition(groups)[1]


Objective = DtfmObjective | FullObjective


class Searcher:
    """One objective, one generator, one budget; keeps the best plan ever scored."""

    def __init__(self, objective: Objective, rng: np.random.Generator, budget: Budget) -> None:
        self.obj, self.rng, self.budget = objective, rng, budget
        self.best: tuple[Score, IntMatrix] | None = None
        self.trace: list[tuple[int, float]] = []  # (evaluation, best cost) at each improvement

    def score(self, x: IntMatrix, bound: float | None = None) -> Score:
        """Score x, counting it against the budget and tracking the best."""
        s = self.obj.score(x, bound)
        self.budget.used += 1
        if self.best is None or better(s, self.best[0]):
            self.best = (s, x.copy())
            self.trace.append((self.budget.used, s[0]))
        return s

    def _moves(self, x: IntMatrix) -> list[tuple[int, ...]]:
        d, k = x.shape
        cells = [(r, c) for r in range(d) for c in range(k)]
        moves: list[tuple[int, ...]] = []
        for i, (r1, c1) in enumerate(cells):
            for r2, c2 in cells[i + 1 :]:
                if r1 != r2 or not self.obj.partition_only:
                    moves.append((0, r1, c1, r2, c2))
        if not self.obj.partition_only and d > 2:
            moves += [(1, a, b, 0, 0) for a in range(d) for b in range(a + 1, d)]
        order = self.rng.permutation(len(moves))
        return [moves[i] for i in order]

    @staticmethod
    def _apply(x: IntMatrix, move: tuple[int, ...]) -> IntMatrix:
        y = x.copy()
        if move[0] == 0:
            _, r1, c1, r2, c2 = move
            y[r1, c1], y[r2, c2] = x[r2, c2], x[r1, c1]
        else:  # reverse the stage segment a..b (2-opt on the stage path)
            _, a, b, _, _ = move
            y[a : b + 1] = x[a : b + 1][::-1]
        return y

    def local_search(self, x: IntMatrix, patience: int | None = None) -> tuple[Score, IntMatrix]:
        """First-improvement descent; stops at a local optimum, after `patience` idle moves,
        or when the budget is spent."""
        cur = self.score(x)
        idle = 0
        while not self.budget.spent():
            improved = False
            for move in self._moves(x):
                if self.budget.spent():
                    break
                y = self._apply(x, move)
                s = self.score(y, cur[0])
                if better(s, cur):
                    x, cur, improved, idle = y, s, True, 0
                else:
                    idle += 1
                    if patience is not None and idle >= patience:
                        return cur, x
            if not improved:
                break
        return cur, x

    def crossover(self, p1: IntMatrix, p2: IntMatrix) -> IntMatrix:
        """Keep about half of p1's groups whole; place the rest as p2 had them, then repair."""
        d, k = p1.shape
        label2 = np.empty(d * k, dtype=np.int64)
        for g, row in enumerate(p2):
            label2[row] = g
        # Align p1's groups to p2's labels by overlap so "as p2 had them" means something.
        overlap = np.array([[np.sum(label2[row] == g) for g in range(d)] for row in p1])
        mapping, free = {}, set(range(d))
        for a in np.argsort(-overlap.max(axis=1), kind="stable"):
            g = max(free, key=lambda c: (overlap[a, c], -c))
            mapping[int(a)] = g
            free.remove(g)
        keep = [a for a in range(d) if self.rng.random() < 0.5]
        child: list[list[int]] = [[] for _ in range(d)]
        placed = set()
        for a in keep:
            child[mapping[a]] = [int(v) for v in p1[a]]
            placed.update(child[mapping[a]])
        taken = {mapping[a] for a in keep}
        rest = [int(v) for v in self.rng.permutation(d * k) if int(v) not in placed]
        overflow = []
        for v in rest:
            g = int(label2[v])
            if g not in taken and len(child[g]) < k:
                child[g].append(v)
            else:
                overflow.append(v)
        for v in overflow:  # DT-FM's repair: fill under-full groups in order
            g = next(g for g in range(d) if len(child[g]) < k)
            child[g].append(v)
        return np.array(child, dtype=np.int64)

    def mutate(self, x: IntMatrix, swaps: int) -> IntMatrix:
        """Swap `swaps` random pairs of devices between different stages."""
        d, k = x.shape
        y = x.copy()
        for _ in range(swaps):
            r1, r2 = self.rng.choice(d, size=2, replace=False) if d > 1 else (0, 0)
            c1, c2 = self.rng.integers(k), self.rng.integers(k)
            y[r1, c1], y[r2, c2] = y[r2, c2], y[r1, c1]
        return y

    def run(
        self, shape: tuple[int, int], seeds: list[IntMatrix], population: int = 12
    ) -> tuple[Score, IntMatrix]:
        """Seed, fill with random plans, then breed until the budget is spent."""
        d, k = shape
        n = d * k
        patience = 2 * n
        pop: list[tuple[Score, IntMatrix]] = []
        for start in seeds:
            if self.budget.spent():
                break
            pop.append(self.local_search(start, patience))
        while (len(pop) < population and not self.budget.spent()) or not pop:
            x = self.rng.permutation(n).reshape(d, k)
            pop.append(self.local_search(self.obj.canonical(x), patience))
        while not self.budget.spent() and len(pop) >= 2:
            i, j = self.rng.choice(len(pop), size=2, replace=False)
            child = self.crossover(pop[i][1], pop[j][1])
            if self.rng.random() < 0.3:
                child = self.mutate(child, 1 + int(self.rng.integers(max(1, d))))
            s, child = self.local_search(self.obj.canonical(child), patience)
            worst = max(range(len(pop)), key=lambda t: pop[t][0])
            dup = any(abs(s[0] - p[0][0]) <= EPS and abs(s[1] - p[0][1]) <= EPS for p in pop)
            if not dup and better(s, pop[worst][0]):
                pop[worst] = (s, child)
        assert self.best is not None
        return self.best
