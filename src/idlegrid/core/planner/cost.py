"""Cost models of a placement: DT-FM's exact communication cost and our full iteration time.

A plan is a D_PP × D_DP matrix of device indices: row j is stage j's data-parallel group,
column i is pipeline i (the devices that process macro-batch i, in stage order).

* `dtfm` — eq. 1–4 of Yuan et al. (NeurIPS 2022) with the constants of their released
  scheduler: symmetric-averaged links, a sharded parameter server per stage, each boundary
  costing its slowest matched pair, boundaries summed along the path, the path doubled.
* `full` — a GPipe flush-to-flush iteration: per-device compute from TFLOPS, directional
  links, latency only in the fill, the bubble, compression ratios, then the DP exchange.

docs/planner.md derives both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from idlegrid.core.planner.matching import bottleneck_matching, shortest_open_path
from idlegrid.core.planner.topology import DTYPE_BYTES, Topology

IntMatrix = npt.NDArray[np.int64]
FloatMatrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Plan:
    """stages[j][i] is the device of stage j in pipeline i (stage 0 first)."""

    stages: tuple[tuple[int, ...], ...]

    @property
    def pipelines(self) -> list[list[int]]:
        """One device list per macro-batch, in stage order."""
        return [list(col) for col in zip(*self.stages, strict=True)]

    def matrix(self) -> IntMatrix:
        """The plan as a D_PP × D_DP integer array."""
        return np.asarray(self.stages, dtype=np.int64)

    @staticmethod
    def from_matrix(x: IntMatrix) -> Plan:
        """Build a Plan from a D_PP × D_DP integer array."""
        return Plan(tuple(tuple(int(v) for v in row) for row in x))


def _ratio(bits: int | None, dtype: str) -> float:
    return 1.0 if bits is None else min(1.0, bits / (8.0 * DTYPE_BYTES[dtype]))


class CostModel:
    """Precomputed link and device tables of one topology; all evaluations are pure."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.d, self.k = topo.stages, topo.data_parallel
        lat, bw = topo.latency_s(), topo.bandwidth_bps()
        self.lat, self.bw = lat, bw
        # DT-FM: every exchange has equal volume both ways, so links are averaged.
        sym_lat, sym_bw = (lat + lat.T) / 2, (bw + bw.T) / 2
        self.w_pp = sym_lat + topo.activation_bytes() * 8 / sym_bw
        w_dp = 2 * (sym_lat + topo.gradient_bytes() * 8 / (self.k * sym_bw))
        np.fill_diagonal(w_dp, 0.0)
        self.w_dp = w_dp
        self._init_full()

    def _init_full(self) -> None:
        t, m = self.topo, self.topo.model
        self.micro = t.micro_batches()
        self.layers = np.asarray(t.layers_per_stage(), dtype=np.float64)
        flops = m.flops_per_sequence_layer() * m.micro_batch
        fwd_share = 1 / 4 if m.recompute else 1 / 3
        speed = np.array([dv.tflops * 1e12 * m.mfu for dv in t.devices])
        self.fwd_layer = flops * fwd_share / speed  # seconds per layer per micro-batch
        self.bwd_layer = flops * (1 - fwd_share) / speed
        c = t.compression
        self.flushes = m.accumulation
        act_bits = t.activation_bytes() / (self.micro * self.flushes) * 8
        self.fwd_bits = act_bits * _ratio(c.activation_bits, m.dtype)
        self.bwd_bits = act_bits * _ratio(c.backward_bits, m.dtype)
        grad_ratio = _ratio(c.gradient_bits, m.grad_dtype)
        self.shard_bits = np.array(
            [t.gradient_bytes(int(lj)) * grad_ratio * 8 / self.k for lj in self.layers]
        )

    # ---- DT-FM -----------------------------------------------------------------------

    def dtfm_group(self, group: IntMatrix) -> float:
        """Eq. 2 for one data-parallel group: its slowest device's sequential exchanges."""
        return float(self.w_dp[np.ix_(group, group)].sum(axis=1).max())

    def dtfm_link(self, a: IntMatrix, b: IntMatrix) -> tuple[float, list[int]]:
        """Eq. 3 edge weight between two groups: bottleneck matching (value, b index of a)."""
        return bottleneck_matching(self.w_pp[np.ix_(a, b)])

    def dtfm_plan(self, x: IntMatrix) -> dict[str, float]:
        """DT-FM cost of a plan as given: its own stage order and pipeline matching."""
        dp = max(self.dtfm_group(row) for row in x)
        hops = self.w_pp[x[:-1], x[1:]].max(axis=1).sum() if self.d > 1 else 0.0
        pp = 2 * float(hops)
        return {"total": dp + pp, "data_parallel": dp, "pipeline": pp}

    def dtfm_partition(self, groups: IntMatrix) -> tuple[float, IntMatrix]:
        """DT-FM cost of a partition with optimal stage order and matchings, and that plan."""
        d = self.d
        weights = np.zeros((d, d))
        perms: dict[tuple[int, int], list[int]] = {}
        for a in range(d):
            for b in range(a + 1, d):
                val, perm = self.dtfm_link(groups[a], groups[b])
                weights[a, b] = weights[b, a] = val
                perms[(a, b)] = perm
        path, order = shortest_open_path(weights)
        dp = max(self.dtfm_group(row) for row in groups)
        return dp + 2 * path, self.chain(groups, order, perms)

    @staticmethod
    def chain(
        groups: IntMatrix, order: list[int], perms: dict[tuple[int, int], list[int]]
    ) -> IntMatrix:
        """Lay groups out in `order`, aligning columns along each boundary's matching."""
        rows = [groups[order[0]].copy()]
        for a, b in zip(order, order[1:], strict=False):
            if (a, b) in perms:
                perm = perms[(a, b)]  # perm[p] = position in b matched to position p of a
                nxt = groups[b][perm]
            else:
                inv = perms[(b, a)]  # inv[q] = position in a matched to position q of b
                nxt = np.empty_like(groups[b])
                nxt[inv] = groups[b]
            # rows[-1] is a permutation of groups[a]; follow that permutation.
            pos_in_a = {int(v): p for p, v in enumerate(groups[a])}
            rows.append(np.array([nxt[pos_in_a[int(v)]] for v in rows[-1]], dtype=np.int64))
        return np.stack(rows)

    # ---- full model ------------------------------------------------------------------

    def full_parts(self, x: IntMatrix) -> dict[str, float]:
        """Full-model iteration time of a plan and its parts (seconds)."""
        pipe, bubble, busy, link = self._pipelines(x)
        dp = self._data_parallel(x)
        slow = int(pipe.argmax())
        return {
            "total": float(pipe[slow] + dp.max()),
            "pipeline": float(pipe[slow]),
            "bubble": float(bubble[slow]),
            "data_parallel": float(dp.max()),
            "compute": float(busy),
            "activation_comm": float(link),
        }

    def full_score(self, x: IntMatrix) -> tuple[float, float]:
        """(iteration time, tie-break): the mean pipeline and DP times separate plateaus."""
        pipe = self._pipelines(x)[0]
        dp = self._data_parallel(x)
        return float(pipe.max() + dp.max()), float(pipe.mean() + dp.mean())

    def _pipelines(self, x: IntMatrix) -> tuple[FloatMatrix, FloatMatrix, float, float]:
        m = self.micro
        comp_f = self.layers[:, None] * self.fwd_layer[x]
        comp_b = self.layers[:, None] * self.bwd_layer[x]
        if self.d > 1:
            a, b = x[:-1], x[1:]
            link_f = self.fwd_bits / self.bw[a, b]
            link_b = self.bwd_bits / self.bw[b, a]
            lat_f, lat_b = self.lat[a, b].sum(axis=0), self.lat[b, a].sum(axis=0)
            bott_f = np.maximum(comp_f.max(axis=0), link_f.max(axis=0))
            bott_b = np.maximum(comp_b.max(axis=0), link_b.max(axis=0))
            fill_f = comp_f.sum(axis=0) + link_f.sum(axis=0) + lat_f - bott_f
            fill_b = comp_b.sum(axis=0) + link_b.sum(axis=0) + lat_b - bott_b
            busiest_link = float((m * (link_f + link_b)).max())
        else:
            bott_f, bott_b = comp_f[0], comp_b[0]
            fill_f = fill_b = np.zeros(self.k)
            busiest_link = 0.0
        # Flow line of identical jobs: the fill passes every server once, then the slowest
        # server paces the remaining jobs. Latency delays a micro-batch, it never paces one.
        # Gradient accumulation repeats the whole flush, bubble included.
        steady = self.flushes * m * (bott_f + bott_b)
        bubble = self.flushes * (fill_f + fill_b)
        busy = float((self.flushes * m * (comp_f + comp_b)).max())
        return steady + bubble, bubble, busy, self.flushes * busiest_link

    def _data_parallel(self, x: IntMatrix) -> FloatMatrix:
        if self.k == 1:
            return np.zeros(self.d)
        lat = self.lat[x[:, :, None], x[:, None, :]]  # [stage, sender, receiver]
        bw = self.bw[x[:, :, None], x[:, None, :]]
        t = 2 * (lat + self.shard_bits[:, None, None] / bw)  # scatter + gather of one shard
        send, recv = t.sum(axis=2), t.sum(axis=1)
        out: FloatMatrix = np.maximum(send, recv).max(axis=1)
        return out

    def evaluate(self, x: IntMatrix) -> dict[str, dict[str, float]]:
        """Both cost models' breakdowns for a plan as given."""
        return {"dtfm": self.dtfm_plan(x), "full": self.full_parts(x)}
