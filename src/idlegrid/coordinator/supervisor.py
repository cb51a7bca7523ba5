"""The supervisor: one loop that ticks every domain in a fixed order.

Nodes first (which are live decides everything after), then each domain's own lifecycle,
inference last (it takes work back from the providers the nodes pass found dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("idlegrid.coordinator")

Tick = Callable[[frozenset[str]], Awaitable[None]]


class Supervisor:
    """Runs `live()` then every tick with the live set, every `interval_s`."""

    def __init__(
        self,
        live: Callable[[], Awaitable[frozenset[str]]],
        ticks: Sequence[Tick],
        interval_s: float,
    ) -> None:
        self._live = live
        self._ticks = list(ticks)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def once(self) -> None:
        """One pass over every domain."""
        live = await self._live()
        for tick in self._ticks:
            await tick(live)

    def start(self) -> None:
        """Start the loop (call from the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.once()
            except Exception:  # keep supervising whatever one pass hit
                log.exception("supervisor pass failed")
            await asyncio.sleep(self._interval_s)
