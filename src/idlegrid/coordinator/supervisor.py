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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def once(self) -> None:
        """One pass over every domain."""
        live = await self._live()
        for tick in self._ticks:
            await tick(live)

    def start(self) -> None:
        """Start the loop (call from the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run())

    def wake(self) -> None:
        """Run the next pass now, not at the end of the interval (from any thread): a new
        lease order is adopted within a pass instead of up to `interval_s` later."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    async def stop(self) -> None:
        """Stop the loop."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()  # a wake during this pass brings the next one forward
            try:
                await self.once()
            except Exception:  # keep supervising whatever one pass hit
                log.exception("supervisor pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
