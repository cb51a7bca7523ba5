"""The planner's cost model for a gang the market is choosing. Pure.

The market compares candidate gangs of a training job (one member per provider) by what
they would cost: price × runtime. Runtime is the planner's full iteration time
(`CostModel`, docs/planner.md) over the gang's own devices and reported links, times the
job's steps, so a cheaper gang over slow links can lose to a dearer one whose links keep
the exchanges short. `plan_gang` also picks the layout: how many pipeline stages, how many
data-parallel replicas, and which member runs which stage of which replica.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from idlegrid.core.planner.cost import CostModel
from idlegrid.core.planner.topology import Device, ModelSpec, Topology

GANG_MODEL_FIELDS = ("layers", "hidden", "seq", "batch", "params", "steps")


def gang_model(shape: Mapping[str, float]) -> ModelSpec:
    """The planner's model of a job from its shape (GANG_MODEL_FIELDS): fp32 activations and
    gradients on the wire, no recomputation (as the verified trainer runs)."""
    return ModelSpec(
        layers=int(shape["layers"]),
        hidden=int(shape["hidden"]),
        seq=int(shape["seq"]),
        batch=float(shape["batch"]),
        params=float(shape["params"]),
        vocab=256,
        dtype="fp32",
        grad_dtype="fp32",
        recompute=False,
    )


def step_seconds(
    shape: Mapping[str, float], tflops: Sequence[float], bandwidth_gbps: Sequence[Sequence[float]]
) -> float:
    """One optimizer step of the job on a gang: compute of its slowest rank (its share of
    the batch) plus the gradient exchange over the gang's links (Gbit/s, all > 0)."""
    n = len(tflops)
    topo = Topology(
        devices=tuple(Device(str(i), "gang", tflops=float(t)) for i, t in enumerate(tflops)),
        latency_ms=tuple(tuple(0.0 for _ in range(n)) for _ in range(n)),
        bandwidth_gbps=tuple(tuple(float(b) for b in row) for row in bandwidth_gbps),
        model=gang_model(shape),
        stages=1,
        data_parallel=n,
    )
    return CostModel(topo).full_parts(np.arange(n, dtype=np.int64).reshape(1, n))["total"]


def runtime_hours(
    shape: Mapping[str, float], tflops: Sequence[float], bandwidth_gbps: Sequence[Sequence[float]]
) -> float:
    """The whole job's expected runtime on a gang, in hours."""
    return step_seconds(shape, tflops, bandwidth_gbps) * float(shape["steps"]) / 3600.0


EXHAUSTIVE_MEMBERS = 5  # up to this many members every arrangement is tried (5! = 120)


@dataclass(frozen=True)
class GangMember:
    """One member of a planned gang: its index among the candidates, its pipeline stage and
    its data-parallel shard (replica)."""

    index: int
    stage: int
    shard: int


@dataclass(frozen=True)
class GangPlan:
    """The layout a gang runs: `stages` × `data_parallel` members, and its step time."""

    stages: int
    data_parallel: int
    members: tuple[GangMember, ...]  # stage-major: rank r = stage × data_parallel + shard
    step_s: float

    @property
    def layout(self) -> str:
        """`data-parallel` or `pipeline` (several stages, possibly replicated)."""
        return "data-parallel" if self.stages == 1 else "pipeline"


@dataclass(frozen=True)
class NoLayout:
    """Why no layout of the gang works (every candidate layout's stage runs out of memory,
    or the job allows fewer stages than its model needs)."""

    reason: str


def layouts(n: int, layers: int, max_stages: int) -> list[tuple[int, int]]:
    """Every (stages, data_parallel) shape that covers `n` members exactly."""
    return [(s, n // s) for s in range(1, min(n, layers, max_stages) + 1) if n % s == 0]


def plan_gang(
    shape: Mapping[str, float],
    tflops: Sequence[float],
    bandwidth_gbps: Sequence[Sequence[float]],
    latency_ms: Sequence[Sequence[float]] | None = None,
    memory_gb: Sequence[float | None] | None = None,
    max_stages: int = 1,
) -> GangPlan | NoLayout:
    """The layout and arrangement of a gang with the lowest planned step time.

    Tries every (stages, data_parallel) shape up to `max_stages` stages; a shape whose
    stage does not fit some member's memory (None: unknown, not checked) is out. Up to
    EXHAUSTIVE_MEMBERS members every arrangement of members to positions is scored; beyond,
    the candidates' own order (the market's best first) and the fastest-first order are.
    One stage needs no arrangement: every member holds the whole model."""
    n = len(tflops)
    lat = latency_ms or [[0.0] * n for _ in range(n)]
    model = gang_model(shape)
    best: GangPlan | None = None
    why = f"no layout of {n} members with at most {max_stages} stage(s)"
    for stages, dp in layouts(n, model.layers, max_stages):
        topo = Topology(
            devices=tuple(
                Device(str(i), "gang", tflops=float(t), memory_gb=(memory_gb or [None] * n)[i])
                for i, t in enumerate(tflops)
            ),
            latency_ms=tuple(tuple(float(v) for v in row) for row in lat),
            bandwidth_gbps=tuple(tuple(float(b) for b in row) for row in bandwidth_gbps),
            model=model,
            stages=stages,
            data_parallel=dp,
        )
        need = max(topo.stage_memory_gb(k) for k in topo.layers_per_stage())
        if memory_gb is not None:
            short = [m for m in memory_gb if m is not None and m < need]
            if short:
                why = f"a {stages}-stage layout needs {need:.3g} GB per member"
                continue
        cost = CostModel(topo)
        for order in _arrangements(n, stages, tflops):
            x = np.asarray(order, dtype=np.int64).reshape(stages, dp)
            t = cost.full_parts(x)["total"]
            if best is None or t < best.step_s:
                members = tuple(
                    GangMember(int(x[j, i]), j, i) for j in range(stages) for i in range(dp)
                )
                best = GangPlan(stages, dp, members, t)
    return best if best is not None else NoLayout(why)


def _arrangements(n: int, stages: int, tflops: Sequence[float]) -> list[tuple[int, ...]]:
    if stages == 1:
        return [tuple(range(n))]
    if n <= EXHAUSTIVE_MEMBERS:
        return list(itertools.permutations(range(n)))
    fastest = tuple(sorted(range(n), key=lambda i: -tflops[i]))
    return [tuple(range(n)), fastest]
