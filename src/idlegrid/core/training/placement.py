"""A training job as a market order: what it needs of a device and what it may pay. Pure.

The job is placed by the same reverse auction as every other order (`core/market/auction`):
its order asks for `parallel` devices, each with the memory the job needs, at or below the
consumer's ceiling per device-hour, with their runtime estimated from the job's work. The
order itself costs nothing (`Order.job`): the consumer pays the job's price per verified
step, so an hourly accrual on top would bill the same work twice.
"""

from __future__ import annotations

import math
from typing import Any

from idlegrid.core.market.orders import MAX_HOURS, Order, parse_order
from idlegrid.core.market.spec import parse_bound
from idlegrid.core.training.spec import JobSpec
from idlegrid.errors import InvalidRequest

# Bytes per parameter held on the device: fp32 weights and gradients, plus AdamW's two
# moments (plain SGD keeps none).
_BYTES_WEIGHTS_GRADS = 8
_BYTES_ADAM = 8
# Activations kept for the backward pass per layer and token, in floats: the attention
# block's inputs, q, k, v, its output and the 4× MLP come to about 16 × dim.
_ACT_FLOATS_PER_DIM = 16
_OVERHEAD = 1.2  # allocator slack and workspace buffers
# Pipeline stages a job's gang may be split into. The verified trainer runs data-parallel
# gangs only (every rank holds the whole model, proofs hash the whole state), so a job is
# never placed on a layout nothing could run; the market's planner can lay out more
# (`core/planner/gang.plan_gang`) once stages run.
RUNNABLE_STAGES = 1


def memory_gb(spec: JobSpec) -> float:
    """Device memory one rank of the job needs (an estimate from its shape), in GB."""
    m = spec.model
    per_param = _BYTES_WEIGHTS_GRADS + (_BYTES_ADAM if spec.optimizer.name == "adamw" else 0)
    rows = spec.batch_size // max(1, spec.parallel) * m.seq  # tokens one rank holds per step
    acts = m.layers * rows * (_ACT_FLOATS_PER_DIM * m.dim + 2 * m.heads * m.seq) * 4
    logits = rows * m.vocab * 4 * 3  # logits, their softmax and its gradient
    total = (m.params * per_param + acts + logits) * _OVERHEAD
    return math.ceil(total / 1e6) / 1e3  # rounded up to the MB: never under the need


def work_pflop(spec: JobSpec) -> float:
    """The job's training work: 6 FLOP per parameter and token (forward and backward)."""
    return 6.0 * spec.model.params * spec.tokens_per_step * spec.steps / 1e15


def job_order(
    job_id: str,
    seq: int,
    spec: JobSpec,
    resources: Any,
    default_max_price: float,
    avoid: frozenset[str] = frozenset(),
) -> Order:
    """The market order that places a job (its `seq`-th), checked as the market checks any
    order; InvalidRequest names `resources.<field>` when the consumer's constraints are bad."""
    if resources is None:
        resources = {}
    if not isinstance(resources, dict):
        raise InvalidRequest("resources: expected an object", param="resources")
    res = dict(resources)
    if "count" in res and res["count"] != spec.parallel:
        raise InvalidRequest(
            f"resources.count: a job runs on spec.parallel = {spec.parallel} devices",
            param="resources.count",
        )
    res["count"] = spec.parallel
    res.setdefault("max_price", default_max_price)
    need = memory_gb(spec)
    if "vram_gb" in res:
        try:
            asked = parse_bound("vram_gb", res["vram_gb"])
        except InvalidRequest as exc:
            raise InvalidRequest(f"resources.{exc.message}", param="resources.vram_gb") from exc
        if asked.op not in (">=", ">"):
            # The job's own need is a lower bound; one constraint cannot hold two bounds.
            raise InvalidRequest(
                "resources.vram_gb: a training job takes a lower bound (>=N)",
                param="resources.vram_gb",
            )
        need = max(need, asked.limit)
    res["vram_gb"] = f">={need:g}"
    raw: dict[str, Any] = {
        "id": f"{job_id}:{seq}",
        "kind": "training",
        # Held until the job gives its providers back; the order costs nothing meanwhile.
        "hours": MAX_HOURS,
        "work_pflop": min(work_pflop(spec), 1e9),
        "resources": res,
        "job": job_id,
        "avoid": sorted(avoid),
    }
    if spec.parallel > 1:
        m = spec.model
        raw["gang_shape"] = {
            "layers": m.layers,
            "hidden": m.dim,
            "seq": m.seq,
            "batch": spec.batch_size,
            "params": m.params,
            "steps": spec.steps,
            "max_stages": RUNNABLE_STAGES,
        }
    return parse_order(raw, internal=True)
