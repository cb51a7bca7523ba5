"""Read models shared by the database layer and the domains: what a node or a task looks
like to the rest of the coordinator. Plain frozen dataclasses, no database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idlegrid.core.ledger import Price
from idlegrid.core.tasks import TaskState

PowerRow = tuple[float, float, float | None, bool]  # t, joules_total, watts, estimated


@dataclass(frozen=True)
class NodeView:
    """What the rest of the coordinator needs to know about a node."""

    id: str
    name: str
    public_key: bytes
    state: str
    slots: int
    prefill_tps: float
    decode_tps: float
    last_seen: float
    hardware: dict[str, Any]
    engine: dict[str, Any]
    offers: dict[str, Price]
    batch: bool = True  # takes batch lines
    batch_price_bps: int | None = None  # its batch price's share of the offers (None: default)

    def live_since(self, cutoff: float) -> bool:
        """Live, and heard from at or after `cutoff` (now less the node timeout)."""
        return self.state == "live" and self.last_seen >= cutoff

    def present_since(self, cutoff: float) -> bool:
        """Not gone, and heard from at or after `cutoff`: live or draining its work."""
        return self.state != "gone" and self.last_seen >= cutoff


@dataclass(frozen=True)
class TaskView:
    """A task as the gateway and agents see it."""

    id: str
    key_id: str
    model_id: str
    kind: str
    payload: dict[str, Any]
    state: str
    attempt: int
    node_id: str | None
    hold: int
    delivered_ids: list[int]
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    error: str | None
    answer: dict[str, Any] | None = None  # a batch line's, once settled (db/tables.Task)


def new_task_view(
    task_id: str,
    key_id: str,
    model_id: str,
    kind: str,
    payload: dict[str, Any],
    hold: int,
    claimed_by: str | None,
) -> TaskView:
    """The view of a task as `Store.create_task` writes it (queued, or claimed: attempt 1)."""
    state = TaskState.RUNNING if claimed_by else TaskState.QUEUED
    return TaskView(
        task_id,
        key_id,
        model_id,
        kind,
        payload,
        state.value,
        1 if claimed_by else 0,
        claimed_by,
        hold,
        [],
        0,
        0,
        None,
        None,
    )
