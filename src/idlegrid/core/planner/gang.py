"""The planner's cost model for a data-parallel gang the market is choosing. Pure.

The market compares candidate gangs of a training job (one rank per provider) by what they
would cost: price × runtime. Runtime is the planner's full iteration time (`CostModel`,
docs/planner.md) for a one-stage plan over the gang's own devices and measured links, times
the job's steps, so a cheaper gang over slow links can lose to a dearer one whose links
keep the gradient exchange short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
