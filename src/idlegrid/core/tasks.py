"""Task lifecycle: the allowed moves, and the decision to retry. Pure.

    queued ──claim──▶ running ──finish──▶ done
      ▲                 │ └────fail────▶ failed
      └──requeue────────┘ (provider lost, stalled or draining)
    queued ──cancel──▶ failed (consumer left, nobody to serve it)

Every move names its cause, so "why did this request run twice?" has an answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from idlegrid.errors import IllegalTransition


class TaskState(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Rule:
    """One named move between states."""

    name: str
    src: frozenset[TaskState]
    dst: TaskState


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("claim", frozenset({TaskState.QUEUED}), TaskState.RUNNING),
        Rule("finish", frozenset({TaskState.RUNNING}), TaskState.DONE),
        Rule("fail", frozenset({TaskState.RUNNING, TaskState.QUEUED}), TaskState.FAILED),
        Rule("requeue", frozenset({TaskState.RUNNING}), TaskState.QUEUED),
    )
}

TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED})


def transition(state: TaskState, move: str) -> TaskState:
    """The state after `move`, or IllegalTransition."""
    rule = RULES.get(move)
    if rule is None or state not in rule.src:
        dst = rule.dst.value if rule else move
        raise IllegalTransition("task", state.value, dst)
    return rule.dst


def should_retry(attempts: int, max_attempts: int) -> bool:
    """Whether a task that lost its provider goes back to the queue or fails."""
    return attempts < max_attempts


# ---- what an attempt is paid for ---------------------------------------------------------
#
# No credit leaves escrow for work that was not committed and could not be checked
# (docs/trust.md, "What is paid"). The shell (`Inference.finish`/`give_up`, `Store`) decides
# nothing here: it asks these and writes what they say.

# The outcome of an attempt that finished without a valid commitment. Not blameless: the
# market's reliability counts it against the provider (`market/store.py`, _BLAMELESS).
UNCOMMITTED = "uncommitted"


def payable_tokens(delivered: int, committed: bool) -> int:
    """Output tokens an attempt is paid (and its consumer charged) for: all it delivered if a
    valid commitment covers them, none otherwise (an audit could never check them)."""
    return delivered if committed else 0


@dataclass(frozen=True)
class PromptBill:
    """Prompt tokens billed for a finished request, and what the provider claimed."""

    tokens: int
    claimed: int

    @property
    def disagrees(self) -> bool:
        """The provider's claim differs from what its commitment fixes (worth a log line)."""
        return self.claimed != self.tokens


def billed_prompt_tokens(
    committed_start: int, prior_tokens: int, claimed: int, max_prompt_tokens: int
) -> PromptBill:
    """Prompt tokens come from the commitment, never from the provider's claim.

    The commitment's `start` is the context length it was computed on: prompt + the tokens
    earlier attempts delivered (`prior_tokens`); its context hash covers those ids and the
    audit recomputes both from what the coordinator sent. The claim is advisory. Capped by
    what the request could hold (`max_prompt_tokens`, the escrow's basis).
    """
    prompt = max(0, committed_start - prior_tokens)
    return PromptBill(min(prompt, max_prompt_tokens), claimed)


# ---- the supervisor's decisions ------------------------------------------------------------
#
# `Inference.tick` looks at each running task and its stream, then at each queued task, and
# carries out what these return. Each task is decided just before its actions run (the
# actions await, and a stream may move meanwhile), so each function takes one task.


@dataclass(frozen=True)
class SuperviseLimits:
    """The coordinator settings the supervisor's decisions read."""

    node_timeout_s: float
    stall_timeout_s: float
    queue_timeout_s: float
    untarget_after_s: float = 1.0
    # A provider whose channel closed and that sent no heartbeat this long since is gone
    # (a killed agent): its work moves then, not after `node_timeout_s`. An agent that only
    # lost its channel heartbeats meanwhile over HTTP and keeps its work (2 intervals).
    channel_grace_s: float | None = None


@dataclass(frozen=True)
class StreamSnap:
    """What the hub's stream of a task says about its attempt."""

    attempt: int
    node_id: str | None
    last_progress: float


@dataclass(frozen=True)
class RunningSnap:
    """A running task's row, its stream (None: the consumer left) and its holder's last
    heartbeat (None: an unknown node)."""

    task_id: str
    attempt: int
    node_id: str | None
    stream: StreamSnap | None
    node_last_seen: float | None
    channel_closed_at: float | None = None  # when its agent's channel closed (None: open)


@dataclass(frozen=True)
class QueuedSnap:
    """A queued task: when it was created, whether a consumer still reads it, and whether it
    still waits for one node (a target) rather than for any."""

    task_id: str
    created: float
    has_stream: bool
    targeted: bool = True


Seen = tuple[str, int, str | None]  # (task, attempt, node) whose stream did not match


@dataclass(frozen=True)
class FailTask:
    """End the task; `notify`: tell the consumer's stream why."""

    task_id: str
    reason: str
    notify: bool = False


@dataclass(frozen=True)
class Watch:
    """The row moved and the stream did not (a claim a few ms from its hand-over): look
    again next pass."""

    seen: Seen


@dataclass(frozen=True)
class Adopt:
    """Still unmatched one pass later: the hand-over was lost; the stream takes the row's
    attempt, so the checks after it can take the task back."""

    task_id: str
    attempt: int
    node_id: str | None


@dataclass(frozen=True)
class TakeBack:
    """Take the attempt away: `provider lost` or `provider stalled`."""

    task_id: str
    attempt: int
    outcome: str


@dataclass(frozen=True)
class Untarget:
    """Its target has not claimed it (busy or gone): any provider may take it now."""

    task_id: str


SuperviseAction = FailTask | Watch | Adopt | TakeBack | Untarget


def supervise_running(
    t: RunningSnap, unmatched: frozenset[Seen], now: float, limits: SuperviseLimits
) -> list[SuperviseAction]:
    """One running task: its consumer left, its stream lost the hand-over, its provider is
    lost or stalled, or all is well (no action)."""
    if t.stream is None:
        return [FailTask(t.task_id, "consumer disconnected")]
    out: list[SuperviseAction] = []
    last_progress = t.stream.last_progress
    if t.stream.attempt != t.attempt or t.stream.node_id != t.node_id:
        seen = (t.task_id, t.attempt, t.node_id)
        if seen not in unmatched:
            return [Watch(seen)]
        out.append(Adopt(t.task_id, t.attempt, t.node_id))
    if t.node_last_seen is None or t.node_last_seen < now - limits.node_timeout_s:
        out.append(TakeBack(t.task_id, t.attempt, "provider lost"))
    elif _channel_gone(t, now, limits):
        out.append(TakeBack(t.task_id, t.attempt, "provider lost: its channel closed"))
    elif now - last_progress > limits.stall_timeout_s:
        out.append(TakeBack(t.task_id, t.attempt, "provider stalled"))
    return out


def _channel_gone(t: RunningSnap, now: float, limits: SuperviseLimits) -> bool:
    closed, grace = t.channel_closed_at, limits.channel_grace_s
    if closed is None or grace is None or now - closed < grace:
        return False
    return t.node_last_seen is None or t.node_last_seen <= closed


def supervise_queued(t: QueuedSnap, now: float, limits: SuperviseLimits) -> list[SuperviseAction]:
    """One queued task: its consumer left, nobody took it in time, or its target is slow
    to claim it."""
    if not t.has_stream:
        return [FailTask(t.task_id, "consumer disconnected")]
    if now - t.created > limits.queue_timeout_s:
        return [FailTask(t.task_id, "no provider took it in time", notify=True)]
    # Only while it has a target: untargeting an untargeted task again every pass cost a
    # transaction and a wake-up of every parked poll per queued task (measured: a batch's
    # queued lines tripled the coordinator's CPU per line).
    if t.targeted and now - t.created > limits.untarget_after_s:
        return [Untarget(t.task_id)]
    return []


def supervise(
    running: list[RunningSnap],
    queued: list[QueuedSnap],
    unmatched: frozenset[Seen],
    now: float,
    limits: SuperviseLimits,
) -> tuple[list[SuperviseAction], frozenset[Seen]]:
    """A whole pass over one snapshot: the actions in order, and the unmatched set the next
    pass must see."""
    actions: list[SuperviseAction] = []
    for t in running:
        actions += supervise_running(t, unmatched, now, limits)
    for q in queued:
        actions += supervise_queued(q, now, limits)
    return actions, frozenset(a.seen for a in actions if isinstance(a, Watch))
