"""The supervisor's wake: a new lease order is adopted on a pass run at once, not up to
an interval later (docs/leases.md)."""

from __future__ import annotations

import asyncio

from idlegrid.coordinator.supervisor import Supervisor


def test_a_wake_runs_the_next_pass_before_its_interval() -> None:
    async def main() -> int:
        passes: list[int] = []
        first, second = asyncio.Event(), asyncio.Event()

        async def live() -> frozenset[str]:
            return frozenset()

        async def tick(_: frozenset[str]) -> None:
            passes.append(1)
            (first if len(passes) == 1 else second).set()

        sup = Supervisor(live, [tick], interval_s=3600.0)
        sup.start()
        try:
            await asyncio.wait_for(first.wait(), 10)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sup.wake)  # from another thread, as the market
            await asyncio.wait_for(second.wait(), 10)  # an hour's interval: only a wake
            return len(passes)
        finally:
            await sup.stop()

    assert asyncio.run(main()) == 2
