"""The limits on one attempt's uploads: its token budget and the shape of its pieces."""

from __future__ import annotations

import logging
from typing import Any

from idlegrid.coordinator.inference.hub import TaskStream
from idlegrid.coordinator.views import TaskView
from idlegrid.core import tasks
from idlegrid.core.trust.commitment import Commitment
from idlegrid.core.trust.embedding import AnyCommitment, vector_b64
from idlegrid.errors import Conflict, InvalidRequest

log = logging.getLogger("idlegrid.coordinator")

# A piece is one token's text plus any text held back while it could begin a stop string.
MAX_PIECE_CHARS = 2048


def budget(task: TaskView) -> int:
    return int(task.payload["max_tokens"]) - len(task.delivered_ids)


def check_budget(stream: TaskStream, task_id: str, fresh: list[tuple[int, str]]) -> None:
    """Refuse output past what the request may be billed for (Conflict: the attempt's
    uploads are refused, the consumer is charged only for what was accepted)."""
    tokens = sum(1 for tid, _ in fresh if tid >= 0)
    if stream.budget is not None and len(stream.attempt_ids) + tokens > stream.budget:
        raise Conflict(
            f"upload past max_tokens for {task_id}: {stream.budget} tokens left for this attempt",
            code="over_budget",
            expected=stream.next_index,
        )
    flushes = sum(1 for tid, _ in fresh if tid < 0)
    if stream.flushed or flushes > 1 or (flushes and fresh[-1][0] >= 0):
        raise Conflict(
            "only the last piece of an attempt may carry text without a token",
            code="bad_piece",
            expected=stream.next_index,
        )
    if any(len(text) > MAX_PIECE_CHARS for _, text in fresh):
        raise Conflict(
            f"a piece's text is over {MAX_PIECE_CHARS} characters",
            code="bad_piece",
            expected=stream.next_index,
        )
    stream.flushed = stream.flushed or flushes == 1


def bill_prompt(task: TaskView, c: AnyCommitment, claimed: int, node_id: str) -> int:
    """Prompt tokens to bill for a finished attempt: what its commitment fixes (the
    provider's claim is advisory; a disagreement is logged)."""
    bill = tasks.billed_prompt_tokens(
        c.header.start, len(task.delivered_ids), claimed, int(task.payload["max_prompt_tokens"])
    )
    if bill.disagrees:
        log.warning(
            "task %s: %s claimed %d prompt tokens, its commitment fixes %d; billing %d",
            task.id,
            node_id,
            bill.claimed,
            c.header.start - len(task.delivered_ids),
            bill.tokens,
        )
    return bill.tokens


def answer_slo(stream: TaskStream, now: float) -> tuple[float | None, float | None]:
    """What the consumer saw of an answer: time to first token and tokens per second."""
    first = stream.first_piece_at
    ttft = first - stream.opened_at if first is not None else None
    tps = (
        (len(stream.attempt_ids) - 1) / (now - first)
        if (first is not None and now > first and len(stream.attempt_ids) > 1)
        else None
    )
    return ttft, tps


def check_logprobs(
    stream: TaskStream, fresh: list[tuple[int, str]], logprobs: list[Any] | None, skip: int
) -> list[Any] | None:
    """The fresh pieces' logprobs as the consumer gets them (None when not asked for);
    Conflict unless each token piece carries its own (and only those do)."""
    if stream.logprobs_k is None:
        return None
    lps = list(logprobs[skip:]) if logprobs is not None else []
    shaped = len(lps) == len(fresh) and all(
        (lp is not None) == (tid >= 0) and (lp is None or len(lp.top) == stream.logprobs_k)
        for (tid, _), lp in zip(fresh, lps, strict=False)
    )
    if not shaped:
        raise Conflict(
            "logprobs were asked for: each token piece carries its own",
            code="bad_piece",
            expected=stream.next_index,
        )
    out = [lp.model_dump() if lp is not None else None for lp in lps]
    stream.attempt_logprobs.extend((tid, lp) for (tid, _), lp in zip(fresh, out, strict=True)
                                   if lp is not None)  # fmt: skip
    return out


def committed_logprobs(c: AnyCommitment, sent: list[tuple[int, dict[str, Any]]]) -> None:
    """InvalidRequest unless the logprobs the consumer was sent are the committed ones
    (then the audit that rechecks the commitment checks what the consumer got). An
    embedding commitment has none: nothing may have been sent."""
    chunks = c.chunks if isinstance(c, Commitment) else ()
    committed = [lp for ch in chunks for lp in ch.logprobs]
    same = len(committed) >= len(sent) and all(
        lp.token == tid
        and lp.logprob == got["lp"]
        and [(t, v) for t, v, _ in got["top"]] == list(lp.top)
        for lp, (tid, got) in zip(committed, sent, strict=False)
    )
    if not same:
        raise InvalidRequest("the logprobs sent differ from the committed ones", param="commitment")


def kept_answer(stream: TaskStream, c: AnyCommitment) -> dict[str, Any]:
    """A batch line's answer as its consumer got it, to keep with its settlement (an
    embeddings line's: its vectors, as OpenAI's base64)."""
    if not isinstance(c, Commitment):
        return {"vectors": [vector_b64(v) for v in getattr(c, "vectors", ())]}
    kept = stream.kept
    return {"text": "".join(kept["text"]), "logprobs": kept["logprobs"], **(
        {"prompt": kept["prompt"]} if "prompt" in kept else {})}  # fmt: skip


def accept_prompt(stream: TaskStream, prompt: Any) -> dict[str, Any] | None:
    """An attempt's prompt logprobs (protocol PromptLogprobsMsg): kept for its commitment
    check; the consumer's shape of them the first time any attempt sends them (None after,
    or for a retried upload). Conflict if the request did not ask, the shape is wrong, or
    the attempt already sent other values, or sends them after its first piece."""
    k = stream.prompt_k
    if k is None or any(len(r.top) != k for r in prompt.rows):
        raise Conflict("prompt logprobs were not asked for in this shape", code="bad_piece")
    if stream.attempt_prompt is not None:
        if stream.attempt_prompt != prompt:
            raise Conflict("prompt logprobs were already sent", code="bad_piece")
        return None
    if stream.next_index:
        raise Conflict("prompt logprobs come before the first piece", code="bad_piece")
    stream.attempt_prompt = prompt
    if stream.prompt_sent:
        return None
    stream.prompt_sent = True
    first = {"lp": None, "bytes": prompt.first, "top": None}
    return {"prompt": [first, *(r.model_dump() for r in prompt.rows)]}


def committed_prompt(c: AnyCommitment, stream: TaskStream, task: TaskView) -> None:
    """InvalidRequest unless the commitment's prompt logprobs are the ones this attempt
    sent, one per prompt position after the first (and absent when the request did not
    ask for them)."""
    got = c.prompt if isinstance(c, Commitment) else None
    sent = stream.attempt_prompt
    n_prompt = c.header.start - len(task.delivered_ids)
    if stream.prompt_k is None and got is None:
        return
    same = (
        got is not None
        and sent is not None
        and got.k == stream.prompt_k
        and len(got.rows) == len(sent.rows) == n_prompt - 1
        and all(
            lp.logprob == r.lp and [(t, v) for t, v, _ in r.top] == list(lp.top)
            for lp, r in zip(got.rows, sent.rows, strict=True)
        )
    )
    if not same:
        raise InvalidRequest(
            "the prompt logprobs sent differ from the committed ones", param="commitment"
        )
