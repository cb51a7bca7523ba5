"""One request's choices on the grid: escrow them all up front, read their streams as one.

Each choice is an ordinary task (`Inference.submit`): routed, committed, audited and
settled on its own, so a choice is billed exactly as a one-choice request would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import anyio

from idlegrid.coordinator.inference.hub import Event, TaskStream
from idlegrid.coordinator.inference.service import Inference
from idlegrid.core.ledger import Price


async def submit_all(
    inference: Inference,
    key_id: str,
    model: str,
    kind: str,
    work: Sequence[tuple[dict[str, Any], int]],
    max_tokens: int,
    price_cap: Price,
    batch: dict[str, Any] | None = None,
    choices: Sequence[int] | None = None,
) -> list[tuple[str, TaskStream]]:
    """Escrow and queue one task per (payload, prompt-token bound), in order; all or none.

    Each escrow also requires the balance to cover the choices after it, so a request the
    balance cannot pay for in full is refused (402) at its first choice, before any work.
    If a later one still fails (the key spent elsewhere meanwhile, or capacity vanished),
    the earlier ones are cancelled uncharged and the error is raised. `batch`: the tag of
    a batch line (`Inference.submit`); `choices`: the choice index each task stands for
    (a batch line run again for the choices a restart left unsettled), else 0, 1, ...."""
    handles: list[tuple[str, TaskStream]] = []
    try:
        for k, (payload, bound) in enumerate(work):
            rest = [(b, max_tokens) for _, b in work[k + 1 :]]
            handles.append(
                await inference.submit(
                    key_id,
                    model,
                    kind,
                    payload,
                    bound,
                    max_tokens,
                    price_cap,
                    reserve=rest,
                    batch={**batch, "choice": choices[k] if choices else k}
                    if batch is not None
                    else None,
                )
            )
    except BaseException:
        with anyio.CancelScope(shield=True):
            for task_id, _ in handles:
                inference.hub.close(task_id)
                await inference.db(
                    inference.store.fail, task_id, "a sibling choice could not be escrowed"
                )
            inference.changes.bump()
        raise
    return handles


async def interleave(
    inference: Inference, streams: Sequence[TaskStream]
) -> AsyncGenerator[tuple[int, Event], None]:
    """Events of several tasks as they arrive, each with its stream's position; ends once
    every stream has ended (done or failed) or the reader stops."""
    if len(streams) == 1:  # the common case keeps its direct path
        async for event in inference.events(streams[0]):
            yield 0, event
        return
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(k: int, stream: TaskStream) -> None:
        async for event in inference.events(stream):
            merged.put_nowait((k, event))

    pumps = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, event = await merged.get()
            left -= event.kind in ("done", "failed")
            yield k, event
    finally:
        for p in pumps:
            p.cancel()
