"""POST /v1/embeddings: one grid task per request, routed, escrowed, committed, audited and
settled like any answer; the vectors are the provider's commitment (core/trust/embedding.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Request

from idlegrid import tracing
from idlegrid.coordinator.deps import services
from idlegrid.coordinator.inference import fields
from idlegrid.coordinator.inference import schemas as s
from idlegrid.coordinator.inference.openai_schema import EmbeddingRequest, prompt_token_bound
from idlegrid.coordinator.inference.plan import Plan, price_cap
from idlegrid.coordinator.inference.service import RequestFailed
from idlegrid.coordinator.schemas import errors
from idlegrid.coordinator.views import NodeView
from idlegrid.core.trust.embedding import EmbeddingCommitment, vector_b64
from idlegrid.errors import InvalidRequest, ModelNotFound

router = APIRouter(prefix="/v1", tags=["openai"])


def embedding_facts(nodes: Iterable[NodeView], model: str) -> dict[str, int] | None:
    """What providers advertised for an embedding model (dimensions, max input tokens,
    vocabulary), or None if no registered provider serves `model` as one."""
    for n in nodes:
        facts = (n.engine or {}).get("embedding")
        if model in n.offers and isinstance(facts, dict):
            return {k: int(v) for k, v in facts.items() if isinstance(v, int | float)}
    return None


def check_limits(facts: dict[str, int], body: EmbeddingRequest, inputs: list[Any]) -> None:
    """Refuse, naming the field, what the model cannot do (before anything is escrowed).
    Text inputs are measured by the provider, which tokenizes them (a 400 all the same)."""
    dims = facts.get("dimensions")
    if body.dimensions is not None and body.dimensions != dims:
        raise InvalidRequest(
            f"{body.model} makes {dims}-dimensional vectors and cannot shorten them",
            param="dimensions",
        )
    limit, vocab = facts.get("max_input_tokens", 0), facts.get("vocab", 0)
    for i, item in enumerate(inputs):
        if isinstance(item, list) and len(item) > limit:
            raise InvalidRequest(
                f"input[{i}] has {len(item)} tokens; {body.model} takes at most {limit}",
                param="input",
            )
        if isinstance(item, list) and vocab and max(item) >= vocab:
            raise InvalidRequest(f"input[{i}] holds a token id out of range", param="input")


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: the float32 little-endian bytes
        return vector_b64(vector)
    out: list[float] = vector.astype(np.float32).tolist()
    return out


def plan_embedding(inference: Any, body: EmbeddingRequest) -> Plan:
    """An embeddings request's one task (InvalidRequest naming a field it cannot honour;
    the same for a request sent now and a batch line, inference/lines.py)."""
    fields.check(fields.EMBEDDINGS, body.sent())
    inputs = body.inputs()
    cache = inference.nodes.cache.values()
    facts = embedding_facts(cache, body.model)
    if facts is None:
        if any(body.model in n.offers for n in cache):
            raise InvalidRequest(f"{body.model} is not an embedding model", param="model")
        raise ModelNotFound(body.model)
    check_limits(facts, body, inputs)
    bound = sum(len(x) if isinstance(x, list) else prompt_token_bound(x) for x in inputs)
    payload = {
        "input": inputs,
        "dimensions": body.dimensions,
        # Generation fields every task carries; nothing is sampled.
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": [],
        "stream": False,
    }
    # max_tokens 1: the escrow holds one output token more than is ever charged (refunded).
    return Plan(
        "embedding",
        body.model,
        [(payload, bound)],
        1,
        False,
        False,
        price_cap(inference.settings, body),
        encoding=body.encoding_format,
    )


def embedding_list(plan: Plan, vectors: Iterable[np.ndarray], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's answer to an embeddings request."""
    fmt = plan.encoding or "float"
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, fmt)}
            for i, v in enumerate(vectors)
        ],
        "model": plan.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


@router.post(
    "/embeddings",
    response_model=s.EmbeddingList,
    responses=errors(400, 401, 402, 404, 429, 502, 503),
)
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """Embed a string, a list of strings or token ids; billed per input token at the
    serving provider's prompt price."""
    svc = services(request)
    key_id = await svc.nodes.authenticate_key(request.headers.get("authorization"))
    plan = plan_embedding(svc.inference, body)
    ((payload, bound),) = plan.work
    await svc.nodes.admit(key_id, bound)
    # The request id and (tracing on) the request's span go with the task, as for completions.
    tracing.annotate(model=plan.model, kind=plan.kind)
    parent = tracing.traceparent()
    payload = {**payload, "request_id": getattr(request.state, "request_id", None)}
    payload |= {"traceparent": parent} if parent else {}
    with tracing.span("idlegrid.route_and_escrow", {"idlegrid.model": plan.model}):
        task_id, stream = await svc.inference.submit(
            key_id, plan.model, plan.kind, payload, bound, plan.max_tokens, plan.cap
        )
        tracing.annotate(tasks=task_id)
    ended = False
    try:
        async for event in svc.inference.events(stream):
            ended = event.kind in ("done", "failed")
            if event.kind == "done":
                task = event.data["task"]
                c = event.data["commitment"]
                assert isinstance(c, EmbeddingCommitment)
            elif event.kind == "failed":
                svc.metrics.requests.labels(body.model, "failed").inc()
                if event.data.get("invalid"):
                    raise InvalidRequest(event.data["invalid"], param="input")
                raise RequestFailed(
                    f"the request could not be served: {event.data.get('error')}; "
                    "nothing was charged"
                )
    finally:
        with anyio.CancelScope(shield=True):  # a disconnect must not leave the escrow held
            if not ended:
                await svc.inference.abandon(task_id)
            svc.inference.hub.close(task_id)
    svc.metrics.requests.labels(body.model, "ok").inc()
    svc.metrics.tokens.labels(body.model, "prompt").inc(task.prompt_tokens)
    return embedding_list(plan, c.vectors, task.prompt_tokens)
