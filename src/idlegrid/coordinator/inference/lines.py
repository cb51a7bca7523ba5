"""Batch lines through the gateway: each line's body judged by the same request models as
an interactive request, priced at the batch price, and run as ordinary grid tasks (routed,
failed over, committed, audited and settled like any answer), its answer shaped as the
endpoint would have sent it. The batches domain gets this from `app.compose()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import ValidationError

from idlegrid import tracing
from idlegrid.coordinator.http_errors import error_body, status_for
from idlegrid.coordinator.inference import fanout
from idlegrid.coordinator.inference.candidates import for_batch
from idlegrid.coordinator.inference.embed_routes import embedding_list, plan_embedding
from idlegrid.coordinator.inference.openai_schema import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from idlegrid.coordinator.inference.plan import Plan
from idlegrid.coordinator.inference.routes import (
    _failure,
    _Shape,
    plan_chat,
    plan_completion,
    refuse_embedding_model,
)
from idlegrid.coordinator.inference.service import Inference
from idlegrid.coordinator.views import TaskView
from idlegrid.core import ledger, routing
from idlegrid.core.batch.money import batch_price
from idlegrid.core.ledger import Price
from idlegrid.core.trust.embedding import b64_vector
from idlegrid.errors import IdlegridError, InvalidRequest, ModelNotFound, NoCapacity


@dataclass(frozen=True)
class Quote:
    """A line's worst case at the batch price it is escrowed at."""

    hold: int
    price: Price


@dataclass(frozen=True)
class Outcome:
    """How a line ended: the status the endpoint would have answered, and its body."""

    status: int
    body: dict[str, Any]
    request_id: str


def _invalid(exc: ValidationError) -> InvalidRequest:
    """The 400 the gateway answers for a body its models refuse (as http_errors words it)."""
    errors = exc.errors()
    if not errors:
        return InvalidRequest("body: invalid", param=None)
    param = ".".join(str(p) for p in errors[0]["loc"]) or None
    return InvalidRequest(f"{param or 'body'}: {errors[0]['msg']}", param=param)


def refusal(exc: IdlegridError) -> tuple[int, dict[str, Any]]:
    """A typed error as the status and OpenAI error object an interactive request gets."""
    status, type_ = status_for(exc)
    param = exc.data.get("param") if isinstance(exc.data.get("param"), str) else None
    return status, error_body(exc.message, type_, exc.code, param)["error"]


def kept_choices(settled: Iterable[TaskView]) -> dict[int, TaskView]:
    """A line's settled tasks that kept their answer, by choice index."""
    return {t.payload["batch"].get("choice", 0): t for t in settled if t.answer is not None}


def _kept_answers(
    shape: _Shape, kept: dict[int, TaskView], choices: Iterable[int]
) -> list[tuple[str, TaskView, list[Any]]]:
    """Kept choices as `_Shape.whole` takes answers; their echoed prompt's logprobs noted."""
    out = []
    for k in choices:
        answer = kept[k].answer or {}
        if "prompt" in answer:
            shape.echo_lps[k] = answer["prompt"]
        out.append((answer.get("text", ""), kept[k], answer.get("logprobs", [])))
    return out


class BatchLines:
    """Judge, price and run the lines of batches on the grid."""

    def __init__(self, inference: Inference, share_bps: int | None) -> None:
        self.inference = inference
        self.share_bps = share_bps  # the batch price, as a share of the interactive one

    def plan(self, url: str, body: dict[str, Any]) -> Plan:
        """The line's tasks, judged as the endpoint judges a request (IdlegridError if not)."""
        settings = self.inference.settings
        try:
            if url == "/v1/chat/completions":
                plan = plan_chat(settings, ChatRequest.model_validate(body))
            elif url == "/v1/completions":
                plan = plan_completion(settings, CompletionRequest.model_validate(body))
            elif url == "/v1/embeddings":
                return plan_embedding(self.inference, EmbeddingRequest.model_validate(body))
            else:
                raise InvalidRequest(f"batches of {url} are not run yet", param="url")
        except ValidationError as exc:
            raise _invalid(exc) from None
        if plan.stream:
            raise InvalidRequest("a batch line cannot stream its answer", param="stream")
        refuse_embedding_model(self.inference, plan.model)
        return plan

    async def quote(self, url: str, body: dict[str, Any]) -> Quote:
        """The line's worst case: its choices at the dearest batch price it may be served
        at (the live providers' under its cap, or the cap itself while none is live)."""
        plan = self.plan(url, body)
        inf = self.inference
        bound = max((b for _, b in plan.work), default=0)
        cands, prices = inf.candidates(plan.model, bound, plan.max_tokens)
        cands, prices = for_batch(inf, cands, prices, self.share_bps)
        if not cands and plan.model not in await inf.db(inf.store.known_models):
            raise ModelNotFound(plan.model)
        basis = routing.price_basis(prices, inf.market.staked_nodes, plan.cap) or batch_price(
            plan.cap, self.share_bps if self.share_bps is not None else 0
        )
        assert basis is not None
        hold = sum(ledger.hold_amount(b, plan.max_tokens, basis) for _, b in plan.work)
        return Quote(hold, basis)

    def rebuild(self, url: str, body: dict[str, Any], settled: list[TaskView]) -> Outcome | None:
        """A line's answer from its settled tasks' kept answers (a coordinator stopped
        before recording it); None unless every choice settled with one."""
        plan = self.plan(url, body)
        kept = kept_choices(settled)
        if any(k not in kept for k in range(len(plan.work))):
            return None
        tasks = [kept[k] for k in range(len(plan.work))]
        if plan.kind == "embedding":
            vectors = [b64_vector(v) for v in (tasks[0].answer or {}).get("vectors", [])]
            return Outcome(200, embedding_list(plan, vectors, tasks[0].prompt_tokens), tasks[0].id)
        shape = _Shape(plan.kind, tasks[0].id, plan.model, plan.logprobs, plan.calls)
        shape.echo = plan.echo or []
        return Outcome(200, shape.whole(_kept_answers(shape, kept, range(len(tasks)))), tasks[0].id)

    async def run(
        self,
        key_id: str,
        url: str,
        body: dict[str, Any],
        tag: dict[str, Any],
        cap: Price,
        settled: Sequence[TaskView] = (),
    ) -> Outcome:
        """Serve one line now; its answer or its error. NoCapacity propagates (the caller
        tries the line again later). `settled`: tasks of the line that settled in a run a
        restart cut short; their choices keep the answers they were charged for, and only
        the others run."""
        plan = self.plan(url, body)
        names = {"batch_id": tag["id"], "custom_id": tag["custom_id"], "endpoint": url}
        attributes = {f"idlegrid.{k}": v for k, v in names.items()} | {"idlegrid.model": plan.model}
        # A line is a trace of its own (tracing on), as an interactive request is: a batch
        # lives for hours. A try that found no provider is dropped: the line is tried again
        # every RETRY_S while it waits, and a span a second says nothing the batch does not.
        line_span = tracing.span(
            "idlegrid.batch.line", attributes, root=True, drop_on=(NoCapacity,)
        )
        with line_span as current:
            # The tasks carry the line span's traceparent: the agent's span is its child.
            parent = tracing.traceparent()
            work = [({**p, "traceparent": parent}, b) for p, b in plan.work] if parent else None
            kept = kept_choices(settled)
            out = await self._run(
                key_id, plan, {**tag, "share_bps": self.share_bps}, cap, work, kept
            )
            tracing.annotate(status=out.status)
            tracing.mark_failed(current, out.status >= 500)
            return out

    async def _run(
        self,
        key_id: str,
        plan: Plan,
        tag: dict[str, Any],
        cap: Price,
        work: list[tuple[dict[str, Any], int]] | None,
        kept: dict[int, TaskView],
    ) -> Outcome:
        inf = self.inference
        todo = [k for k in range(len(plan.work)) if k not in kept]
        every = work or plan.work
        handles = await fanout.submit_all(
            inf,
            key_id,
            plan.model,
            plan.kind,
            [every[k] for k in todo],
            plan.max_tokens,
            cap,
            batch=tag,
            choices=todo,
        )
        task_ids = [task_id for task_id, _ in handles]
        tracing.annotate(tasks=",".join(task_ids))
        shape = _Shape(plan.kind, task_ids[0], plan.model, plan.logprobs, plan.calls)
        shape.echo = plan.echo or []
        parts: list[list[str]] = [[] for _ in handles]
        lps: list[list[Any]] = [[] for _ in handles]
        done: dict[int, TaskView] = {}
        failure: IdlegridError | None = None
        vectors: Any = ()  # an embeddings line's answer: its commitment's vectors
        events = fanout.interleave(inf, [st for _, st in handles])
        try:
            async for k, event in events:
                if event.kind == "pieces" and "prompt" in event.data:
                    shape.echo_lps[k] = event.data["prompt"]
                elif event.kind == "pieces":
                    parts[k].extend(text for _, text in event.pieces)
                    lps[k].extend(event.data.get("logprobs") or ())
                elif event.kind == "done":
                    done[k] = event.data["task"]
                    vectors = getattr(event.data.get("commitment"), "vectors", vectors)
                else:
                    failure = _failure(event.data, k, len(handles))
                    break
        finally:
            # A line stopped (its batch cancelled or expired, a sibling choice failed) is
            # not served: its unfinished tasks end uncharged, their holds back in escrow.
            with anyio.CancelScope(shield=True):
                await events.aclose()
                for k, (task_id, _) in enumerate(handles):
                    inf.hub.close(task_id)
                    if k not in done:
                        await inf.db(inf.store.fail, task_id, "batch line stopped")
                inf.changes.bump()
        if failure is not None:
            status, error = refusal(failure)
            return Outcome(status, {"error": error}, task_ids[0])
        if plan.kind == "embedding":
            return Outcome(200, embedding_list(plan, vectors, done[0].prompt_tokens), task_ids[0])
        # Streams run positions 0..len(todo); shape.echo_lps is keyed by stream position too.
        fresh = {c: ("".join(parts[i]), done[i], lps[i]) for i, c in enumerate(todo)}
        echo = {todo[i]: v for i, v in shape.echo_lps.items()}
        shape.echo_lps = echo
        old = dict(zip(sorted(kept), _kept_answers(shape, kept, sorted(kept)), strict=True))
        answer = shape.whole([fresh[k] if k in fresh else old[k] for k in range(len(plan.work))])
        return Outcome(200, answer, task_ids[0])
