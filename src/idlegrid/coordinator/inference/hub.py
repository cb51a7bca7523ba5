"""In-process streams between agents' chunk uploads and consumers' open responses.

Durable state (tasks, attempts, ledger) lives in the store; the token stream of a request
in flight lives here, next to the consumer connection that reads it. If this process dies,
the consumer's connection dies with it, so nothing durable is lost by keeping it in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# How long a request for a node with a free slot waits for one of its polls to park
# (Hub.wait_parked): a claim's round trip under load, not a blocking wait for a slot.
HANDOVER_WAIT_S = 0.05


@dataclass
class Event:
    """Something the consumer's stream must hear about."""

    kind: str  # "pieces" | "done" | "failed"
    pieces: list[tuple[int, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskStream:
    """One request's stream: events in order, and the attempt currently feeding it."""

    task_id: str
    attempt: int = 0
    # Tokens this attempt has delivered (ids); earlier attempts' tokens live in the store.
    attempt_ids: list[int] = field(default_factory=list)
    next_index: int = 0  # index (within the attempt) the next upload must start at
    last_progress: float = 0.0
    node_id: str | None = None  # the provider holding the current attempt
    target: str | None = None  # the provider it was routed to, until one claims it
    route: str = ""  # why it was routed there (core/routing.reason)
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    # Serialises uploads, finish and hand-over of one task, so each sees a settled attempt.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    # Set once the task's row and escrow are written. A hand-over may run ahead of that
    # write (Grid.submit); reports that read the row (finish, hand-back) wait for it.
    created: asyncio.Event = field(default_factory=asyncio.Event)
    opened_at: float = 0.0
    first_piece_at: float | None = None  # when the consumer got its first token
    # Tokens the current attempt may still deliver: max_tokens less earlier attempts' output
    # (None: not known here, e.g. a stream re-adopted after a restart).
    budget: int | None = None
    flushed: bool = False  # the attempt sent its end-of-output text piece (token id -1)
    logprobs_k: int | None = None  # alternatives per token the request asked for (None: none)
    attempt_logprobs: list[Any] = field(default_factory=list)  # per token of this attempt
    prompt_k: int | None = None  # echo with logprobs: alternatives per prompt position
    attempt_prompt: Any = None  # the prompt logprobs this attempt uploaded (PromptLogprobsMsg)
    prompt_sent: bool = False  # the consumer has the prompt logprobs (from some attempt)
    batch: bool = False  # a batch line's: it yields its provider to interactive work
    yielding: bool = False  # its provider was asked to hand this attempt back
    # A batch line's answer as sent, every attempt's (kept with its settlement).
    kept: dict[str, Any] = field(default_factory=lambda: {"text": [], "logprobs": []})


class Hub:
    """Task streams and per-node wake-ups for long polls."""

    def __init__(self) -> None:
        self.streams: dict[str, TaskStream] = {}
        self._work: dict[str, asyncio.Event] = {}
        # Long polls parked per node, ready to take a task handed to them directly.
        self._waiters: dict[str, list[asyncio.Future[Any]]] = {}
        # Requests waiting for the next poll of a node to park (wait_parked).
        self._expecting: dict[str, list[asyncio.Future[None]]] = {}
        # When each node was last routed a request (a sequence number): ties go to the
        # least recently used, so an idle grid's providers take turns.
        self.routed: dict[str, int] = {}
        self._route_seq = 0
        # Each node's agent channel, to ask a batch attempt to yield (inference/channel.py).
        self._senders: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {}
        # Per node, polls whose claim of a batch line is under way (a database round trip):
        # a slot each, so routing meanwhile does not hand a second line to the same room.
        self.claiming: dict[str, int] = {}
        # When each node's channel closed, until it opens one again (core/tasks: a provider
        # that also stops heartbeating is gone before its node timeout).
        self.channel_closed: dict[str, float] = {}

    def attach(self, node_id: str, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """A node's channel opened: frames to its agent go through `send`."""
        self._senders[node_id] = send
        self.channel_closed.pop(node_id, None)

    def detach(
        self, node_id: str, send: Callable[[dict[str, Any]], Awaitable[None]], now: float
    ) -> None:
        """A node's channel closed at `now` (unless a newer one replaced it)."""
        if self._senders.get(node_id) is send:
            del self._senders[node_id]
            self.channel_closed[node_id] = now

    def batch_runner(self, node_ids: list[str]) -> str | None:
        """The first of these nodes running a batch attempt that could yield."""
        running = {
            s.node_id for s in self.streams.values() if s.batch and s.attempt > 0 and not s.yielding
        }
        return next((n for n in node_ids if n in running), None)

    async def make_room(self, node_id: str) -> bool:
        """Interactive work found `node_id` busy: ask one batch attempt it runs to yield (it
        hands back with a part commitment and continues later, docs/batch.md). False when it
        runs none, or has no channel to be asked on."""
        send = self._senders.get(node_id)
        busy = [
            s for s in self.streams.values()
            if s.batch and s.node_id == node_id and s.attempt > 0 and not s.yielding
        ]  # fmt: skip
        if send is None or not busy:
            return False
        stream = busy[0]
        stream.yielding = True
        try:
            await send({"op": "yield", "task_id": stream.task_id, "attempt": stream.attempt})
        except Exception:  # the channel went down: the request waits like any other
            return False
        return True

    def note_routed(self, node_id: str | None) -> None:
        """Record that a request was just routed to `node_id`."""
        if node_id is not None:
            self._route_seq += 1
            self.routed[node_id] = self._route_seq

    def open(self, task_id: str, now: float) -> TaskStream:
        """Start listening to a task's output."""
        stream = TaskStream(task_id, last_progress=now, opened_at=now)
        self.streams[task_id] = stream
        return stream

    def get(self, task_id: str) -> TaskStream | None:
        """The open stream for a task, if a consumer is still reading it."""
        return self.streams.get(task_id)

    def close(self, task_id: str) -> None:
        """Forget a task's stream (the consumer has everything or has left)."""
        stream = self.streams.pop(task_id, None)
        if stream:
            stream.closed = True
            if stream.batch and stream.node_id:
                # Its node's parked polls look again: one that left a batch line in the
                # queue because the node's batch slots were full may take it now.
                self.wake(stream.node_id)

    def begin_attempt(
        self, task_id: str, attempt: int, now: float, budget: int | None = None
    ) -> None:
        """A provider claimed the task: its uploads start at index 0."""
        stream = self.streams.get(task_id)
        if stream:
            stream.attempt = attempt
            stream.attempt_ids = []
            # each attempt's commitment covers what that attempt sent
            stream.attempt_logprobs, stream.attempt_prompt = [], None
            stream.yielding = False
            stream.next_index = 0
            stream.last_progress = now
            stream.budget, stream.flushed = budget, False

    def push(self, task_id: str, event: Event) -> None:
        """Deliver an event to the consumer's stream."""
        stream = self.streams.get(task_id)
        if stream and not stream.closed:
            stream.queue.put_nowait(event)

    # ---- long-poll wake-ups ------------------------------------------------------------

    def park(self, node_id: str, fut: asyncio.Future[Any]) -> None:
        """A long poll of `node_id` waits on `fut` for a task handed to it."""
        self._waiters.setdefault(node_id, []).append(fut)
        for expecting in self._expecting.pop(node_id, []):
            if not expecting.done():
                expecting.set_result(None)

    def unpark(self, node_id: str, fut: asyncio.Future[Any]) -> None:
        """The poll behind `fut` is over."""
        waiting = self._waiters.get(node_id, [])
        if fut in waiting:
            waiting.remove(fut)

    def take_parked(self, node_id: str) -> asyncio.Future[Any] | None:
        """A parked poll of `node_id` to hand a task to, if one is waiting."""
        waiting = self._waiters.get(node_id, [])
        while waiting:
            fut = waiting.pop(0)
            if not fut.done():
                return fut
        return None

    async def wait_parked(self, node_id: str, timeout_s: float) -> asyncio.Future[Any] | None:
        """A poll of `node_id` that parks within `timeout_s`, to hand a task to."""
        # A node with a free slot whose poll is between two claims (polls churn: each queued
        # batch line wakes them) parks again within a claim's round trip; handing the task
        # over then beats queueing it behind the other polls' claims (docs/batch.md).
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._expecting.setdefault(node_id, []).append(fut)
        try:
            await asyncio.wait([fut], timeout=timeout_s)
        finally:
            waiting = self._expecting.get(node_id, [])
            if fut in waiting:
                waiting.remove(fut)
        return self.take_parked(node_id)

    def work_event(self, node_id: str) -> asyncio.Event:
        """The event a node's long poll waits on."""
        return self._work.setdefault(node_id, asyncio.Event())

    def wake(self, node_id: str | None) -> None:
        """New work for `node_id`, or for anyone when None."""
        if node_id is None:
            for ev in self._work.values():
                ev.set()
        else:
            self.work_event(node_id).set()
