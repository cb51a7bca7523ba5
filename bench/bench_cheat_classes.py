"""Per cheat class, on a real loopback grid with the default model (issue 15): answers the
cheater served before it stopped earning, and its net credits.

    PYTHONPATH=src python bench/bench_cheat_classes.py [--cap 60] [--only invented,...]

Each scenario is a real coordinator (SQLite, default trust policy unless named below) and
unmodified agents on llama.cpp gemma3:270m Q4_K_M (one thread each), every node with the
default 5-credit inference stake posted, the consumer
paying through the official `openai` client. The cheat is the cheapest provider (routing
sends it the work first) or a verifier with the larger stake (the draw picks it first).
Requests go one at a time (8 tokens, T = 1) until the cheater is ejected or stops being
routed, or `--cap` requests. Net credits = the cheater's balances at the end (stake,
accrual, provider account) minus the 5 staked; "paid out" is what reached its provider
account, the only balance it can withdraw.

Provider cheats: `invented` (tokens of its own choosing), `seed-ignoring` (the right
distribution, its own randomness), `unverifiable` (honest numbers under an engine name no
verifier runs; probation budget set to 2,000 µcr so the run ends). Verifier cheats: `lazy`
(approves every audit without computing; every answer audited, so φ = 0.1 makes 10 % of
answers canaries), `holding`
(takes audits and never reports; audit expiry 3 s). Collusion: `collusion` (an inventing
provider whose partner verifier, with half the verifier stake, approves its answers beside
three honest verifiers; canaries off; the cheater disputes its failed audit and the
partner sits on the panel of 3). The pay cheats (no commitment, inflated
prompt count, part dump) are `tests/integration/test_pay_llamacpp.py`.
"""

from __future__ import annotations

import argparse

from idlegrid.testbed.cheat_grid import SCENARIOS, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=60)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    args = ap.parse_args()
    print("| cheat | requests sent | cheater's answers (verifiers: audits taken) | ejected "
          "| net credits (µcr) | paid out (µcr) | honest losses | ledger |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only.split(","):
        r = run(name, args.cap)
        print(
            f"| {name} | {r['requests']} ({r['refused']} refused) | {r['cheater work']} "
            f"| {r['ejected']} | {r['net']:+d} | {r['paid out']} | {r['honest losses'] or 'none'} "
            f"| {'ok' if r['ledger ok'] else 'BROKEN'} |",
            flush=True,
        )
        print(f"    record: {r['record']}", flush=True)
        if "partner audits" in r:
            print(f"    partner's audits: {r['partner audits']}; dispute: {r.get('dispute')}")


if __name__ == "__main__":
    main()
