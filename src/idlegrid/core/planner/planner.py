"""The planner's front door: topology in, plan + cost breakdowns + baselines out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from idlegrid.core.planner.baselines import (
    clustered_groups,
    clustered_pipelines,
    random_plans,
    region_contiguous,
    strided,
)
from idlegrid.core.planner.cost import CostModel, IntMatrix, Plan
from idlegrid.core.planner.search import Budget, DtfmObjective, FullObjective, Searcher
from idlegrid.core.planner.topology import Topology

DTFM_SHARE = 0.3  # part of a `full` search spent first finding DT-FM's best partition


@dataclass(frozen=True)
class PlanResult:
    """A plan, the plan DT-FM's model prefers, both scored under both models, baselines."""

    objective: str
    plan: Plan
    dtfm_plan: Plan
    cost: dict[str, dict[str, float]]
    dtfm_plan_cost: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, Any]]
    seconds: float
    evaluations: int
    seed: int
    trace: tuple[tuple[int, float], ...]  # (evaluation, best objective) at each improvement

    def to_json(self, topo: Topology) -> dict[str, Any]:
        """The `idlegrid plan --json` document."""
        ids = [d.id for d in topo.devices]
        return {
            "objective": self.objective,
            "stages": [list(r) for r in self.plan.stages],
            "pipelines": self.plan.pipelines,
            "stage_device_ids": [[ids[v] for v in r] for r in self.plan.stages],
            "cost": self.cost,
            "baselines": self.baselines,
            "dtfm_plan": {
                "stages": [list(r) for r in self.dtfm_plan.stages],
                "cost": self.dtfm_plan_cost,
            },
            "seconds": round(self.seconds, 4),
            "evaluations": self.evaluations,
            "seed": self.seed,
        }


def _mean_parts(model: CostModel, plans: list[IntMatrix]) -> dict[str, Any]:
    scored = [model.evaluate(x) for x in plans]
    out: dict[str, Any] = {"samples": len(plans)}
    for mode in ("dtfm", "full"):
        keys = scored[0][mode].keys()
        out[mode] = {k: float(np.mean([s[mode][k] for s in scored])) for k in keys}
    return out


def baselines(model: CostModel, seed: int, samples: int = 32) -> dict[str, dict[str, Any]]:
    """Costs of random (mean of `samples`), region-contiguous and strided placements."""
    topo = model.topo
    rng = np.random.default_rng([seed, 1])  # independent of how long the search ran
    out: dict[str, dict[str, Any]] = {
        "random": _mean_parts(model, random_plans(topo, rng, samples))
    }
    for name, x in (("region_contiguous", region_contiguous(topo)), ("strided", strided(topo))):
        out[name] = {"stages": x.tolist(), **model.evaluate(x)}
    return out


def plan_topology(
    topo: Topology,
    *,
    seconds: float,
    seed: int,
    clock: Callable[[], float],
    evaluations: int | None = None,
    use_seeds: bool = True,
    random_samples: int = 32,
    objective: str | None = None,
) -> PlanResult:
    """Search for the cheapest placement within `seconds` on `clock` (or `evaluations`)."""
    objective = objective or topo.objective
    model = CostModel(topo)
    rng = np.random.default_rng(seed)
    start = clock()
    shape = (topo.stages, topo.data_parallel)
    seeds = []
    if use_seeds:  # layouts by region label, and the same two ideas read off the matrices
        seeds = [
            strided(topo),
            region_contiguous(topo),
            clustered_pipelines(model),
            clustered_groups(model),
        ]

    share = DTFM_SHARE if objective == "full" else 1.0
    dtfm_evals = None if evaluations is None else max(1, int(evaluations * share))
    dtfm = Searcher(DtfmObjective(model), rng, Budget(clock, seconds * share, dtfm_evals))
    _, best = dtfm.run(shape, seeds)
    dtfm_best = dtfm.obj.canonical(best)
    used, trace = dtfm.budget.used, list(dtfm.trace)
    final = dtfm_best
    if objective == "full":
        rest = None if evaluations is None else max(1, evaluations - used)
        remaining = max(0.0, seconds - (clock() - start))
        full = Searcher(FullObjective(model), rng, Budget(clock, remaining, rest))
        # DT-FM's best, then each seed's groups in DT-FM's best order and matching.
        _, final = full.run(shape, [dtfm_best, *(dtfm.obj.canonical(s) for s in seeds)])
        used += full.budget.used
        trace = list(full.trace)
    return PlanResult(
        objective=objective,
        plan=Plan.from_matrix(final),
        dtfm_plan=Plan.from_matrix(dtfm_best),
        cost=model.evaluate(final),
        dtfm_plan_cost=model.evaluate(dtfm_best),
        baselines=baselines(model, seed, random_samples),
        seconds=clock() - start,
        evaluations=used,
        seed=seed,
        trace=tuple(trace),
    )
