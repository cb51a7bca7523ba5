"""The OpenAI-compatible gateway: /v1/models, /v1/completions, /v1/chat/completions.

Which request fields are honoured, accepted or refused is fields.py's table; docs/openai.md
shows it."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from idlegrid import tracing
from idlegrid.coordinator.deps import (
    Services,
    services,
)
from idlegrid.coordinator.inference import fanout, fields, logprob_shape, tools
from idlegrid.coordinator.inference import schemas as s
from idlegrid.coordinator.inference.choices import plan
from idlegrid.coordinator.inference.embed_routes import embedding_facts
from idlegrid.coordinator.inference.hub import TaskStream
from idlegrid.coordinator.inference.openai_schema import (
    ChatRequest,
    CompletionRequest,
    chat_token_bound,
    prompt_token_bound,
)
from idlegrid.coordinator.inference.plan import Plan, price_cap
from idlegrid.coordinator.inference.service import Inference, RequestFailed
from idlegrid.coordinator.inference.structured import invalid_failure
from idlegrid.coordinator.schemas import errors
from idlegrid.coordinator.views import TaskView
from idlegrid.errors import IdlegridError, InvalidRequest, ModelNotFound

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=s.ModelList, responses=errors(401))
async def list_models(request: Request) -> dict[str, Any]:
    """Models served by live providers."""
    svc = services(request)
    await svc.nodes.authenticate_key(request.headers.get("authorization"))
    return {"object": "list", "data": await svc.inference.models()}


@router.get("/models/{model_id:path}", response_model=s.Model, responses=errors(401, 404))
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """One model some live provider serves (ids may hold `/` and `:`), else 404."""
    svc = services(request)
    await svc.nodes.authenticate_key(request.headers.get("authorization"))
    for model in await svc.inference.models():
        if model["id"] == model_id:
            return model
    raise ModelNotFound(model_id)


def _usage(done: list[TaskView]) -> dict[str, int]:
    # Summed over choices: each choice is its own task, billed for its own prompt too.
    prompt = sum(t.prompt_tokens for t in done)
    output = sum(t.output_tokens for t in done)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


class _Shape:
    """Differences between text completions and chat completions, in one place."""

    def __init__(
        self, kind: str, response_id: str, model: str, logprobs: bool = False, calls: bool = False
    ) -> None:
        self.kind, self.id, self.model, self.created = kind, response_id, model, int(time.time())
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # completions: each choice's text offset so far
        self.calls = calls  # answers may be tool calls (tools.py reads them)
        self.streams: dict[int, tools.DeltaStream] = {}
        self.echo: list[str] = []  # completions with echo: each choice's prompt, by index
        self.echo_lps: dict[int, list[Any]] = {}  # echo with logprobs: the prompt's, by index

    @property
    def scored(self) -> bool:
        """Echo with logprobs: the echoed prompt waits for its logprobs from the provider."""
        return bool(self.echo) and self.logprobs

    def echo_chunk(self, index: int, rows: list[Any]) -> dict[str, Any]:
        """The echoed prompt of a choice with its logprobs (the first chunk of its text)."""
        self.echo_lps[index] = rows
        lp, self.offsets[index] = logprob_shape.completion(rows, 0)
        return self.chunk(index, self.echo[index], None, logprobs=lp)

    def shape_logprobs(self, index: int, lps: list[Any]) -> dict[str, Any] | None:
        """A choice's logprobs for these tokens (None when the request asked for none)."""
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return logprob_shape.chat(lps)
        out, self.offsets[index] = logprob_shape.completion(lps, self.offsets.get(index, 0))
        return out

    def pieces(self, index: int, text: str, lps: list[Any] | None) -> list[dict[str, Any]]:
        """Chunks for a choice's next output: text (or tool-call deltas) and its logprobs.

        Tool calls: the logprobs of the tokens ride on the first delta they produced, or on
        an empty delta while the reader holds them (docs/tools.md)."""
        if not (text or (lps and self.logprobs)):
            return []
        lp = self.shape_logprobs(index, lps or [])
        if index not in self.streams:
            return [self.chunk(index, text, None, logprobs=lp)]
        deltas = self.streams[index].feed(text) if text else []
        if lp is not None and not deltas:
            deltas = [{}]
        return [
            self.chunk(index, None, None, delta=d, logprobs=lp if i == 0 else None)
            for i, d in enumerate(deltas)
        ]

    def chunk(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        first: bool = False,
        delta: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta = dict(delta or {})
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            obj = "chat.completion.chunk"
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def whole(self, answers: list[tuple[str, TaskView, list[Any]]]) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index, (text, task, lps) in enumerate(answers):
            choice: dict[str, Any] = {
                "index": index,
                "logprobs": self.shape_logprobs(index, self.echo_lps.get(index, []) + lps),
                "finish_reason": task.finish_reason,
            }
            if self.kind == "chat" and self.calls:
                choice["message"], choice["finish_reason"] = tools.whole_message(
                    text, task.finish_reason, task.id
                )
            elif self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = (self.echo[index] if self.echo else "") + text
            choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage([task for _, task, _ in answers]),
        }


def _failure(data: dict[str, Any], index: int, choices: int) -> IdlegridError:
    if data.get("invalid"):
        param = data.get("param") or "prompt"
        if param != "prompt":  # the provider named the field
            return InvalidRequest(data["invalid"], param=param)
        return invalid_failure(data["invalid"])
    if choices == 1:
        return RequestFailed(
            f"the request could not be served: {data.get('error')}; nothing was charged"
        )
    # All choices or an error, as OpenAI: finished siblings stay settled (their answers were
    # committed and may be audited), running ones stop and pay only what they produced.
    return RequestFailed(
        f"choice {index} could not be served: {data.get('error')}; it was not charged, "
        "the other choices were charged only for the tokens they produced",
        choice=index,
    )


TASKS_HEADER = "X-Idlegrid-Tasks"  # the grid task of each choice, by index
ROUTE_HEADER = "X-Idlegrid-Route"  # where each choice was routed first, and why


def refuse_embedding_model(inference: Inference, model: str) -> None:
    """InvalidRequest if `model` embeds rather than generates."""
    if embedding_facts(inference.nodes.cache.values(), model) is not None:
        raise InvalidRequest(f"{model} is an embedding model: use /v1/embeddings", param="model")


async def _serve(request: Request, response: Response, p: Plan) -> Any:
    svc = services(request)
    key_id = await svc.nodes.authenticate_key(request.headers.get("authorization"))
    kind, model, work, max_tokens, cap = p.kind, p.model, p.work, p.max_tokens, p.cap
    stream_out, include_usage, logprobs, calls = p.stream, p.include_usage, p.logprobs, p.calls
    await svc.nodes.admit(key_id, sum(bound + max_tokens for _, bound in work))
    refuse_embedding_model(svc.inference, model)
    # The request id reaches the provider with the task: its log lines for it carry it.
    rid = getattr(request.state, "request_id", None)
    # So does the request's span (tracing on): the provider's serving span joins its trace.
    tracing.annotate(model=model, kind=kind, choices=len(work))
    parent = tracing.traceparent()
    extra = {"request_id": rid, **({"traceparent": parent} if parent else {})}
    work = [({**payload, **extra}, bound) for payload, bound in work]
    with tracing.span("idlegrid.route_and_escrow", {"idlegrid.model": model}):
        handles = await fanout.submit_all(svc.inference, key_id, model, kind, work, max_tokens, cap)
        task_ids = [task_id for task_id, _ in handles]
        route = " | ".join(
            f"{(st.node_id or st.target or '-')[:12]}: {st.route}" for _, st in handles
        )
        tracing.annotate(tasks=",".join(task_ids), route=route)
    shape = _Shape(kind, task_ids[0], model, logprobs, calls)
    shape.streams = {k: tools.DeltaStream(t) for k, t in enumerate(task_ids)} if calls else {}
    shape.echo = p.echo or []
    started = time.perf_counter()
    if stream_out:
        return StreamingResponse(
            _sse(svc, shape, handles, started, include_usage),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                TASKS_HEADER: ",".join(task_ids),
                ROUTE_HEADER: route,
            },
        )
    parts: list[list[str]] = [[] for _ in handles]
    lps: list[list[Any]] = [[] for _ in handles]
    done: dict[int, TaskView] = {}
    ended: set[int] = set()
    events = fanout.interleave(svc.inference, [st for _, st in handles])
    first_s: float | None = None
    try:
        async for k, event in events:
            if event.kind == "pieces" and "prompt" in event.data:
                shape.echo_lps[k] = event.data["prompt"]
            elif event.kind == "pieces":
                if first_s is None:
                    first_s = time.perf_counter() - started
                    svc.metrics.ttft.labels(model).observe(first_s)
                parts[k].extend(text for _, text in event.pieces)
                lps[k].extend(event.data.get("logprobs") or ())
            elif event.kind == "done":
                ended.add(k)
                done[k] = event.data["task"]
                _count(svc, model, done[k], "ok", started, first_s)
            else:
                ended.add(k)
                svc.metrics.requests.labels(model, "failed").inc()
                raise _failure(event.data, k, len(handles))
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        await _close(svc, handles, ended)
    response.headers[TASKS_HEADER] = ",".join(task_ids)
    response.headers[ROUTE_HEADER] = route
    return shape.whole([("".join(parts[k]), done[k], lps[k]) for k in range(len(handles))])


async def _close(svc: Services, handles: list[tuple[str, TaskStream]], ended: set[int]) -> None:
    """Close every choice's stream; stop the work of those that did not end, billing only
    what they delivered. Shielded: a disconnect cancelled the caller, the books must settle."""
    with anyio.CancelScope(shield=True):
        for k, (task_id, _) in enumerate(handles):
            if k not in ended:
                await svc.inference.abandon(task_id)
            svc.inference.hub.close(task_id)


def _count(
    svc: Services, model: str, task: TaskView, outcome: str, started: float, first_s: float | None
) -> None:
    svc.metrics.observe_answer(
        model, task.node_id, time.perf_counter() - started, task.output_tokens, first_s
    )
    svc.metrics.requests.labels(model, outcome).inc()
    svc.metrics.tokens.labels(model, "prompt").inc(task.prompt_tokens)
    svc.metrics.tokens.labels(model, "output").inc(task.output_tokens)


def _sse_line(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(
    svc: Services,
    shape: _Shape,
    handles: list[tuple[str, TaskStream]],
    started: float,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """Chunks of every choice as they come, each carrying its index (as OpenAI streams n>1)."""
    ended: set[int] = set()
    done: list[TaskView] = []
    events = fanout.interleave(svc.inference, [st for _, st in handles])
    try:
        if shape.kind == "chat":
            for k in range(len(handles)):
                yield _sse_line(shape.chunk(k, "", None, first=True))
        for k, prompt in enumerate(shape.echo):  # as OpenAI: the echoed prompt comes first
            if not shape.scored:  # else with its logprobs, once the provider sent them
                yield _sse_line(shape.chunk(k, prompt, None))
        first_s: float | None = None
        async for k, event in events:
            if event.kind == "pieces" and "prompt" in event.data:
                yield _sse_line(shape.echo_chunk(k, event.data["prompt"]))
            elif event.kind == "pieces":
                text = "".join(t for _, t in event.pieces)
                if first_s is None:
                    first_s = time.perf_counter() - started
                    svc.metrics.ttft.labels(shape.model).observe(first_s)
                for chunk in shape.pieces(k, text, event.data.get("logprobs")):
                    yield _sse_line(chunk)
            elif event.kind == "done":
                ended.add(k)
                task: TaskView = event.data["task"]
                done.append(task)
                _count(svc, shape.model, task, "ok", started, first_s)
                tail = None if shape.kind == "chat" else ""
                finish: Any = task.finish_reason
                if k in shape.streams:
                    held, finish = shape.streams[k].end(finish)
                    for delta in held:
                        yield _sse_line(shape.chunk(k, None, None, delta=delta))
                yield _sse_line(shape.chunk(k, tail, finish))
            else:
                ended.add(k)
                svc.metrics.requests.labels(shape.model, "failed").inc()
                exc = _failure(event.data, k, len(handles))
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
                break
        else:
            if include_usage:
                usage = {**shape.chunk(0, None, None), "choices": [], "usage": _usage(done)}
                yield _sse_line(usage)
        yield b"data: [DONE]\n\n"
    finally:
        # The consumer went away mid-stream, or a choice failed: stop the rest and bill only
        # what each delivered.
        with anyio.CancelScope(shield=True):
            await events.aclose()
        await _close(svc, handles, ended)


@router.post(
    "/completions",
    response_model=s.Completion,
    responses={**s.COMPLETION_RESPONSES, **errors(400, 401, 402, 404, 429, 502, 503)},
)
async def completions(body: CompletionRequest, request: Request, response: Response) -> Any:
    """Text completion (OpenAI semantics; stream=true gives SSE ending in [DONE]); a list of
    prompts and n > 1 give one choice each, indexed prompt * n + j."""
    return await _serve(request, response, plan_completion(services(request).settings, body))


def plan_completion(settings: Any, body: CompletionRequest) -> Plan:
    """A text completion request's tasks (InvalidRequest for a field it cannot honour)."""
    sent = body.sent()
    fields.check(fields.COMPLETIONS, sent)
    echo = sent.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise InvalidRequest("echo must be a boolean", param="echo")
    # With logprobs, echo scores the prompt too: the provider computes and commits each
    # prompt token's logprobs, a verifier recomputes them (core/trust/prompt_lp.py).
    scored = {"prompt_logprobs": body.logprobs} if echo and body.logprobs is not None else {}
    prompts = body.prompts()
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not scored:
        # OpenAI's scoring request (lm-eval's log-likelihoods): the prompt's logprobs, no text.
        raise InvalidRequest(
            "max_tokens 0 only scores a prompt: send it with echo and logprobs",
            param="max_tokens",
        )
    stop = body.stop_list()
    sampler = body.sampler_fields(body.logprobs)
    choices = plan(len(prompts), body.n, body.seed)
    work = [
        (
            {
                "prompt": prompts[c.prompt],
                "temperature": body.temperature,
                "top_p": body.top_p,
                "seed": c.seed,
                "stop": stop,
                "stream": body.stream,
                **sampler,
                **scored,
            },
            prompt_token_bound(prompts[c.prompt]),
        )
        for c in choices
    ]
    return Plan(
        "completion",
        body.model,
        work,
        max_tokens,
        body.stream,
        body.include_usage(),
        price_cap(settings, body),
        "logprobs" in sampler,
        echo=[prompts[c.prompt] for c in choices] if echo else None,
    )


@router.post(
    "/chat/completions",
    response_model=s.ChatCompletion,
    responses={**s.CHAT_RESPONSES, **errors(400, 401, 402, 404, 429, 502, 503)},
)
async def chat_completions(body: ChatRequest, request: Request, response: Response) -> Any:
    """Chat completion, templated by the serving engine with the model's own chat template."""
    return await _serve(request, response, plan_chat(services(request).settings, body))


def plan_chat(settings: Any, body: ChatRequest) -> Plan:
    """A chat completion request's tasks (InvalidRequest for a field it cannot honour)."""
    fields.check(fields.CHAT, body.sent())
    chat = tools.prepare(body)  # tools and tool turns written out; the grammar
    messages, grammar = chat.messages, chat.grammar
    limit = body.max_completion_tokens or body.max_tokens
    max_tokens = limit if limit is not None else settings.default_chat_max_tokens
    stop = body.stop_list()
    sampler = body.sampler_fields(body.logprobs_k())
    work = [
        (
            {
                "messages": messages,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "seed": c.seed,
                "stop": stop,
                "stream": body.stream,
                **sampler,
                **({"grammar": grammar} if grammar is not None else {}),
            },
            chat_token_bound(messages),
        )
        for c in plan(1, body.n, body.seed)
    ]
    return Plan(
        "chat",
        body.model,
        work,
        max_tokens,
        body.stream,
        body.include_usage(),
        price_cap(settings, body),
        "logprobs" in sampler,
        chat.calls,
    )
