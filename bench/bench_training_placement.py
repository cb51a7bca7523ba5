"""Training placement benchmark: what pricing gangs with the planner's cost model buys.

    PYTHONPATH=src python bench/bench_training_placement.py [--offers 2000] [--seed 1]

A book of CPU offers at random prices (0.1 to 5 credits per device-hour), each provider
linked to its next 40 at 1.5, 10 or 100 Gbit/s (drawn). A data-parallel job of a
13M-parameter GPT (50 MB of gradients a step) asks for N = 2 and N = 4 providers. Prints,
per N: the cost (price × planned runtime ÷ reliability) of the gang the book takes with
the planner, beside the cost under the same model of the gang found without it (the first
gang that meets `min_link_gbps`, as for any other gang order): the ratio is what the
planner saves. And the time one match takes (milliseconds, this machine, noisy).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from idlegrid.core.ledger import MICRO
from idlegrid.core.market.auction import Book, Placement
from idlegrid.core.market.hardware import Device, Hardware
from idlegrid.core.market.offers import Offer
from idlegrid.core.planner.gang import NoLayout
from idlegrid.core.training.placement import job_order
from idlegrid.core.training.spec import JobSpec


def book(n: int, seed: int) -> Book:
    """Random CPU offers and links to each provider's next 40."""
    rng = random.Random(seed)
    offers = []
    for i in range(n):
        dev = Device("CPU", 1, 8.0)
        hw = Hardware(f"p{i}", "local", (dev,), cpus=4, ram_gb=16, reliability=0.95)
        offers.append(Offer(f"p{i}/CPU", hw, dev, rng.randint(1, 50) * MICRO // 10, {}, None, True))
    links = {
        frozenset((f"p{i}", f"p{j}")): rng.choice([1.5, 10.0, 100.0])
        for i in range(n)
        for j in range(i + 1, min(n, i + 40))
    }
    return Book(offers, links)


def main() -> None:
    """Print planned vs first-found gang cost and match times."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--offers", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    b = book(args.offers, args.seed)
    base = {"dataset": {"sha256": "ab" * 32}, "steps": 100, "batch_size": 16}
    for n in (2, 4):
        spec = JobSpec.parse({**base, "parallel": n, "model": {"dim": 512, "heads": 8}})
        order = job_order("j", 0, spec, {}, 10.0)
        t = time.perf_counter()
        for _ in range(100):
            planned = b.match(order)
        ms = (time.perf_counter() - t) / 100 * 1e3
        first = b.match(dataclasses.replace(order, gang_shape=()))
        assert isinstance(planned, Placement) and isinstance(first, Placement)
        legs = [(b.index[leg.offer_id], leg.devices, leg.unit_price) for leg in first.legs]
        got = b._planned(order, legs)
        assert not isinstance(got, NoLayout)
        first_cost = got[1]
        print(
            f"N={n}: planned gang cost {planned.score:.0f}, first-found {first_cost:.0f} "
            f"(x{first_cost / planned.score:.2f}); {ms:.2f} ms per match"
        )


if __name__ == "__main__":
    main()
