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
