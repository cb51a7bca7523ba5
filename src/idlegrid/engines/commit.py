"""Engine side of verified inference: record hidden states while generating, turn them into
a commitment, and recompute a commitment in one prefill pass (verifier mode).

An engine that can be audited implements `Auditable`: `recorder` (set by the agent for
one generation), `prefill_states(ids)` (last hidden state of every position in one pass),
`logits_of(states)` and `det_class()`. Sampling goes through
`idlegrid.core.trust.sampling.choose` with absolute positions, so a verifier's logits
replay the provider's choice. `audit()` is a method so that a plug-in verifier engine
(such as a lazy one in the cheat matrix) can replace it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from idlegrid.core import grammar
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust import prompt_lp
from idlegrid.core.trust.extras import Extras
from idlegrid.core.trust.logprobs import TokenLogprobs
from idlegrid.core.trust.schedule import Schedule
from idlegrid.engines.steps import Replayer


@dataclass
class Recorder:
    """Tokens an engine yielded and the hidden state that produced each."""

    tokens: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Batched decoding (engines/batched): each token's step as (batch size, row).
    shapes: list[tuple[int, int]] = field(default_factory=list)
    chunk: int = 0  # batched decoding: the prompt chunk size
    prompt: prompt_lp.PromptLogprobs | None = None  # echo with logprobs (prompt_lp.py)
    # Set by an engine that can fill some states only once the answer is over (llama.cpp:
    # the first one); `finish` runs it before the states are read.
    complete: Callable[[Recorder], None] | None = None

    def add(self, token: int, state: np.ndarray, logprobs: TokenLogprobs | None = None) -> None:
        """Record one generated token (and its logprobs, when the request asked for them)."""
        self.tokens.append(int(token))
        self.states.append(np.asarray(state, dtype=np.float32).reshape(-1))
        if logprobs is not None:
            self.logprobs.append(logprobs)

    def finish(self) -> None:
        """Let the engine fill in what it deferred (once)."""
        done, self.complete = self.complete, None
        if done is not None:
            done(self)


@runtime_checkable
class Auditable(Protocol):
    """An engine whose answers can be committed to and re-checked."""

    recorder: Recorder | None

    def prefill_states(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), hidden) float32 last hidden states, from one forward pass."""
        ...

    def logits_of(self, states: np.ndarray) -> np.ndarray:
        """(n, vocab) logits for hidden states."""
        ...

    def det_class(self) -> str:
        """The determinism class: engine, version, dtype, device, threads."""
        ...

    def is_end(self, token_id: int) -> bool:
        """End-of-generation tokens."""
        ...

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """Bytes of ids."""
        ...


def topk_entries(rows: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Flat indices and values of the k largest-magnitude entries (ties: lower index first)."""
    flat = rows.reshape(-1)
    if k >= flat.size:
        idx = np.arange(flat.size)
    else:
        part = np.argpartition(-np.abs(flat), k - 1)[:k]
        idx = part[np.lexsort((part, -np.abs(flat[part])))]
    return [int(i) for i in idx], [float(flat[i]) for i in idx]


def kth_magnitude(rows: np.ndarray, k: int) -> float:
    """The k-th largest |value| of a chunk."""
    flat = np.abs(rows.reshape(-1))
    k = min(k, flat.size)
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def build_commitment(
    engine: Any,
    model: str,
    context_ids: Sequence[int],
    rec: Recorder,
    seed: int,
    temperature: float,
    top_p: float,
    finish_reason: str,
    *,
    extras: Extras | None = None,
    constraint: cm.Constraint | None = None,
) -> cm.Commitment:
    """Commit to what `rec` recorded for one generation (penalties, bias and the count of
    logprobs it was made with in `extras`, the logprobs themselves `rec`'s; under
    `constraint`'s grammar)."""
    rec.finish()
    states = np.stack(rec.states) if rec.states else np.zeros((0, 1), np.float32)
    entries = []
    for j in range(0, len(rec.tokens), cm.CHUNK_SIZE):
        rows = states[j : j + cm.CHUNK_SIZE]
        entries.append(topk_entries(rows, cm.k_for(len(rows))))
    ended = bool(rec.tokens) and engine.is_end(rec.tokens[-1])
    return cm.build(
        model,
        engine.det_class(),
        context_ids,
        seed,
        temperature,
        top_p,
        rec.tokens,
        entries,
        finish_reason,
        ended,
        int(states.shape[1]),
        extras=extras,
        logprobs=rec.logprobs if extras is not None and extras.top_logprobs >= 0 else (),
        constraint=constraint,
        schedule=Schedule(rec.chunk, tuple(rec.shapes)) if rec.shapes else None,
        prompt=rec.prompt,
    )


def recompute(
    engine: Any,
    context_ids: Sequence[int],
    c: cm.Commitment,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    context_length: int | None = None,
    matcher: Any = None,
) -> cm.Report:
    """One prefill over context + committed tokens; report what this engine computes.

    `matcher` (engines/grammar.Matcher, advanced over earlier attempts' tokens) replays the
    request's grammar: each position's logits get the same mask the provider's did, and a
    token the grammar forbids there has margin −inf (so do all after it: the grammar state
    is lost)."""
    h = c.header
    tokens = c.tokens
    n = len(tokens)
    report_chunks: list[cm.ChunkReport] = []
    if n:
        states, replays, rechecks = _outputs(engine, list(context_ids), c, matcher)
        for j, ch in enumerate(c.chunks):
            lo = j * h.chunk_size
            rows = states[lo : lo + h.chunk_size]
            flat = rows.reshape(-1)
            values = tuple(float(flat[i]) if i < flat.size else float("nan") for i in ch.indices)
            reps = replays[lo : lo + len(ch.tokens)]
            report_chunks.append(
                cm.ChunkReport(
                    values,
                    kth_magnitude(rows, len(ch.indices)),
                    tuple(margin for margin, _ in reps),
                    tuple(allowed for _, allowed in reps),
                    tuple(rechecks[lo : lo + len(ch.tokens)]),
                )
            )
    end_ok = _end_ok(engine, c, tokens, max_new_tokens, stop, len(context_ids), context_length)
    return cm.Report(
        cm.context_hash(context_ids),
        tuple(report_chunks),
        end_ok,
        engine.det_class(),
        len(context_ids),
        prompt_rechecks(engine, context_ids, c.prompt),
    )


def prompt_rechecks(
    engine: Any, context_ids: Sequence[int], committed: prompt_lp.PromptLogprobs | None
) -> tuple[lpm.Recheck, ...]:
    """The verifier's values at each committed prompt position, by the provider's scoring
    pass (none when nothing was committed, or it claims more positions than the context)."""
    if committed is None or not hasattr(engine, "score_prompt"):
        return ()
    ids = list(context_ids[: len(committed.rows) + 1])
    if len(ids) != len(committed.rows) + 1 or len(ids) < 2:
        return ()
    out: list[lpm.Recheck] = []
    rows = committed.rows
    engine.score_prompt(
        ids, lambda p, lg: out.append(prompt_lp.recheck_at(lg, rows[p], ids[p + 1]))
    )
    return tuple(out)


def _outputs(
    engine: Any, context_ids: list[int], c: cm.Commitment, matcher: Any = None
) -> tuple[np.ndarray, list[tuple[float, bool]], list[lpm.Recheck]]:
    """The hidden states of the committed positions, each committed token's replay (margin,
    allowed), positions in order, and its logprobs recomputed (when committed).

    Per position, as the provider's sampler (`engines/steps`): the committed penalties and
    bias over the committed history (`Replayer`), then the grammar's mask, then the seeded
    replay; the logprobs are recomputed from the same adjusted and masked logits.

    Engines with `replay_states` (llama.cpp: its batched and one-token kernels differ, so it
    replays the provider's own schedule) hand over each position's logits as they compute
    it; the others run one prefill and take logits from the states, a chunk at a time.
    Either way no more than a chunk of vocabulary-sized logits is held at once.
    """
    h, tokens = c.header, c.tokens
    base = len(context_ids)
    replayer = Replayer(c, context_ids)
    grammar_ok = True

    def replay(r: int, logits: np.ndarray) -> tuple[float, bool]:
        nonlocal grammar_ok
        fits, ok = True, None
        if matcher is not None:
            tok = tokens[r]
            if grammar_ok:
                ok = grammar.allowed(matcher.mask(), len(logits))
                fits = 0 <= tok < len(ok) and bool(ok[tok])
            grammar_ok = fits = grammar_ok and fits and matcher.consume(tok)
        rep = replayer.step(r, logits, ok)
        return (rep.margin if fits else float("-inf")), rep.allowed

    if hasattr(engine, "replay_states"):
        replays: list[tuple[float, bool]] = []
        # a batched answer is replayed on its own batch shapes (engines/batched)
        more = {"schedule": h.schedule} if h.schedule is not None else {}
        states = engine.replay_states(
            context_ids, tokens, lambda r, lg: replays.append(replay(r, lg)), **more
        )
        return states, replays, replayer.rechecks
    ids = [*context_ids, *tokens]
    states = engine.prefill_states(ids[:-1])[base - 1 :]
    replays = []
    for lo in range(0, len(tokens), h.chunk_size):
        for r, lg in enumerate(engine.logits_of(states[lo : lo + h.chunk_size]), start=lo):
            replays.append(replay(r, lg))
    return states, replays, replayer.rechecks


def _end_ok(
    engine: Any,
    c: cm.Commitment,
    tokens: list[int],
    max_new: int,
    stop: Sequence[str],
    context_len: int,
    context_length: int | None,
) -> bool:
    h = c.header
    if h.ended_by_end_token:
        return bool(tokens) and engine.is_end(tokens[-1]) and h.finish_reason == "stop"
    if tokens and engine.is_end(tokens[-1]):
        return False  # an end token inside the answer that did not end it
    if h.finish_reason == "length":
        room = (context_length - context_len) if context_length else max_new
        return len(tokens) >= min(max_new, room)
    text = engine.detokenize(tokens).decode("utf-8", errors="replace")
    return any(s and s in text for s in stop)
