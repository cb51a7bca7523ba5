"""What a coordinator service may use: settings, the store, the clock, randomness, metrics,
the change feed and the event bus. Services take a `Context`, never each other; the
composition root (`app.py`) builds them and wires what one domain must know of another."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
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
        # Reads run on worker threads and may overlap: a read that began before a commit
        # must not overwrite one that began after it (the ticket of the read kept).
        self._lock = threading.Lock()
        self._begun = self._kept = 0

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def refresh(self) -> None:
        """Read the ejected nodes from the store."""
        if self.loader is None:
            return
        with self._lock:
            self._begun += 1
            ticket = self._begun
        ids = frozenset(self.loader())
        with self._lock:
            if ticket > self._kept:
                self._ids, self._kept = ids, ticket

    def refresh_after(self, s: Any) -> None:
        """Refresh once the transaction of session `s` commits (never if it rolls back).

        Releasing a savepoint fires `after_commit` too (a ruling ejects inside one): only
        the outermost commit counts, once what it wrote is visible to a fresh read."""
        done = False

        def committed(session: Any) -> None:
            nonlocal done
            if done or session.in_nested_transaction():
                return
            done = True
            self.refresh()

        event.listen(s, "after_commit", committed)


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
