"""Cheater economics under the audit policy (issue 15): expected profit of a provider that
cheats on a share of its requests, and how soon it is ejected, at two stake levels.

    PYTHONPATH=src python bench/bench_cheat_economics.py --runs 2000

Pure policy code (`core/trust/cheatsim.py`), seeded: the same command prints the same table.
Amounts are in units of the request price R; profit is over serving honestly.
"""

from __future__ import annotations

import argparse

from idlegrid.core.trust.cheatsim import simulate
from idlegrid.core.trust.economics import AuditPolicy

RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stakes", default="100,10", help="stake levels, in units of R")
    args = ap.parse_args()
    pol = AuditPolicy()
    print(
        f"policy: steady rate {pol.steady:.4f} at S = {pol.stake:g} R, probation "
        f"{pol.full_audits} full audits, ejection at {pol.max_failures} failures "
        f"or any failure in probation; {args.runs} cheaters x {args.requests:,} requests"
    )
    print(
        "| stake (R) | cheat rate | expected profit (R) | ± s.e. | ejected "
        "| 99% ejected within (requests) |"
    )
    print("|---|---|---|---|---|---|")
    for stake in (float(s) for s in args.stakes.split(",")):
        for rate in RATES:
            o = simulate(rate, requests=args.requests, runs=args.runs, seed=args.seed, stake=stake)
            within = f"{o.ejected_by:,}" if o.ejected_by is not None else "not all"
            print(
                f"| {stake:g} | {rate:.0%} | {o.mean_profit:.1f} | {o.profit_se:.1f} | "
                f"{o.ejected_share:.1%} | {within} |"
            )


if __name__ == "__main__":
    main()
