"""How fast this provider's engine runs its model, measured once at agent start-up.

The numbers are claims the coordinator uses for matching until verified speed (from real
work and hardware challenges) replaces them, so the measurement is short and greedy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from idlegrid.engines.base import Engine, SamplingParams
from idlegrid.errors import EngineError

# Plain English that any tokenizer splits into many tokens; repeated as needed.
_TEXT = (
    "The grid measures each provider before it takes work. A short prompt is read in one "
    "pass, then the model writes a few words, one token at a time, and the clock is read "
    "around both steps. Numbers from a warm engine are the ones that matter to buyers. "
)


@dataclass(frozen=True)
class Speed:
    """Prefill and decode throughput of one engine on one machine."""

    prefill_tps: float  # prompt tokens per second
    decode_tps: float  # generated tokens per second, after the first
    ttft_s: float  # time to the first token for the measured prompt
    prompt_tokens: int
    decode_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict, for the agent's registration message."""
        return asdict(self)


def measure_speed(
    engine: Engine,
    *,
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    clock: Callable[[], float] = time.perf_counter,
    on_token: Callable[[int, int], None] | None = None,
) -> Speed:
    """Time one greedy generation: prefill of `prompt_tokens`, then `decode_tokens` steps.

    `on_token(done, total)` is called after each generated token (for a progress bar).
    """
    room = engine.context_length - 1
    prompt_tokens = max(1, min(prompt_tokens, room - decode_tokens))
    decode_tokens = max(1, min(decode_tokens, room - prompt_tokens))
    ids = _prompt_ids(engine, prompt_tokens)
    greedy = SamplingParams(temperature=0.0)
    # Warm-up on the same shapes: first-touch page faults, allocations and kernel selection
    # would otherwise double the first prefill time on a cold engine.
    _run(engine, ids, 2)

    stream = engine.generate(ids, greedy)
    try:
        start = clock()
        _next(stream)
        first = clock()
        if on_token:
            on_token(1, decode_tokens + 1)
        for i in range(decode_tokens):
            _next(stream)
            if on_token:
                on_token(i + 2, decode_tokens + 1)
        end = clock()
    finally:
        _close(stream)
    ttft = max(first - start, 1e-9)
    return Speed(
        prefill_tps=prompt_tokens / ttft,
        decode_tps=decode_tokens / max(end - first, 1e-9),
        ttft_s=ttft,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
    )


def _prompt_ids(engine: Engine, n: int) -> list[int]:
    text = _TEXT
    ids = engine.tokenize(text)
    while len(ids) < n:
        text += _TEXT
        ids = engine.tokenize(text)
    return ids[:n]


def _run(engine: Engine, ids: list[int], n: int) -> None:
    stream = engine.generate(ids, SamplingParams(temperature=0.0))
    try:
        for _ in range(n):
            _next(stream)
    finally:
        _close(stream)


def _next(stream: Iterator[int]) -> int:
    try:
        return next(stream)
    except StopIteration:
        raise EngineError("engine stopped before the benchmark ended", engine="benchmark") from None


def _close(stream: Iterator[int]) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def measure_concurrency(
    batched: Any,
    levels: Sequence[int],
    *,
    decode_tokens: int = 32,
    prompt_tokens: int = 16,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Aggregate decode tokens/s of `batched` (engines/batched.BatchedLlama) at each of
    `levels` concurrent sequences: n seeded generations started together, timed from the
    moment all have their first token (prefill done) to the end of `decode_tokens` more."""
    _run(batched, _prompt_ids(batched.engine, prompt_tokens), 2)  # warm-up
    out: dict[int, float] = {}
    for n in levels:
        # Sampled, not greedy: the per-row sampler is part of a step's cost when serving.
        streams = [
            batched.generate(
                _prompt_ids(batched.engine, prompt_tokens + i),
                SamplingParams(temperature=1.0, seed=i + 1),
            )
            for i in range(n)
        ]
        try:
            live = [s for s in streams if _step(s)]
            start = clock()
            done = 0
            for _ in range(decode_tokens):
                live = [s for s in live if _step(s)]
                done += len(live)
            out[n] = done / max(clock() - start, 1e-9)
        finally:
            for s in streams:
                _close(s)
    return out


def _step(stream: Iterator[int]) -> bool:
    return next(stream, None) is not None
