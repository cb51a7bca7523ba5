"""Verified-training benchmark: hashing and verifier overhead, the cheat matrix, honest false
positives across thread counts, and dispute rounds and time.

    PYTHONPATH=src python bench/bench_training.py --part overhead
    PYTHONPATH=src python bench/bench_training.py --part matrix --audits 200 --honest 10000
    PYTHONPATH=src python bench/bench_training.py --part dispute --disputes 10

Every audit is the real verifier path (`audit_segment`: fetch-and-check checkpoints, replay,
judge) and every dispute the real game over real operator traces. Honest audits alternate
provider/verifier thread counts (1→2 and 2→1), so every one is cross-class (tolerance
mode). Baselines are in the same run: training without hashing for the hash overhead, the
training time of the audited segments for the verifier overhead. Medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

from idlegrid.core.training import dispute, proof
from idlegrid.core.training.spec import JobSpec
from idlegrid.core.trust.economics import tail_fail_rate
from idlegrid.testbed import training_cheats as tc
from idlegrid.testbed.training_matrix import (
    MICROBATCH_PAIRS,
    THREAD_PAIRS,
    cheat_matrix,
    honest_audits,
    run_dispute,
)
from idlegrid.training import verified as v

SMALL = {"seq": 16, "layers": 1, "dim": 32, "heads": 4}
DEFAULT = {"seq": 64, "layers": 4, "dim": 64, "heads": 4}


def make_spec(model: dict[str, int], batch: int, steps: int, k: int) -> JobSpec:
    """A job on the stdlib corpus with this shape."""
    return JobSpec.parse(
        {
            "dataset": {"ref": "stdlib:v1", "sha256": v.corpus_sha256(), "windows": 1024},
            "model": model,
            "batch_size": batch,
            "steps": steps,
            "checkpoint_interval": k,
        }
    )


def step_times(spec: JobSpec, threads: int, n: int) -> list[float]:
    """Per-step wall times of n steps with no hashing at all (the baseline)."""
    tr = v.Trainer(spec, threads)
    st = tr.initial_state()
    out = []
    with v._threads(threads):
        for _ in range(n):
            t = time.perf_counter()
            tr.train_step(st)
            out.append(time.perf_counter() - t)
    return out


def hash_cost(spec: JobSpec, threads: int, n: int, overlap: bool) -> float:
    """Seconds per step that hashing keeps the step waiting: the whole hash when
    synchronous, the wait at the optimizer barrier when overlapped."""
    tr = v.Trainer(spec, threads, overlap_hash=overlap)
    tr.run(tr.initial_state(), n)
    return tr.hash_seconds / n


def overhead(threads: int, n: int) -> None:
    """Hash cost per step ÷ step time, and verifier replay at the default rate ÷ training."""
    print(f"## overhead (threads {threads}, {n} steps per row, medians)")
    print(
        "| model | batch×seq | params | state MB | step ms (no hash) | hash ms (sync) "
        "| hash / step (sync) | wait ms (overlapped) | wait / step (overlapped) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, batch in (
        ("small", SMALL, 4),
        ("default", DEFAULT, 16),
        ("default", DEFAULT, 64),
    ):
        spec = make_spec(model, batch, n + 1, 10)
        base = statistics.median(step_times(spec, threads, n))
        sync = hash_cost(spec, threads, n, overlap=False)
        over = hash_cost(spec, threads, n, overlap=True)
        mb = spec.model.params * 12 / 1e6
        print(
            f"| {name} | {batch}×{spec.model.seq} | {spec.model.params:,} | {mb:.2f} | "
            f"{base * 1e3:.1f} | {sync * 1e3:.2f} | {sync / base:.2%} | {over * 1e3:.3f} | "
            f"{over / base:.2%} |",
            flush=True,
        )
    # verifier: one segment audited (same class: exact mode) vs the same segment trained
    spec = make_spec(DEFAULT, 16, 40, 10)
    ratios = []
    for j in range(2):
        s = dataclasses.replace(spec, job_seed=j)
        tr = v.Trainer(s, threads)
        t = time.perf_counter()
        prov = tc.run_job(tr, "job-o")
        per_seg = (time.perf_counter() - t) / len(prov.commitments)
        for c in prov.commitments:
            rep = v.audit_segment(
                s,
                c,
                prov.checkpoint(c.start_step),
                prov.checkpoint(c.end_step),
                provider_class=tr.determinism_class(),
                threads=threads,
            )
            assert rep.verdict.ok, rep.verdict
            ratios.append(rep.seconds / per_seg)
    ratio = statistics.median(ratios)
    p = proof.audit_rate(spec.price_per_step, spec.checkpoint_interval, spec.stake_required)
    print(
        f"\nverifier: audit / training time per segment (same class), median of "
        f"{len(ratios)}: {ratio:.2f} (replay + checkpoint checks + load)"
    )
    print(
        f"default stake {spec.stake_required:,} µcr = "
        f"{spec.stake_required // (spec.price_per_step * spec.checkpoint_interval)} segment "
        f"prices → steady audit rate 2·p* = {p:.4f} → verifier compute "
        f"{p * ratio:.2%} of training"
    )


def matrix(audits: int, honest: int, steps: int, k: int) -> None:
    """Detection per cheat and honest false positives, small model, short segments."""
    spec = make_spec(SMALL, 4, steps, k)
    n_seg = len(spec.segments())
    print(
        f"## cheat matrix (small model {spec.model.params:,} params, batch 4×16, "
        f"{n_seg} segments of {k} steps per job, provider 1 thread; verifiers: 1 thread "
        "(exact) and 1 thread with 2 micro-batches (tolerance))"
    )
    t = time.perf_counter()
    jobs = max(1, -(-audits // (2 * n_seg)))
    print(
        "| cheat | audits of affected segments | caught | rate | audits of clean segments "
        "| passed | min weight dist (tolerance mode) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in cheat_matrix(spec, jobs=jobs, verifiers=((1, 1), (1, 2))):
        md = f"{r.min_weight_dist:.3g}" if r.min_weight_dist is not None else "—"
        print(
            f"| {r.name} | {r.affected_audits} | {r.caught} | "
            f"{r.caught / r.affected_audits:.4f} | {r.clean_audits} | {r.clean_passed} | {md} |",
            flush=True,
        )
    print(f"(matrix: {time.perf_counter() - t:.0f} s)")
    if honest:
        honest_part(honest, steps, k)


def honest_part(honest: int, steps: int, k: int, chunk: int = 20, pairs: str = "threads") -> None:
    """Honest cross-class audits in chunks of jobs, cumulative statistics after each chunk
    (so a run cut short still reports exactly what it measured)."""
    spec = make_spec(SMALL, 4, steps, k)
    print(
        f"## honest audits, pairs differing in {pairs} (1 vs 2), {len(spec.segments())} "
        f"segments of {k} steps per job"
    )
    per_job = 2 * len(spec.segments())
    jobs = max(1, -(-honest // per_job))
    t = time.perf_counter()
    n = flagged = 0
    wd: list[float] = []
    ld: list[float] = []
    replay = train = hashing = 0.0
    for first in range(0, jobs, chunk):
        res = honest_audits(
            spec,
            jobs=min(chunk, jobs - first),
            first_job=10_000 + first,
            pairs=THREAD_PAIRS if pairs == "threads" else MICROBATCH_PAIRS,
        )
        n += res.audits
        flagged += res.flagged
        wd += res.weight_dists
        ld += res.loss_diffs
        replay += res.replay_seconds
        train += res.train_seconds
        hashing += res.hash_seconds
        s = sorted(wd)
        margins = [math.log10(proof.WEIGHT_TOL / max(x, 1e-12)) for x in s]
        eps = tail_fail_rate(margins) if len(margins) > 1 else float("nan")
        print(
            f"honest: {flagged} flagged in {n} cross-class audits "
            f"({time.perf_counter() - t:.0f} s); weight dist median "
            f"{statistics.median(s):.3g}, p99 {s[int(0.99 * (len(s) - 1))]:.3g}, max "
            f"{s[-1]:.3g} (threshold {proof.WEIGHT_TOL:g}: {proof.WEIGHT_TOL / s[-1]:.1f}x "
            f"headroom); loss diff max {max(ld):.3g} (threshold {proof.LOSS_TOL:g}); "
            f"fitted false-fail rate per audit {eps:.2g}; replay/train {replay / train:.2f}, "
            f"hash/train {hashing / train:.2%}",
            flush=True,
        )


def disputes(n: int) -> None:
    """Rounds and wall time of disputes over one segment with a faulty operator."""
    for name, model, batch, k in (("small", SMALL, 4, 8), ("default", DEFAULT, 16, 10)):
        spec = make_spec(model, batch, k, k)
        honest = v.Trainer(spec, 1)
        st, _ = honest.run(honest.initial_state(), 0)
        recs = honest.trace_step(st).records
        n_ops = len(recs)
        floats = [r.index for r in recs if r.output_summary]  # ops a fault can corrupt
        rounds, secs, bounds, ok = [], [], [], 0
        for i in range(n):
            t0 = (i * 7 + 3) % k
            j0 = floats[(i * 131 + 17) % len(floats)]
            cheat = tc.FaultyOp(spec, 1, step=t0, op_index=j0)
            prov = tc.run_job(cheat, "job-d")
            out, s, nops = run_dispute(spec, cheat, v.Trainer(spec, 1), prov.commitments[0], None)
            ok += out.winner == dispute.CHALLENGER and (out.step, out.op_index) == (t0, j0)
            rounds.append(out.rounds)
            secs.append(s)
            bounds.append(dispute.rounds_bound(k, nops))
        print(
            f"dispute ({name}, k={k}, N_ops={n_ops}): {ok}/{n} landed on the faulty step "
            f"and op and ruled against the provider; rounds median {statistics.median(rounds)}, "
            f"max {max(rounds)} (bound {max(bounds)}); wall median "
            f"{statistics.median(secs):.2f} s, max {max(secs):.2f} s"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--part", choices=("overhead", "matrix", "honest", "dispute", "all"), default="all"
    )
    ap.add_argument("--audits", type=int, default=200, help="audits per cheat (approx.)")
    ap.add_argument("--honest", type=int, default=1000, help="honest cross-class audits")
    ap.add_argument("--steps", type=int, default=8, help="steps per job in the matrix")
    ap.add_argument("--k", type=int, default=4, help="segment length in the matrix")
    ap.add_argument("--disputes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--pairs",
        choices=("threads", "microbatches"),
        default="threads",
        help="what differs between provider and verifier in --part honest",
    )
    ap.add_argument("--n", type=int, default=30, help="steps per overhead row")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    if args.part in ("overhead", "all"):
        overhead(args.threads, args.n)
    if args.part in ("dispute", "all"):
        disputes(args.disputes)
    if args.part in ("matrix", "all"):
        matrix(args.audits, args.honest, args.steps, args.k)
    elif args.part == "honest":
        honest_part(args.honest, args.steps, args.k, pairs=args.pairs)


if __name__ == "__main__":
    main()
