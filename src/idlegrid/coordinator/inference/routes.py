"""The OpenAI-compatible gateway: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from idlegrid.coordinator.deps import (
    Services,
    services,
)
from idlegrid.coordinator.inference import schemas as s
from idlegrid.coordinator.inference.hub import TaskStream
from idlegrid.coordinator.inference.openai_schema import (
    ChatRequest,
    CompletionRequest,
    chat_token_bound,
    prompt_token_bound,
)
from idlegrid.coordinator.inference.service import RequestFailed
from idlegrid.coordinator.inference.structured import grammar_payload, invalid_failure
from idlegrid.coordinator.schemas import errors
from idlegrid.coordinator.views import TaskView
from idlegrid.core.ledger import MICRO, Price
from idlegrid.errors import IdlegridError

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=s.ModelList, responses=errors(401))
async def list_models(request: Request) -> dict[str, Any]:
    """Models served by live providers."""
    svc = services(request)
    await svc.nodes.authenticate_key(request.headers.get("authorization"))
    return {"object": "list", "data": await svc.inference.models()}


def _usage(task: TaskView) -> dict[str, int]:
    return {
        "prompt_tokens": task.prompt_tokens,
        "completion_tokens": task.output_tokens,
        "total_tokens": task.prompt_tokens + task.output_tokens,
    }


class _Shape:
    """Differences between text completions and chat completions, in one place."""

    def __init__(self, kind: str, task_id: str, model: str) -> None:
        self.kind, self.id, self.model, self.created = kind, task_id, model, int(time.time())

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def whole(self, text: str, task: TaskView) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "logprobs": None,
                "finish_reason": task.finish_reason,
                "message": {"role": "assistant", "content": text},
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": task.finish_reason,
            }
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(task),
        }


def _failure(data: dict[str, Any]) -> IdlegridError:
    if data.get("invalid"):
        return invalid_failure(data["invalid"])
    return RequestFailed(
        f"the request could not be served: {data.get('error')}; nothing was charged"
    )


def _price_cap(svc: Services, body: Any) -> Price:
    cap = body.max_price
    st = svc.settings
    prompt, output = (
        (cap.prompt, cap.output)
        if cap is not None
        else (st.default_max_prompt_price, st.default_max_output_price)
    )
    return Price(round(prompt * MICRO), round(output * MICRO))


async def _serve(
    request: Request,
    kind: str,
    model: str,
    payload: dict[str, Any],
    bound: int,
    max_tokens: int,
    stream_out: bool,
    include_usage: bool,
    cap: Price,
) -> Any:
    svc = services(request)
    key_id = await svc.nodes.authenticate_key(request.headers.get("authorization"))
    task_id, stream = await svc.inference.submit(
        key_id, model, kind, payload, bound, max_tokens, price_cap=cap
    )
    shape = _Shape(kind, task_id, model)
    started = time.perf_counter()
    if stream_out:
        return StreamingResponse(
            _sse(svc, shape, task_id, stream, started, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    parts: list[str] = []
    ended = False
    try:
        async for event in svc.inference.events(stream):
            if event.kind == "pieces":
                if not parts:
                    svc.metrics.ttft.labels(model).observe(time.perf_counter() - started)
                parts.extend(text for _, text in event.pieces)
            elif event.kind == "done":
                ended = True
                task: TaskView = event.data["task"]
                _count(svc, model, task, "ok")
                return shape.whole("".join(parts), task)
            else:
                ended = True
                svc.metrics.requests.labels(model, "failed").inc()
                raise _failure(event.data)
    finally:
        if not ended:
            with anyio.CancelScope(shield=True):
                await svc.inference.abandon(task_id)
        svc.inference.hub.close(task_id)
    raise RequestFailed("stream ended early")  # pragma: no cover - events() always ends


def _count(svc: Services, model: str, task: TaskView, outcome: str) -> None:
    svc.metrics.requests.labels(model, outcome).inc()
    svc.metrics.tokens.labels(model, "prompt").inc(task.prompt_tokens)
    svc.metrics.tokens.labels(model, "output").inc(task.output_tokens)


def _sse_line(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(
    svc: Services,
    shape: _Shape,
    task_id: str,
    stream: TaskStream,
    started: float,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    done = False
    try:
        if shape.kind == "chat":
            yield _sse_line(shape.chunk("", None, first=True))
        first = True
        async for event in svc.inference.events(stream):
            if event.kind == "pieces":
                text = "".join(t for _, t in event.pieces)
                if first:
                    svc.metrics.ttft.labels(shape.model).observe(time.perf_counter() - started)
                    first = False
                if text:
                    yield _sse_line(shape.chunk(text, None))
            elif event.kind == "done":
                task: TaskView = event.data["task"]
                _count(svc, shape.model, task, "ok")
                final = shape.chunk(None if shape.kind == "chat" else "", task.finish_reason)
                yield _sse_line(final)
                if include_usage:
                    yield _sse_line({**final, "choices": [], "usage": _usage(task)})
                done = True
            else:
                svc.metrics.requests.labels(shape.model, "failed").inc()
                exc = _failure(event.data)
                yield _sse_line(
                    {
                        "error": {
                            "message": exc.message,
                            "type": "server_error",
                            "code": exc.code,
                            "param": None,
                        }
                    }
                )
                done = True
        yield b"data: [DONE]\n\n"
    finally:
        if not done:
            # The consumer went away mid-stream: stop the provider, bill only what it got.
            # Shielded: the disconnect cancelled this generator, and the books must settle.
            with anyio.CancelScope(shield=True):
                await svc.inference.abandon(task_id)
        svc.inference.hub.close(task_id)


@router.post(
    "/completions",
    response_model=s.Completion,
    responses={**s.COMPLETION_RESPONSES, **errors(400, 401, 402, 404, 502, 503)},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    """Text completion (OpenAI semantics; stream=true gives SSE ending in [DONE])."""
    body.check_supported()
    prompt = body.single_prompt()
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    payload = {
        "prompt": prompt,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop_list(),
        "stream": body.stream,
    }
    return await _serve(
        request,
        "completion",
        body.model,
        payload,
        prompt_token_bound(prompt),
        max_tokens,
        body.stream,
        body.include_usage(),
        _price_cap(services(request), body),
    )


@router.post(
    "/chat/completions",
    response_model=s.ChatCompletion,
    responses={**s.CHAT_RESPONSES, **errors(400, 401, 402, 404, 502, 503)},
)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    """Chat completion, templated by the serving engine with the model's own chat template."""
    body.check_supported()
    messages = body.plain_messages()
    limit = body.max_completion_tokens or body.max_tokens
    max_tokens = limit if limit is not None else services(request).settings.default_chat_max_tokens
    payload = {
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop_list(),
        "stream": body.stream,
    }
    grammar = grammar_payload(body.response_format)
    if grammar is not None:
        payload["grammar"] = grammar
    return await _serve(
        request,
        "chat",
        body.model,
        payload,
        chat_token_bound(messages),
        max_tokens,
        body.stream,
        body.include_usage(),
        _price_cap(services(request), body),
    )
