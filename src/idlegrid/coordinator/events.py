"""Cross-domain effects as events. A service says what happened ("a node registered", "an
answer finished"); the composition root decides which domains react, in which order. No
service calls into another domain's service, so a new domain hooks in without editing one.

Also the change feed: a version number the dashboard watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from idlegrid.coordinator.views import TaskView
from idlegrid.core.trust.embedding import AnyCommitment

E = TypeVar("E")
Handler = Callable[[Any], Awaitable[None] | None]


@dataclass(frozen=True)
class NodeRegistered:
    """A node (re)registered with this profile (the registration body)."""

    node_id: str
    body: dict[str, Any]
    address: str = ""  # the peer address it registered from


@dataclass(frozen=True)
class LiveNodesChanged:
    """The set of live nodes changed; `lost` went quiet or left since the last pass."""

    live: frozenset[str]
    lost: frozenset[str]


@dataclass(frozen=True)
class AnswerFinished:
    """A provider's attempt ended with output the consumer received and was charged for.

    `commitment` is the provider's commitment to it (None if it sent none); `part` marks a
    handed-back attempt whose delivered part is final; `ttft_s`/`tps` what the consumer saw.
    """

    task: TaskView
    node_id: str
    attempt: int
    commitment: AnyCommitment | None
    delivered_before: list[int]
    part: bool = False
    ttft_s: float | None = None
    tps: float | None = None


@dataclass(frozen=True)
class SupplyChanged:
    """What a node offers on the market changed (stake, verified hardware, ejection)."""

    node_id: str | None = None


class Events:
    """A synchronous-in-order observer: handlers run in subscription order, awaited."""

    def __init__(self) -> None:
        self._handlers: dict[type, list[Handler]] = {}

    def on(self, kind: type[E], handler: Callable[[E], Awaitable[None] | None]) -> None:
        """Call `handler` with every event of `kind` from now on."""
        self._handlers.setdefault(kind, []).append(handler)

    def notify(self, event: object) -> None:
        """Run every handler of the event's kind now; for worker threads (sync handlers only)."""
        for handler in self._handlers.get(type(event), ()):
            result = handler(event)
            if inspect.iscoroutine(result):
                result.close()  # never started: nothing ran, nothing to clean up
            if inspect.isawaitable(result):
                raise TypeError(f"{type(event).__name__} has an async handler; use emit")

    async def emit(self, event: object) -> None:
        """Run every handler of the event's kind, in order; an error reaches the emitter."""
        for handler in self._handlers.get(type(event), ()):
            result = handler(event)
            if inspect.isawaitable(result):
                await result


class ChangeFeed:
    """A version number that goes up whenever the grid changes, for live dashboards.

    Watchers remember the version they last showed and wait for a newer one; a burst of
    changes wakes them once, so a busy grid costs one refresh per watcher, not one per event.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def bump(self) -> None:
        """Something changed (call from the event loop)."""
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, timeout_s: float) -> int:
        """The current version once it differs from `seen`, or after `timeout_s` regardless."""
        if self.version != seen:
            return self.version
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)
        return self.version
