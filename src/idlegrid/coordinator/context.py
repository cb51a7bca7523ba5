"""What a coordinator service may use: settings, the store, the clock, randomness, metrics,
the change feed and the event bus. Services take a `Context`, never each other; the
composition root (`app.py`) builds them and wires what one domain must know of another."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import to_thread
from sqlalchemy import event

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.db.store import Store
from idlegrid.coordinator.events import ChangeFeed, Events
from idlegrid.coordinator.metrics import Metrics

T = TypeVar("T")


class Ejected:
    """Which nodes are ejected: a read cache of the store's `TrustNode.ejected` rows.

    The store is the truth. The cache is only ever replaced by a fresh read of it: after the
    transaction that ejects (or re-admits) a node commits (`refresh_after`), and on every
    supervisor pass (another coordinator process may have written). Nothing adds to it
    before a commit, so a ruling whose write fails leaves it equal to the store.
    """

    def __init__(self) -> None:
        self._ids: frozenset[str] = frozenset()
        # Trust installs the reader (it owns the table); until then the cache is empty.
        self.loader: Callable[[], Iterable[str]] | None = None

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def refresh(self) -> None:
        """Read the ejected nodes from the store."""
        if self.loader is not None:
            self._ids = frozenset(self.loader())

    def refresh_after(self, s: Any) -> None:
        """Refresh once the transaction of session `s` commits (never if it rolls back)."""
        event.listen(s, "after_commit", lambda _s: self.refresh(), once=True)


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
    # Nodes ejected after failed audits: trust and training decide (in the store), every
    # domain reads this cache of it.
    ejected: Ejected = field(default_factory=Ejected)

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
