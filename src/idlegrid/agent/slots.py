"""The provider's serving slots: engines loaded, continuous batching sized, speed measured.

`idlegrid provide` calls `build_slots`. With llama.cpp or torch and no `--parallel`, the
batch size comes from the machine (engines/parallel.default_parallel: free memory over the
KV cache a sequence takes); `--parallel 0` turns batching off (one engine per `--slots`).
The start-up benchmark then measures aggregate decode tokens/s at 1, 2, 4, 8 sequences up
to that size, and the batch is remade at the best concurrency: the agent runs, and
registers, that many slots, so the router sends it up to that many requests at once,
plus `HEADROOM` more that batch lines may not take (docs/batch.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from idlegrid.agent.hardware.benchmark import measure_concurrency, measure_speed
from idlegrid.engines import parallel as par
from idlegrid.engines.base import Engine
from idlegrid.errors import EngineError

# Sequences a batch keeps beyond its measured best concurrency for interactive work only
# (BatchedLlama's `headroom`): while batch lines fill every other slot, an interactive
# request joins the next decode step instead of waiting for a line to yield.
HEADROOM = 1
# The engines that batch, and where their batching lives.
BATCHERS = {
    "llama.cpp": "idlegrid.engines.batched:BatchedLlama",
    "torch": "idlegrid.engines.torch_batched:BatchedTorch",
}


@dataclass
class Slots:
    """What `build_slots` made: the agent's engines and what the benchmark measured."""

    engines: list[Engine]
    parallel: int = 0  # sequences in the batch (0: no batching)
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    aggregate_tps: dict[int, float] = field(default_factory=dict)


def choose_parallel(engine: Any, parallel: int | None) -> int:
    """The batch size: `parallel` when given, else from free memory (llama.cpp, torch)."""
    if parallel is not None:
        return max(0, parallel)
    kv = getattr(engine, "kv_bytes_per_token", None)
    free = par.available_memory()
    if engine.name not in BATCHERS or kv is None or free is None:
        return 0
    return par.default_parallel(free, kv(), engine.context_length)


def _batcher(engine: Any) -> Any:
    if engine.name not in BATCHERS:
        raise EngineError(f"the {engine.name} engine does not batch (--parallel 0)",
                          engine=engine.name)  # fmt: skip
    module, name = BATCHERS[engine.name].split(":")
    return getattr(importlib.import_module(module), name)


def build_slots(
    load: Callable[[], Engine],
    *,
    slots: int = 1,
    parallel: int | None = None,
    benchmark: bool = True,
    bench_tokens: int = 32,
    context_per_seq: int | None = None,
    on_loaded: Callable[[], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    headroom: int = HEADROOM,
) -> Slots:
    """Load the engine(s) with `load`, batch them when chosen, benchmark unless told not;
    a batch keeps `headroom` sequences beyond its concurrency for interactive work."""
    first = load()
    if on_loaded:
        on_loaded()
    n = choose_parallel(first, parallel)
    if not n:
        engines = [first]
        for _ in range(slots - 1):
            engines.append(load())
            if on_loaded:
                on_loaded()
        out = Slots(engines)
    else:
        batcher = _batcher(first)
        batched = batcher(first, n, context_per_seq=context_per_seq)
        aggregate: dict[int, float] = {}
        best = n
        if benchmark and n > 1:
            aggregate = measure_concurrency(batched, par.levels(n), decode_tokens=bench_tokens)
            best = par.best_concurrency(aggregate)
        if headroom or best < n:
            # The KV caches of slots that would not be used are freed; the headroom's
            # sequences are added (one more sequence's KV cache each).
            batched.close()
            batched = batcher(first, best, context_per_seq=context_per_seq, headroom=headroom)
        batched.aggregate_tps = aggregate
        out = Slots(list[Engine](batched.slots()), n, aggregate_tps=aggregate)
    if benchmark:
        speed = measure_speed(out.engines[0], decode_tokens=bench_tokens, on_token=on_token)
        out.prefill_tps, out.decode_tps = speed.prefill_tps, speed.decode_tps
    return out
