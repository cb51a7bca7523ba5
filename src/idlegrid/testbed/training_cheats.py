"""Cheating training providers and a lazy verifier, for the cheat matrix (tests and bench).

Each cheat is a `Trainer` that commits leaves exactly as an honest one would (same format,
same chain of custody) but saves work or changes the training in one way. `affected(seg)`
says which segments carry the fault: the matrix asserts every audit of those fails and
every audit of the others passes. Imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from idlegrid.agent.roles.trainer import TorchExecutor
from idlegrid.core.training.proof import StepLeaf, TrainingCommitment, Verdict
from idlegrid.core.training.spec import JobSpec, ModelSpec, batch_indices
from idlegrid.training.optrace import Recorder, Tamper, Trace
from idlegrid.training.verified import (
    AuditReport,
    State,
    Trainer,
    build_state,
    checkpoint_bytes,
    set_step,
    state_hash,
)


class WrongData(Trainer):
    """Trains on other windows than the job seed picks (e.g. its own cheaper data)."""

    def batch(self, step: int) -> torch.Tensor:
        """Windows of another seed."""
        s = self.spec
        idx = batch_indices(s.job_seed + 1, step, s.dataset.windows, s.batch_size)
        return self.windows[idx]


class SkipSteps(Trainer):
    """Does every other step: the skipped ones only bump the counter and repeat the loss."""

    last_loss = 5.0

    def train_step(self, state: State) -> float:
        """Real step on even steps, nothing on odd ones."""
        if state.step % 2:
            set_step(state, state.step + 1)
            return self.last_loss
        self.last_loss = super().train_step(state)
        return self.last_loss


class ChangedLR(Trainer):
    """Uses twice the spec's learning rate (fewer steps to reach a loss, or just sloppy)."""

    factor = 2.0

    def apply_update(self, state: State) -> None:
        """The optimizer step at a scaled learning rate."""
        for g in state.optimizer.param_groups:
            g["lr"] = self.spec.optimizer.lr * self.factor
        state.optimizer.step()


class LowerPrecision(Trainer):
    """Computes forward and backward in bfloat16 autocast (cheaper on most hardware)."""

    def loss_of(self, state: State, xb: torch.Tensor) -> torch.Tensor:
        """The loss under bf16 autocast."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().loss_of(state, xb).float()


class NoisyUpdates(Trainer):
    """Adds Gaussian noise to every update, `scale` times that update's norm."""

    scale = 0.05

    def apply_update(self, state: State) -> None:
        """The optimizer step plus noise."""
        p = state.buffers["params"]
        before = p.clone()
        state.optimizer.step()
        with torch.no_grad():
            upd = float(torch.linalg.vector_norm(p - before))
            g = torch.Generator().manual_seed(state.step)
            noise = torch.randn(p.shape, generator=g)
            p.add_(noise * (self.scale * upd / float(torch.linalg.vector_norm(noise))))


class Interpolated(Trainer):
    """The "infinitesimal update" spoof: per segment, reach a target cheaply (a quarter of
    the steps at four times the learning rate) and commit straight-line interpolations from
    the start to it as the per-step states."""

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        super().__init__(spec, threads, overlap_hash=False)  # writes the buffers directly
        self._plan: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def train_step(self, state: State) -> float:
        """Set the state to the next interpolation point."""
        k = self.spec.checkpoint_interval
        a = state.step - state.step % k
        b = min(a + k, self.spec.steps)
        if a not in self._plan:
            start = {n: t.clone() for n, t in state.buffers.items()}
            shadow = build_state(self.spec, 0)
            for n, t in shadow.buffers.items():
                t.copy_(start[n])
            set_step(shadow, a)
            for g in shadow.optimizer.param_groups:
                g["lr"] = self.spec.optimizer.lr * 4
            for _ in range(max(1, (b - a) // 4)):
                Trainer.train_step(self, shadow)
            self._plan[a] = (start, {n: t.clone() for n, t in shadow.buffers.items()})
        start, target = self._plan[a]
        frac = (state.step + 1 - a) / (b - a)
        with torch.no_grad():
            for n, t in state.buffers.items():
                t.copy_(start[n] + frac * (target[n] - start[n]))
        set_step(state, state.step + 1)
        return 5.0 - 0.001 * state.step


class SelectiveHonest(Trainer):
    """Trains honestly only on the segments it guesses will be audited (even ones) and
    skips every step of the others; the beacon draws after the commit, so the guess is
    worth nothing."""

    def train_step(self, state: State) -> float:
        """Honest on even segments, a no-op on odd ones."""
        if (state.step // self.spec.checkpoint_interval) % 2 == 0:
            return super().train_step(state)
        set_step(state, state.step + 1)
        return 4.0

    def affected(self, segment: int) -> bool:
        """Only the faked segments carry the fault."""
        return segment % 2 == 1


class SwappedInit(Trainer):
    """Starts from other initial weights (another seed: e.g. a model it already has)."""

    def initial_state(self) -> State:
        """Weights from the wrong seed."""
        return build_state(self.spec, self.spec.init_seed + 1)

    def affected(self, segment: int) -> bool:
        """The break in the chain of custody sits in the first segment (W0 -> step 0)."""
        return segment == 0


class SwappedArch(Trainer):
    """Trains a smaller model (one layer fewer) and commits its states as the job's."""

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        small = dataclasses.replace(spec.model, layers=max(1, spec.model.layers - 1))
        if small == spec.model:
            small = dataclasses.replace(spec.model, dim=spec.model.dim // 2)
        self.real_spec = spec
        super().__init__(
            dataclasses.replace(spec, model=ModelSpec(**dataclasses.asdict(small))), threads
        )


class FaultyOp(Trainer):
    """One corrupted operator output at one step (a silent hardware or kernel fault, or a
    targeted cheat): the dispute game must land on exactly that (step, op)."""

    def __init__(
        self, spec: JobSpec, threads: int | None = None, step: int = 0, op_index: int = 0
    ) -> None:
        # its fault may land on a view of the weights, outside the optimizer: no overlap
        super().__init__(spec, threads, overlap_hash=False)
        self.fault = (step, op_index)
        self._tracing = False

    def train_step(self, state: State) -> float:
        """An honest step, except the faulty one runs with op `op_index` perturbed."""
        if state.step != self.fault[0] or self._tracing:
            return super().train_step(state)
        with Recorder(tamper=(self.fault[1], _perturb)):
            return super().train_step(state)

    def trace_step(
        self, state: State, keep: int | None = None, tamper: Tamper | None = None
    ) -> Trace:
        """Its trace of the faulty step shows the fault it committed."""
        if state.step == self.fault[0]:
            tamper = (self.fault[1], _perturb)
        self._tracing = True
        try:
            return super().trace_step(state, keep, tamper)
        finally:
            self._tracing = False


def _perturb(t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel():
        # through .data: a fault in the kernel's output, invisible to autograd's version check
        t.data.add_(1e-3)


class DeletesCheckpoints(Trainer):
    """Honest training, but it throws its checkpoints away after committing (saves disk)."""

    keeps_checkpoints = False


@dataclass
class Provider:
    """A provider's run of a whole job: its commitments and the checkpoints it still holds."""

    trainer: Trainer
    commitments: list[TrainingCommitment]
    held: dict[int, bytes]  # step -> checkpoint bytes (segment boundaries)

    def checkpoint(self, step: int) -> bytes | None:
        """Answer an availability probe or a verifier's fetch; None if not held."""
        return self.held.get(step)


def run_job(trainer: Trainer, job_id: str) -> Provider:
    """Run every segment of the trainer's job; keep boundary checkpoints unless it deletes."""
    state = trainer.initial_state()
    held = {0: checkpoint_bytes(state)}
    commitments = []
    real_steps = getattr(trainer, "real_spec", trainer.spec).steps
    while state.step < real_steps:
        state, c, end = trainer.run_segment(state, job_id)
        commitments.append(c)
        held[c.end_step] = end
    if not getattr(trainer, "keeps_checkpoints", True):
        held = {}
    return Provider(trainer, commitments, held)


CHEATS: dict[str, Callable[[JobSpec, int | None], Trainer]] = {
    "wrong-data": WrongData,
    "fewer-steps": SkipSteps,
    "changed-lr": ChangedLR,
    "lower-precision": LowerPrecision,
    "interpolated": Interpolated,
    "selective": SelectiveHonest,
    "noise": NoisyUpdates,
    "swapped-init": SwappedInit,
    "swapped-arch": SwappedArch,
    "deletes-checkpoints": DeletesCheckpoints,
}


def affected(trainer: Trainer, segment: int) -> bool:
    """Does this provider's fault lie in `segment`? (Every segment, unless it says.)"""
    fn = getattr(trainer, "affected", None)
    return True if fn is None else bool(fn(segment))


def lazy_audit(commitment: TrainingCommitment, verifier_class: str) -> AuditReport:
    """A lazy verifier: approves without replaying by echoing the committed leaves."""
    return AuditReport(
        Verdict(True, None, "looks fine"), list(commitment.leaves), 0.0, 0.0, verifier_class
    )


def honest_start_hash(spec: JobSpec) -> bytes:
    """Hash of the spec's true initial state (what segment 0 must start from)."""
    return state_hash(build_state(spec, spec.init_seed))


class LyingVerifier(TorchExecutor):
    """A training verifier whose replay lies from the segment's second step on: its audits
    fail honest segments. Its training and op traces are honest (a lie at the op level has
    nothing to stand on), so a dispute ends with both op chains equal and the referee's
    recompute of the step siding with the provider. Plugs in as `train_executor`."""

    def replay(
        self, spec: Any, start: bytes, start_step: int, end_step: int
    ) -> tuple[list[Any], bytes]:
        """An honest replay whose state hashes are false from the second step on."""
        leaves, end = super().replay(spec, start, start_step, end_step)
        return [
            StepLeaf(x.step, bytes(29) + b"lie", x.loss) if i >= 1 else x
            for i, x in enumerate(leaves)
        ], end


__all__ = [
    "CHEATS",
    "LyingVerifier",
    "Provider",
    "StepLeaf",
    "affected",
    "honest_start_hash",
    "lazy_audit",
    "run_job",
]
