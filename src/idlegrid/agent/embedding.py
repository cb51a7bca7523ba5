"""Embedding work on the agent: serve an `embedding` task (no stream: the vectors travel in
the commitment that the finish message carries) and recompute one for an audit."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from idlegrid.agent.context import AgentContext
from idlegrid.core.trust import embedding as emb
from idlegrid.engines.embedder import Embedder, input_ids, is_embedder
from idlegrid.errors import IdlegridError
from idlegrid.protocol.messages import AuditTaskMsg, TaskMsg

log = logging.getLogger("idlegrid.agent")


def commit(engine: Embedder, task: TaskMsg) -> tuple[int, bytes]:
    """Embed the task's inputs; (tokens processed, the encoded commitment to the vectors)."""
    ids = input_ids(engine, task.input or [])
    vectors = engine.embed(ids)
    c = emb.build(task.model, engine.det_class(), ids, vectors, task.seed)
    return c.header.start, c.encode()


def recompute(engine: Embedder, msg: AuditTaskMsg) -> bytes:
    """A verifier's report for an audited embeddings answer: its own ids and vectors."""
    ids = input_ids(engine, msg.input or [])
    vectors = engine.embed(ids)
    c = emb.build(msg.model, engine.det_class(), ids, vectors)
    return emb.encode_report(
        emb.EmbeddingReport(
            engine.det_class(), c.header.context_hashes, c.header.token_counts, vectors
        )
    )


async def serve(ctx: AgentContext, engine: Any, task: TaskMsg) -> bool:
    """Run one embedding attempt and finish it (or fail it: a bad input is the request's
    fault, reported as invalid so that no other provider is tried). True once finished."""
    base = f"/api/v1/tasks/{task.task_id}/attempts/{task.attempt}"
    if task.kind != "embedding" or not is_embedder(engine):
        what = "embeddings" if task.kind == "embedding" else "generation"
        await ctx.client.call(
            f"{base}/fail",
            {"reason": f"{task.model} on this node does not serve {what}", "kind": "engine"},
        )
        return False
    loop = asyncio.get_running_loop()

    def run() -> tuple[int, bytes]:
        with ctx.engine_lock(engine):
            return commit(engine, task)

    try:
        tokens, blob = await loop.run_in_executor(None, run)
    except IdlegridError as exc:
        await ctx.client.call(f"{base}/fail", {"reason": exc.message, "kind": "invalid_request"})
        return False
    except Exception as exc:
        log.exception("embedding failed on %s", task.task_id)
        await ctx.client.call(f"{base}/fail", {"reason": f"engine error: {exc}"[:500]})
        return False
    ctx.remember(ctx.commitments, (task.task_id, task.attempt), blob)
    await ctx.client.call(
        f"{base}/finish",
        {
            "prompt_tokens": tokens,
            "finish_reason": "stop",
            "commitment": base64.b64encode(blob).decode(),
        },
    )
    return True
