"""Data-parallel training of one verified job by a gang of providers (gloo over TCP).

Rank r of N computes the gradient of its shard of each step's batch (the r-th of N equal
contiguous chunks of `batch(step)`, so the data order stays a pure function of the job seed
and the step), the gang sums the gradients (each already divided by N), and every rank takes
the same optimizer step: the state stays identical on all ranks. That is exactly gradient
accumulation over N micro-batches (`Trainer(microbatches=N)`), which is how a single
verifier replays a gang's segment. At each segment's end the ranks compare state hashes:
a rank that diverged is a fault the gang refuses to commit.

The process group is a private `ProcessGroupGloo` on a prefixed `TCPStore`, not the
process-wide default group, so several gangs (or ranks, in tests) can live in one process.
Imports torch: the agent imports this lazily.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from idlegrid.core.training.spec import JobSpec
from idlegrid.errors import InvalidRequest
from idlegrid.training.verified import OnStep, State, StepLeaf, Trainer, set_step


class GangDiverged(RuntimeError):
    """The ranks' states differ after a segment: one of them computed something else."""


def split_addr(addr: str) -> tuple[str, int]:
    """`host:port` (the rendezvous rank 0 serves) as (host, port)."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidRequest(f"bad rendezvous address {addr!r}", param="rendezvous")
    return host.strip("[]"), int(port)


class DataParallelTrainer(Trainer):
    """One rank of a data-parallel gang: shard gradient, all-reduce, identical update."""

    def __init__(
        self,
        spec: JobSpec,
        rank: int,
        world: int,
        rendezvous: str,
        *,
        prefix: str = "",
        my_host: str = "127.0.0.1",
        threads: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(spec, threads)
        if world < 1 or not 0 <= rank < world or spec.batch_size % world:
            raise InvalidRequest(
                f"rank {rank} of {world} does not fit batch {spec.batch_size}", param="rank"
            )
        self.rank, self.world = rank, world
        host, port = split_addr(rendezvous)
        timeout = timedelta(seconds=timeout_s)
        # Rank 0 serves the store on its advertised port; the others connect (and wait for
        # it up to the timeout, so start order does not matter).
        self._store: Any = dist.TCPStore(
            host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=my_host)]
        self.pg: Any = dist.ProcessGroupGloo(
            dist.PrefixStore(prefix, self._store), rank, world, opts
        )

    def determinism_class(self) -> str:
        """`…/t<threads>/dp<world>`: the gang's class (a verifier replays it as mb<world>)."""
        return f"{super().determinism_class()}/dp{self.world}"

    def train_step(self, state: State) -> float:
        """One step: this rank's shard, the gang's summed gradient, the shared update."""
        xb = self.batch(state.step).chunk(self.world)[self.rank]
        state.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(state, xb) / self.world
        loss.backward()
        params = state.params
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        lv = torch.tensor([float(loss.detach())], dtype=torch.float64)
        self.pg.allreduce([flat]).wait()
        self.pg.allreduce([lv]).wait()
        off = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[off : off + n].view_as(p))  # type: ignore[union-attr]
                off += n
        self.apply_update(state)
        set_step(state, state.step + 1)
        return float(lv[0])

    def run(
        self, state: State, end_step: int, on_step: OnStep | None = None
    ) -> tuple[State, list[StepLeaf]]:
        """Train to `end_step`, then check that every rank ended in the same state."""
        state, leaves = super().run(state, end_step, on_step)
        if leaves:
            mine = torch.tensor(list(leaves[-1].state_hash), dtype=torch.int64)
            got = [torch.zeros_like(mine) for _ in range(self.world)]
            self.pg.allgather([got], [mine]).wait()
            bad = [r for r, h in enumerate(got) if not torch.equal(h, mine)]
            if bad:
                raise GangDiverged(
                    f"ranks {bad} ended step {end_step} in another state than rank {self.rank}"
                )
        return state, leaves

    def close(self) -> None:
        """Leave the gang: drop the process group and the store. Their destructors close
        the connections (once no collective of this rank is in flight), which the other
        ranks see at their next collective. Dropping rather than `shutdown()` is safe to
        call while a killed rank's training thread still finishes its step."""
        self.pg = None
        self._store = None
