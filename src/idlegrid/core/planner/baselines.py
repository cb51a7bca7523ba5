"""Reference placements: what you get without a scheduler.

* `region_contiguous` — devices sorted by region (first appearance), consecutive blocks of
  D_DP form the data-parallel groups, stage j = block j, pipeline i = i-th of each block.
  This is Megatron's default rank mapping on a region-sorted host list ("Megatron-P8
  Default" in DT-FM's experiments): every pipeline crosses every region.
* `strided` — the same sorted list cut the other way: consecutive blocks of D_PP form the
  pipelines, so pipelines stay inside a region and data-parallel groups span regions.
  On DT-FM's published scenarios this trivial layout ties their scheduler.
* `random_plans` — uniformly random permutations, used as given (no matching, no stage
  ordering), like DT-FM's `scheduler_random.py` "no scheduler" baseline.
"""

from __future__ import annotations

import numpy as np

from idlegrid.core.planner.cost import CostModel, FloatMatrix, IntMatrix
from idlegrid.core.planner.topology import Topology


def region_sorted(topo: Topology) -> list[int]:
    """Device indices grouped by region in order of first appearance, stable inside one."""
    rank = {r: i for i, r in enumerate(topo.regions())}
    return sorted(range(topo.n), key=lambda i: (rank[topo.devices[i].region], i))


def region_contiguous(topo: Topology) -> IntMatrix:
    """Megatron's default order: data-parallel groups are consecutive region-sorted ranks."""
    order = np.asarray(region_sorted(topo), dtype=np.int64)
    return order.reshape(topo.stages, topo.data_parallel)


def strided(topo: Topology) -> IntMatrix:
    """Pipelines are consecutive region-sorted ranks; each DP group takes one per pipeline."""
    order = np.asarray(region_sorted(topo), dtype=np.int64)
    return order.reshape(topo.data_parallel, topo.stages).T.copy()


def random_plans(topo: Topology, rng: np.random.Generator, count: int) -> list[IntMatrix]:
    """`count` uniformly random plans."""
    return [rng.permutation(topo.n).reshape(topo.stages, topo.data_parallel) for _ in range(count)]


def _greedy_clusters(w: FloatMatrix, size: int) -> list[list[int]]:
    """Cut devices into clusters of `size`: each grows from the first free device by
    repeatedly adding the free device closest (mean weight) to the cluster so far."""
    free = list(range(w.shape[0]))
    clusters = []
    while free:
        cluster = [free.pop(0)]
        while len(cluster) < size:
            nxt = min(free, key=lambda v: (float(w[cluster, v].mean()), v))
            free.remove(nxt)
            cluster.append(nxt)
        clusters.append(cluster)
    return clusters


def clustered_pipelines(model: CostModel) -> IntMatrix:
    """Label-free strided: pipelines are clusters of devices with cheap activation links."""
    pipes = _greedy_clusters(model.w_pp, model.d)
    return np.array(pipes, dtype=np.int64).T.copy()


def clustered_groups(model: CostModel) -> IntMatrix:
    """Label-free region-contiguous: groups are clusters with cheap gradient exchange."""
    return np.array(_greedy_clusters(model.w_dp, model.k), dtype=np.int64)
