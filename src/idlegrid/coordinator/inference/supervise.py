"""The inference tick: take work from dead or stalled providers, fail requests nobody
picked up in time. The decisions are the core's (`core/tasks.py`); this applies them."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from idlegrid.coordinator.inference.hub import Event
from idlegrid.core import tasks
from idlegrid.errors import StaleAttempt

if TYPE_CHECKING:
    from idlegrid.coordinator.inference.service import Inference

log = logging.getLogger("idlegrid.coordinator")


async def supervise(inf: Inference, live: frozenset[str]) -> None:
    """Take work from dead or stalled providers; fail requests nobody picked up in time.
    The decisions are the core's (`core/tasks.py`); each task is looked at just before
    its actions run, as the actions await and other streams move meanwhile."""
    now = inf.clock()
    nodes = inf.nodes.cache
    limits = tasks.SuperviseLimits(
        inf.settings.node_timeout_s,
        inf.settings.stall_timeout_s,
        inf.settings.queue_timeout_s,
        channel_grace_s=min(2 * inf.settings.heartbeat_interval_s, inf.settings.node_timeout_s),
    )
    before = frozenset(inf.unmatched_seen)
    unmatched: set[tuple[str, int, str | None]] = set()
    for task in await inf.db(inf.store.running_tasks):
        stream = inf.hub.get(task.id)
        node = nodes.get(task.node_id or "")
        snap = tasks.RunningSnap(
            task.id,
            task.attempt,
            task.node_id,
            tasks.StreamSnap(stream.attempt, stream.node_id, stream.last_progress)
            if stream is not None
            else None,
            node.last_seen if node is not None else None,
            inf.hub.channel_closed.get(task.node_id or ""),
        )
        for act in tasks.supervise_running(snap, before, now, limits):
            if isinstance(act, tasks.FailTask):
                await inf.db(inf.store.fail, act.task_id, act.reason)
            elif isinstance(act, tasks.Watch):
                unmatched.add(act.seen)
            elif isinstance(act, tasks.Adopt) and stream is not None:
                # The row moved and the stream did not, still so one pass later: the
                # hand-over was lost (a poll that died mid-claim).
                log.warning(
                    "task %s: attempt %d on %s never reached its stream; adopting",
                    act.task_id,
                    act.attempt,
                    act.node_id,
                )
                stream.attempt, stream.node_id, stream.target = act.attempt, act.node_id, None
            elif isinstance(act, tasks.TakeBack):
                with contextlib.suppress(StaleAttempt):  # it finished or moved meanwhile
                    await inf.give_up(None, act.task_id, act.attempt, act.outcome)
    inf.unmatched_seen = unmatched
    for task_id, created, targeted in await inf.db(inf.store.queued_tasks):
        snap_q = tasks.QueuedSnap(task_id, created, inf.hub.get(task_id) is not None, targeted)
        for act in tasks.supervise_queued(snap_q, now, limits):
            if isinstance(act, tasks.FailTask):
                await inf.db(inf.store.fail, act.task_id, act.reason)
                if act.notify:
                    inf.hub.push(act.task_id, Event("failed", data={"error": act.reason}))
            elif isinstance(act, tasks.Untarget):
                await inf.db(inf.store.untarget, act.task_id)
                stream = inf.hub.get(act.task_id)
                if stream is not None:
                    stream.target = None
                inf.hub.wake(None)
