"""What a coordinator service may use: settings, the store, the clock, randomness, metrics,
the change feed and the event bus. Services take a `Context`, never each other; the
composition root (`app.py`) builds them and wires what one domain must know of another."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import to_thread

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.db.store import Store
from idlegrid.coordinator.events import ChangeFeed, Events
from idlegrid.coordinator.metrics import Metrics

T = TypeVar("T")


@dataclass(eq=False)
class Context:
    """The narrow set of things every coordinator service is built with."""

    settings: CoordinatorSettings
    store: Store
    clock: Callable[[], float]
    metrics: Metrics = field(default_factory=Metrics)
    changes: ChangeFeed = field(default_factory=ChangeFeed)
    events: Events = field(default_factory=Events)
    # The epoch secret behind every beacon draw (audits, referees, row openings); its hash
    # is published, the secret never is. Injectable so a test can replay a draw.
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # Nodes ejected after failed audits: trust and training decide, every domain reads.
    ejected: set[str] = field(default_factory=set)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call in a worker thread."""
        return await to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def long_poll(
        self, wake: asyncio.Event, claim: Callable[[], T | None], wait_s: float
    ) -> T | None:
        """`claim()` (a store call) until it returns something or `wait_s` passes, retried
        when `wake` is set and at least every second (a wake-up can come from another
        coordinator process writing the same database)."""
        deadline = self.clock() + wait_s
        while True:
            wake.clear()
            got = await self.db(claim)
            if got is not None:
                return got
            remaining = deadline - self.clock()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(remaining, 1.0))
