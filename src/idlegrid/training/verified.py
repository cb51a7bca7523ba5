"""Deterministic, hashable training of the small GPT for verified jobs (the executor).

Everything a step depends on comes from the `JobSpec`: the initial weights from
`init_seed`, the batch of step s from `batch_indices(job_seed, s, ...)`, the learning rate
and optimizer from the spec. The provider chooses nothing.

The whole training state (weights, optimizer moments, step counter) lives in a few flat
contiguous float32 buffers: the parameters are views into one buffer and the AdamW moments
into two more. That makes the per-step state hash one SHA-256 pass over three memoryviews
with no copy, and a checkpoint is exactly the bytes that were hashed (a small JSON header
naming the layout, then the raw buffers), so `sha256(checkpoint) == state_hash` and a
fetched checkpoint is bound to the leaf it claims to be. Loading parses raw little-endian
floats: nothing in a checkpoint from an untrusted party can execute code.

Determinism class: torch version, device, dtype and intra-op thread count. Within a class
a replay is bitwise identical (exact audits); across classes results differ by float
rounding, and audits compare per-step losses and the end-weight distance instead.

Imports torch: the agent imports this lazily.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from idlegrid.core.training.proof import (
    LOSS_TOL,
    WEIGHT_TOL,
    StepLeaf,
    TrainingCommitment,
    Verdict,
    judge_segment,
)
from idlegrid.core.training.spec import JobSpec, batch_indices
from idlegrid.errors import InvalidRequest
from idlegrid.training.data import load_corpus, make_windows
from idlegrid.training.gpt import GPTConfig, build_stages
from idlegrid.training.optrace import OpCall, OpRecord, Recorder, Tamper, Trace, recompute_op

MAGIC = b"IGTRAIN1"
_LEN = struct.Struct("<I")
OnStep = Callable[[StepLeaf, float], None]


class CheckpointError(InvalidRequest):
    """A checkpoint that is malformed or does not fit the job's spec."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bad checkpoint: {message}", param="checkpoint")


# ---- data -----------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _corpus(ref: str) -> tuple[bytes, str]:
    if ref != "stdlib:v1":
        raise InvalidRequest(
            f"unknown data set {ref!r}; this provider holds stdlib:v1", param="spec.dataset.ref"
        )
    data = load_corpus()
    return data, hashlib.sha256(data).hexdigest()


def corpus_sha256(ref: str = "stdlib:v1") -> str:
    """SHA-256 of the bytes of a data set this machine holds (for building a spec)."""
    return _corpus(ref)[1]


@lru_cache(maxsize=8)
def _windows(ref: str, sha: str, seq: int, n: int) -> torch.Tensor:
    data, have = _corpus(ref)
    if have != sha:
        raise InvalidRequest(
            f"data set {ref} here hashes to {have}, the spec says {sha}",
            param="spec.dataset.sha256",
        )
    return make_windows(data, seq, n, 1).train


# ---- state ----------------------------------------------------------------------------------


def _layout(spec: JobSpec) -> dict[str, Any]:
    m = spec.model
    return {
        "v": 1,
        "arch": m.arch,
        "vocab": m.vocab,
        "seq": m.seq,
        "layers": m.layers,
        "dim": m.dim,
        "heads": m.heads,
        "opt": spec.optimizer.name,
    }


def _buffer_names(spec: JobSpec) -> tuple[str, ...]:
    return ("params", "exp_avg", "exp_avg_sq") if spec.optimizer.name == "adamw" else ("params",)


@dataclass
class State:
    """A model, its optimizer and the step count, over flat contiguous buffers."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    buffers: dict[str, torch.Tensor]
    header: bytes = field(repr=False, default=b"")

    @property
    def params(self) -> list[nn.Parameter]:
        """Parameters in their fixed order."""
        return list(self.model.parameters())


# build_stages seeds and draws from torch's global generator: states built at once on two
# threads (the ranks of an in-process gang, agents in one process) would interleave draws.
_INIT_LOCK = threading.Lock()


def build_state(spec: JobSpec, seed: int) -> State:
    """A fresh state for `spec` with weights from `seed` (the spec's own: `init_seed`)."""
    m = spec.model
    with _INIT_LOCK:
        model = build_stages(GPTConfig(m.vocab, m.seq, m.layers, m.dim, m.heads), 1, seed)[0]
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    buffers = {name: torch.zeros(total, dtype=torch.float32) for name in _buffer_names(spec)}
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            buffers["params"][off : off + n].copy_(p.reshape(-1))
            p.data = buffers["params"][off : off + n].view_as(p)
            off += n
    o = spec.optimizer
    opt: torch.optim.Optimizer
    if o.name == "adamw":
        opt = torch.optim.AdamW(
            params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, foreach=False
        )
        off = 0
        for p in params:  # moments as views into the flat buffers, so hashing needs no copy
            n = p.numel()
            opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": buffers["exp_avg"][off : off + n].view_as(p),
                "exp_avg_sq": buffers["exp_avg_sq"][off : off + n].view_as(p),
            }
            off += n
    else:
        opt = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, foreach=False)
    header = json.dumps({**_layout(spec), "numel": total}, sort_keys=True).encode()
    return State(0, model, opt, buffers, header)


def set_step(state: State, step: int) -> None:
    """Set the step counter (and the optimizer's per-parameter step) of a state."""
    state.step = step
    for st in state.optimizer.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step))


def _parts(state: State) -> list[Any]:
    head = MAGIC + _LEN.pack(len(state.header)) + state.header + struct.pack("<Q", state.step)
    return [head, *(state.buffers[n].numpy() for n in sorted(state.buffers))]


def _sha256_parts(parts: list[Any]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idlegrid-state-hash")


def state_hash(state: State) -> bytes:
    """SHA-256 of the canonical state bytes (= the checkpoint bytes), without copying."""
    return _sha256_parts(_parts(state))


def checkpoint_bytes(state: State) -> bytes:
    """The canonical state bytes: header, step, then the raw float32 buffers."""
    return b"".join(bytes(p) if isinstance(p, bytes) else p.tobytes() for p in _parts(state))


def checkpoint_hash(data: bytes) -> bytes:
    """Hash of a checkpoint; equals the `state_hash` of the state it captures."""
    return hashlib.sha256(data).digest()


def load_checkpoint(spec: JobSpec, data: bytes) -> State:
    """Parse a checkpoint into a fresh state for `spec`; CheckpointError if it does not fit."""
    state = build_state(spec, spec.init_seed)
    head = len(MAGIC) + _LEN.size
    if len(data) < head or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError("not an idlegrid training checkpoint")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    if hlen != len(state.header) or data[head : head + hlen] != state.header:
        raise CheckpointError("its layout (architecture or optimizer) is not the spec's")
    off = head + hlen
    numel = state.buffers["params"].numel()
    if len(data) != off + 8 + 4 * numel * len(state.buffers):
        raise CheckpointError(f"length {len(data)} does not fit the spec's model")
    (step,) = struct.unpack_from("<Q", data, off)
    off += 8
    for name in sorted(state.buffers):
        arr = torch.frombuffer(bytearray(data[off : off + 4 * numel]), dtype=torch.float32)
        if not torch.isfinite(arr).all():
            raise CheckpointError(f"{name} holds non-finite values")
        with torch.no_grad():
            state.buffers[name].copy_(arr)
        off += 4 * numel
    set_step(state, step)
    return state


def weight_distance(ckpt_a: bytes, ckpt_b: bytes, start: bytes | None = None) -> float:
    """Relative L2 distance of two checkpoints' weights: ‖a − b‖ / ‖b − start‖ (the update
    the segment made), or ‖a − b‖ / ‖b‖ without a start."""
    a, b = _params_of(ckpt_a), _params_of(ckpt_b)
    if a.shape != b.shape:
        return float("inf")
    ref = b - _params_of(start) if start is not None else b
    denom = float(torch.linalg.vector_norm(ref.double()))
    return float(torch.linalg.vector_norm((a - b).double())) / max(denom, 1e-30)


def _params_of(data: bytes) -> torch.Tensor:
    if data[: len(MAGIC)] != MAGIC:
        raise CheckpointError("not an idlegrid training checkpoint")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    off = len(MAGIC) + _LEN.size
    numel = int(json.loads(data[off : off + hlen])["numel"])
    off += hlen + 8
    if len(data) < off + 4 * numel:
        raise CheckpointError("truncated")
    # buffers are stored in sorted name order and "exp_avg*" < "params"
    n_buf = (len(data) - off) // (4 * numel)
    p_off = off + 4 * numel * (n_buf - 1)
    return torch.frombuffer(bytearray(data[p_off : p_off + 4 * numel]), dtype=torch.float32)


# ---- training -------------------------------------------------------------------------------


@contextmanager
def _threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        torch.use_deterministic_algorithms(prev_det)


class Trainer:
    """Runs a job's steps deterministically and commits a leaf per step.

    Subclasses (testbed/training_cheats.py) override `batch`, `loss_of`, `apply_update` or
    `train_step` to cheat; the audit path never trusts any of them.
    """

    def __init__(
        self,
        spec: JobSpec,
        threads: int | None = None,
        microbatches: int = 1,
        overlap_hash: bool = True,
    ) -> None:
        self.spec = spec
        self.threads = threads or torch.get_num_threads()
        if microbatches < 1 or spec.batch_size % microbatches:
            raise InvalidRequest(
                f"microbatches must divide the batch ({spec.batch_size})", param="microbatches"
            )
        # Gradient accumulation over equal micro-batches: the same mean loss and gradient,
        # summed in another order (as a smaller device would): another determinism class.
        self.microbatches = microbatches
        self.overlap_hash = overlap_hash
        self.windows = _windows(
            spec.dataset.ref, spec.dataset.sha256, spec.model.seq, spec.dataset.windows
        )
        self.hash_seconds = 0.0  # time spent hashing, for the overhead benchmark

    def determinism_class(self) -> str:
        """`torch-<version>/<device>/<dtype>/t<threads>[/mb<n>]`: bitwise within a class."""
        mb = f"/mb{self.microbatches}" if self.microbatches > 1 else ""
        return f"torch-{torch.__version__}/cpu/float32/t{self.threads}{mb}"

    def initial_state(self) -> State:
        """Weights from the spec's init seed, a fresh optimizer, step 0."""
        return build_state(self.spec, self.spec.init_seed)

    def load(self, data: bytes) -> State:
        """A state from checkpoint bytes (see `load_checkpoint`)."""
        return load_checkpoint(self.spec, data)

    def batch(self, step: int) -> torch.Tensor:
        """The (batch, seq + 1) windows of step `step`, fixed by the job seed."""
        s = self.spec
        return self.windows[batch_indices(s.job_seed, step, s.dataset.windows, s.batch_size)]

    def loss_of(self, state: State, xb: torch.Tensor) -> torch.Tensor:
        """Next-byte cross-entropy of the model on a batch."""
        logits = state.model(xb[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1))

    def apply_update(self, state: State) -> None:
        """The optimizer step (gradients are in place)."""
        state.optimizer.step()

    def train_step(self, state: State) -> float:
        """One optimizer step in place; returns its loss."""
        xb = self.batch(state.step)
        state.optimizer.zero_grad(set_to_none=True)
        if self.microbatches == 1:
            loss = self.loss_of(state, xb)
            loss.backward()
            value = float(loss.detach())
        else:
            value = 0.0
            for part in xb.chunk(self.microbatches):
                loss = self.loss_of(state, part) / self.microbatches
                loss.backward()
                value += float(loss.detach())
        self.apply_update(state)
        set_step(state, state.step + 1)
        return value

    def state_hash(self, state: State) -> bytes:
        """Hash of the whole state (timed into `hash_seconds`)."""
        t = time.perf_counter()
        h = state_hash(state)
        self.hash_seconds += time.perf_counter() - t
        return h

    def run(
        self, state: State, end_step: int, on_step: OnStep | None = None
    ) -> tuple[State, list[StepLeaf]]:
        """Train steps state.step .. end_step − 1 in place; one leaf per step.

        With `overlap_hash`, the state after step s is hashed on a worker thread, in place
        and without a copy, while step s+1 runs its forward and backward passes (which only
        read the buffers); an optimizer pre-step hook waits for the hash before the update
        writes them. hashlib releases the GIL, so on a spare core (or beside a GPU) the hash
        leaves the critical path. The leaves are identical either way; `on_step` reports
        each step one step late. Only for trainers that write the state through the
        optimizer (a subclass that writes them directly must turn it off).
        """
        leaves: list[StepLeaf] = []
        pending: list[tuple[Future[bytes], int, float, float]] = []

        def flush(*_: Any) -> None:
            while pending:
                fut, step, loss, tps = pending.pop()
                t = time.perf_counter()
                leaf = StepLeaf(step, fut.result(), loss)
                self.hash_seconds += time.perf_counter() - t  # time the step waited
                leaves.append(leaf)
                if on_step is not None:
                    on_step(leaf, tps)

        hook = state.optimizer.register_step_pre_hook(flush) if self.overlap_hash else None
        try:
            with _threads(self.threads):
                while state.step < end_step:
                    t = time.perf_counter()
                    loss = self.train_step(state)
                    flush()  # a step that never called the optimizer: keep step order
                    tps = self.spec.tokens_per_step / max(time.perf_counter() - t, 1e-9)
                    if hook is not None:
                        job = _HASHER.submit(_sha256_parts, _parts(state))
                        pending.append((job, state.step - 1, loss, tps))
                    else:
                        leaf = StepLeaf(state.step - 1, self.state_hash(state), loss)
                        leaves.append(leaf)
                        if on_step is not None:
                            on_step(leaf, tps)
                flush()
        finally:
            if hook is not None:
                hook.remove()
        return state, leaves

    def trace_step(
        self, state: State, keep: int | None = None, tamper: Tamper | None = None
    ) -> Trace:
        """Run one step in place under the operator recorder (dispute level 2)."""
        rec = Recorder(keep=keep, tamper=tamper)
        with _threads(self.threads), rec:
            self.train_step(state)
        return rec.trace

    def run_segment(
        self, state: State, job_id: str, on_step: OnStep | None = None
    ) -> tuple[State, TrainingCommitment, bytes]:
        """Train the segment that starts at state.step; (state, commitment, end checkpoint)."""
        start_hash = state_hash(state)
        end = min(state.step + self.spec.checkpoint_interval, self.spec.steps)
        state, leaves = self.run(state, end, on_step)
        return (
            state,
            TrainingCommitment(job_id, end - len(leaves), leaves, start_hash),
            checkpoint_bytes(state),
        )


# ---- verification ---------------------------------------------------------------------------


def replay(
    spec: JobSpec,
    start_checkpoint: bytes | None,
    start_step: int,
    end_step: int,
    threads: int | None = None,
    microbatches: int = 1,
) -> tuple[list[StepLeaf], bytes]:
    """What a verifier runs: steps start..end−1 from a checkpoint (None: the initial state).
    A data-parallel job replays as `spec.parallel` micro-batches (the same shards, summed)."""
    tr = Trainer(spec, threads, microbatches)
    state = tr.initial_state() if start_checkpoint is None else tr.load(start_checkpoint)
    if state.step != start_step:
        raise CheckpointError(f"checkpoint is at step {state.step}, not {start_step}")
    state, leaves = tr.run(state, end_step)
    return leaves, checkpoint_bytes(state)


def initial_state_hash(spec: JobSpec) -> bytes:
    """Hash of the spec's initial state: what the first segment must start from (cheap)."""
    return state_hash(build_state(spec, spec.init_seed))


def trace_step(
    spec: JobSpec,
    checkpoint: bytes | None,
    step: int,
    threads: int | None = None,
    keep: int | None = None,
) -> Trace:
    """Operator trace of step `step` from the checkpoint at its start (None: step 0 from the
    initial state)."""
    tr = Trainer(spec, threads)
    state = tr.initial_state() if checkpoint is None else tr.load(checkpoint)
    if state.step != step:
        raise CheckpointError(f"checkpoint is at step {state.step}, not {step}")
    return tr.trace_step(state, keep=keep)


def referee_op(
    spec: JobSpec,
    agreed_checkpoint: bytes,
    step: int,
    provider: OpRecord,
    challenger: OpRecord,
    call: OpCall | None,
    inputs: list[torch.Tensor] | None,
    threads: int | None = None,
) -> tuple[bool, bool]:
    """The referee's ruling on the first disputed op of `step`: (provider right, challenger
    right).

    Value dispute (same op, signature and input hashes, different output): recompute that
    one op on the inputs the provider hands over, checked against the agreed input hashes
    (inputs that do not check lose the provider the dispute). Structure dispute (the parties
    ran different ops or fed different inputs at the first point where their traces part):
    the op the program runs there is fixed by the spec, so the referee traces the step
    itself from the agreed checkpoint and compares (one step of work, not one op).
    """
    same_call = (provider.name, provider.signature, provider.input_hashes) == (
        challenger.name,
        challenger.signature,
        challenger.input_hashes,
    )
    n_threads = threads or torch.get_num_threads()
    if same_call and call is not None and inputs is not None and str(call.func) == provider.name:
        try:
            out = recompute_op(call, inputs, provider.input_hashes, n_threads)
        except ValueError:
            return False, True
        return out == provider.output_hash, out == challenger.output_hash
    ref = trace_step(spec, agreed_checkpoint, step, threads=n_threads).records
    if provider.index >= len(ref):
        return False, False
    return ref[provider.index] == provider, ref[provider.index] == challenger


@dataclass(frozen=True)
class AuditReport:
    """What a verifier reports: its recomputed leaves and distance, not just a yes/no."""

    verdict: Verdict
    leaves: list[StepLeaf]
    weight_dist: float | None
    seconds: float
    verifier_class: str


def audit_segment(
    spec: JobSpec,
    commitment: TrainingCommitment,
    start_ckpt: bytes | None,
    end_ckpt: bytes | None,
    *,
    provider_class: str,
    threads: int | None = None,
    loss_tol: float = LOSS_TOL,
    weight_tol: float = WEIGHT_TOL,
    microbatches: int = 1,
) -> AuditReport:
    """Re-execute a committed segment from the provider's own start checkpoint and judge it.

    The first segment starts from the spec's initial state (its hash must be the committed
    start hash); later ones from the fetched start checkpoint, which must hash to the
    committed start hash. The end checkpoint must be held and hash to the last leaf (the
    audit doubles as an availability probe); across determinism classes the distance of
    the replay's end weights to it is judged. A missing or unloadable checkpoint fails.
    """
    t0 = time.perf_counter()
    tr = Trainer(spec, threads, microbatches)
    cls = tr.determinism_class()
    first = commitment.start_step

    def fail(reason: str, step: int | None = first) -> AuditReport:
        return AuditReport(Verdict(False, step, reason), [], None, time.perf_counter() - t0, cls)

    if commitment.end_step > spec.steps:
        return fail("segment runs past the job's steps")
    try:
        if first == 0:
            state = tr.initial_state()
            start_bytes = checkpoint_bytes(state)
            if state_hash(state) != commitment.start_hash:
                return fail("the start state is not the spec's initial state")
        else:
            if start_ckpt is None:
                return fail("start checkpoint not available")
            if checkpoint_hash(start_ckpt) != commitment.start_hash:
                return fail("start checkpoint does not hash to the committed start")
            start_bytes = start_ckpt
            state = tr.load(start_ckpt)
            if state.step != first:
                return fail("start checkpoint is at another step")
    except InvalidRequest as e:
        return fail(e.message)
    if end_ckpt is None or checkpoint_hash(end_ckpt) != commitment.end_hash:
        # Also an availability probe: the segment's end checkpoint must be held and bound
        # to the last leaf, in either mode.
        return fail("end checkpoint missing or not the committed one", commitment.end_step - 1)
    state, leaves = tr.run(state, commitment.end_step)
    exact = provider_class == cls
    dist = None
    if not exact:
        try:
            dist = weight_distance(checkpoint_bytes(state), end_ckpt, start_bytes)
        except InvalidRequest as e:
            return fail(e.message, commitment.end_step - 1)
    verdict = judge_segment(
        commitment.leaves,
        leaves,
        exact=exact,
        loss_tol=loss_tol,
        weight_dist=dist,
        weight_tol=weight_tol,
    )
    return AuditReport(verdict, leaves, dist, time.perf_counter() - t0, cls)
