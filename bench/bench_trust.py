"""Trust benchmark: cheat-matrix detection, honest false positives across thread counts,
tolerance calibration, commitment cost and size, verifier cost, false-slash bound.

    PYTHONPATH=src python bench/bench_trust.py --audits 1000 --honest 10000

`--audits 0` skips the cheat matrix; a running summary is printed every `--batch` honest
audits, so a run cut short still reports what it did.

Runs on the tiny seeded engine (the issue allows a tiny model); every audit is the real
code path: generate with the recorder, build the commitment, recompute in one prefill,
judge. Honest audits alternate the provider's and the verifier's thread counts (1 vs 2) and,
every other block of four, verify on a float64 build of the same model (other kernels and
accumulation order: the stand-in for "another engine" on this CPU box), so they include
cross-class pairs. CI runs the same functions with small counts
(tests/integration/test_trust_matrix.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from idlegrid.core.trust.economics import AuditPolicy, false_slash_probability, tail_fail_rate
from idlegrid.testbed import cheats
from idlegrid.testbed.trust_matrix import TOL, cheat_matrix, honest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audits", type=int, default=1000)
    ap.add_argument("--honest", type=int, default=10000)
    ap.add_argument(
        "--batch",
        type=int,
        default=250,
        help="honest audits between running summaries (a cut-short run still reports what it did)",
    )
    args = ap.parse_args()
    if args.audits:
        t = time.perf_counter()
        matrix = cheat_matrix(args.audits)
        print(f"cheat matrix ({args.audits} audits each, {time.perf_counter() - t:.0f} s):")
        for k, rate in matrix.items():
            print(f"  ({k}) {cheats.CHEATS[k].__name__:<14} detected {rate:.4f}")
    fails, rels, margins, gen, ver = 0, [], [], [], []
    done = 0
    while done < args.honest:
        n = min(args.batch, args.honest - done)
        f, r, m, g, v = honest(n, start=done)
        fails, done = fails + f, done + n
        rels += r
        margins += m
        gen += g
        ver += v
        _summary(done, fails, rels, margins, gen, ver)


def _summary(
    n: int, fails: int, rels: list[float], margins: list[float], gen: list[float], ver: list[float]
) -> None:
    print(
        f"honest: {fails} false positives in {n} audits (threads 1/2 mixed, "
        "half verified on the float64 build)"
    )
    print(
        f"  worst rel err: max {max(rels):.3g}, median {statistics.median(rels):.3g}"
        f" (tolerance {TOL.rel:g}: {TOL.rel / max(rels):.0f}x headroom)"
    )
    print(
        f"  closest honest sampling race: {min(margins):.3g} (a token fails below -{TOL.margin:g})"
    )
    ratio = statistics.median(ver) / statistics.median(gen)
    print(
        f"  generation median {statistics.median(gen) * 1e3:.1f} ms, verification median"
        f" {statistics.median(ver) * 1e3:.1f} ms, ratio {ratio:.3f}"
    )
    policy = AuditPolicy()
    print(
        f"  verifier compute at steady p={policy.steady:.4f}: "
        f"{policy.steady * ratio * 100:.3f}% of generation"
    )
    logm = [math.log10(TOL.rel / max(r, 1e-12)) for r in rels]
    eps = tail_fail_rate(logm)
    print(f"  fitted per-audit false-fail rate (log-normal tail): {eps:.3g}")
    print(
        f"  P(false slash) over 1e6 requests at p={policy.steady:.4f}, confirmed by a"
        f" referee: {false_slash_probability(1_000_000, policy.steady, eps, eps):.3g}",
        flush=True,
    )


if __name__ == "__main__":
    main()
