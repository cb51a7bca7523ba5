"""The training cheat matrix, honest audits and disputes as plain loops over the real
executor (no grid): bench/bench_training.py runs them with large counts, the tests with
small ones. Every audit is the real verifier path (`audit_segment`); every dispute is the
real game (`core.training.dispute.play`) over real operator traces. Imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from idlegrid.core.training import dispute
from idlegrid.core.training.proof import TrainingCommitment
from idlegrid.core.training.spec import JobSpec
from idlegrid.testbed.training_cheats import CHEATS, Provider, affected, run_job
from idlegrid.training.optrace import OpRecord
from idlegrid.training.verified import (
    AuditReport,
    Trainer,
    audit_segment,
    checkpoint_bytes,
    referee_op,
    state_hash,
)


def audit(
    spec: JobSpec, prov: Provider, seg: int, verifier_threads: int, microbatches: int = 1
) -> AuditReport:
    """Audit segment `seg` of a provider's run on a verifier with this thread count."""
    c = prov.commitments[seg]
    return audit_segment(
        spec,
        c,
        prov.checkpoint(c.start_step),
        prov.checkpoint(c.end_step),
        provider_class=prov.trainer.determinism_class(),
        threads=verifier_threads,
        microbatches=microbatches,
    )


@dataclass(frozen=True)
class CheatResult:
    """Audits of one cheat: how many affected segments were caught, unaffected passed."""

    name: str
    affected_audits: int
    caught: int
    clean_audits: int
    clean_passed: int
    min_weight_dist: float | None


def cheat_matrix(
    spec: JobSpec,
    jobs: int = 1,
    provider_threads: int = 1,
    verifiers: tuple[tuple[int, int], ...] = ((1, 1), (2, 1)),
    names: tuple[str, ...] | None = None,
) -> list[CheatResult]:
    """Run every cheat on `jobs` jobs (job seeds 0..jobs−1) and audit every segment with
    each verifier (threads, micro-batches): the provider's class audits exactly, another
    class in tolerance mode."""
    out = []
    for name in names or tuple(CHEATS):
        aff = caught = clean = passed = 0
        dists: list[float] = []
        for j in range(jobs):
            s = _with_seed(spec, j)
            prov = run_job(CHEATS[name](s, provider_threads), f"job-{name}-{j}")
            for seg in range(len(prov.commitments)):
                for vt, vm in verifiers:
                    rep = audit(s, prov, seg, vt, vm)
                    if affected(prov.trainer, seg):
                        aff += 1
                        caught += not rep.verdict.ok
                        if rep.weight_dist is not None:
                            dists.append(rep.weight_dist)
                    else:
                        clean += 1
                        passed += rep.verdict.ok
        out.append(CheatResult(name, aff, caught, clean, passed, min(dists) if dists else None))
    return out


@dataclass(frozen=True)
class HonestResult:
    """Honest audits across thread counts: flagged count and the statistics' maxima."""

    audits: int
    flagged: int
    max_weight_dist: float
    max_loss_diff: float
    weight_dists: list[float]
    loss_diffs: list[float]
    replay_seconds: float
    train_seconds: float
    hash_seconds: float


THREAD_PAIRS = ((1, 2, 1, 1), (2, 1, 1, 1))
MICROBATCH_PAIRS = ((1, 1, 1, 2), (1, 1, 2, 1))


def honest_audits(
    spec: JobSpec,
    jobs: int,
    pairs: tuple[tuple[int, int, int, int], ...] = THREAD_PAIRS,
    progress: Callable[[int], None] | None = None,
    first_job: int = 0,
) -> HonestResult:
    """Honest jobs (seeds first_job .. first_job + jobs − 1), every segment audited
    cross-class per pair (provider threads, verifier threads, provider micro-batches,
    verifier micro-batches)."""
    n = flagged = 0
    wd: list[float] = []
    ld: list[float] = []
    replay = train = hashing = 0.0
    for j in range(first_job, first_job + jobs):
        s = _with_seed(spec, j)
        for pt, vt, pm, vm in pairs:
            tr = Trainer(s, pt, pm)
            t0 = time.perf_counter()
            prov = run_job(tr, f"job-honest-{j}")
            train += time.perf_counter() - t0
            hashing += tr.hash_seconds
            for seg in range(len(prov.commitments)):
                rep = audit(s, prov, seg, vt, vm)
                replay += rep.seconds
                n += 1
                flagged += not rep.verdict.ok
                if rep.weight_dist is not None:
                    wd.append(rep.weight_dist)
                ld.append(float(rep.verdict.detail.get("max_loss_diff", 0.0)))
        if progress is not None:
            progress(n)
    return HonestResult(
        n, flagged, max(wd, default=0.0), max(ld, default=0.0), wd, ld, replay, train, hashing
    )


def _with_seed(spec: JobSpec, j: int) -> JobSpec:
    import dataclasses

    return dataclasses.replace(spec, job_seed=spec.job_seed + j, init_seed=spec.init_seed + j)


def run_dispute(
    spec: JobSpec,
    provider: Trainer,
    challenger: Trainer,
    commitment: TrainingCommitment,
    start_ckpt: bytes | None,
) -> tuple[dispute.Outcome, float, int]:
    """Play a whole dispute over a committed segment between two executors; returns the
    outcome, wall seconds and the disputed step's op count."""
    t0 = time.perf_counter()

    def state_before(tr: Trainer, step: int):  # type: ignore[no-untyped-def]
        st = tr.initial_state() if start_ckpt is None else tr.load(start_ckpt)
        st, _ = tr.run(st, step)
        return st

    base = challenger.initial_state() if start_ckpt is None else challenger.load(start_ckpt)
    _, replayed = challenger.run(base, commitment.end_step)
    traces: dict[tuple[str, int], list[OpRecord]] = {}
    agreed: dict[int, bytes] = {}

    def op_records(party: str, step: int) -> list[bytes]:
        tr = provider if party == dispute.PROVIDER else challenger
        st = state_before(tr, step)
        if party == dispute.CHALLENGER:
            agreed[step] = checkpoint_bytes(st)
        traces[(party, step)] = tr.trace_step(st).records
        return [r.record_bytes() for r in traces[(party, step)]]

    def referee(step: int, j: int | None, _p: bytes, _c: bytes) -> tuple[bool, bool]:
        ck = agreed[step]
        if j is None:  # same ops: recompute the step's end state hash
            st = provider.load(ck)
            Trainer(spec, provider.threads).train_step(st)
            h = state_hash(st)
            return h == commitment.leaf(step).state_hash, h == replayed[
                step - commitment.start_step
            ].state_hash
        p_recs, c_recs = traces[(dispute.PROVIDER, step)], traces[(dispute.CHALLENGER, step)]
        p_rec = p_recs[j] if j < len(p_recs) else None
        c_rec = c_recs[j] if j < len(c_recs) else None
        if p_rec is None or c_rec is None:
            ref = Trainer(spec, provider.threads).trace_step(provider.load(ck)).records
            return (
                p_rec is not None and j < len(ref) and ref[j] == p_rec,
                c_rec is not None and j < len(ref) and ref[j] == c_rec,
            )
        kept = provider.trace_step(state_before(provider, step), keep=j)
        return referee_op(
            spec,
            ck,
            step,
            p_rec,
            c_rec,
            kept.calls.get(j),
            kept.inputs.get(j),
            threads=provider.threads,
        )

    out = dispute.play(commitment, [x.state_hash for x in replayed], op_records, referee)
    n_ops = len(traces.get((dispute.PROVIDER, out.step or 0), []))
    return out, time.perf_counter() - t0, n_ops
