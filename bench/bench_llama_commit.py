"""llama.cpp commitments: decode rate before/after, commitment cost, proof size, audits.

    PYTHONPATH=src python bench/bench_llama_commit.py --tokens 64 --rounds 5

Baseline in the same run: the engine's previous decode loop (llama.cpp's own sampler chain:
greedy, or temperature → top-p → dist), on the same loaded model, interleaved round by round
with the new loop (seeded Gumbel-max in numpy on llama.cpp's logits), so that load on the
machine hits both alike. Decode rate counts from the first token to the last (prefill
excluded). Commitment cost = the recorder's extra work (hidden state per step, the first
state recomputed after the answer) + building the commitment, against generation time.
Audits: a verifier on 1 and on 2 threads replays each committed answer; the replay against
its predecessor that evaluated the context twice (CPU time, interleaved); for comparison,
the error a one-batch prefill would show (why llama.cpp replays the provider's schedule).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from idlegrid.core.trust import commitment as cm
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.commit import Recorder, build_commitment, topk_entries
from idlegrid.engines.llamacpp import LlamaCppEngine, default_threads
from idlegrid.engines.models import DEFAULT_MODEL

PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather.",
]
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)


def old_generate(engine: LlamaCppEngine, ids: list[int], params: SamplingParams) -> Iterator[int]:
    """The engine's decode loop before this change: llama.cpp's sampler chain."""
    lib, llm = engine._lib, engine._llm
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if params.temperature <= 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    else:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        seed = (params.seed or 1) & 0x7FFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
    try:
        llm.reset()
        engine._embeddings(False)
        llm.eval(ids)
        while True:
            tok = lib.llama_sampler_sample(chain, engine._ctx, -1)
            yield tok
            llm.eval([tok])
    finally:
        lib.llama_sampler_free(chain)


CPU: list[float] = []  # the last timed() call's decode CPU seconds (this process)


def timed(gen: Iterator[int], n: int) -> tuple[list[int], float]:
    """Tokens and decode wall seconds (first token to n-th); CPU seconds go to CPU."""
    out: list[int] = []
    t0 = c0 = 0.0
    for tok in gen:
        if not out:
            t0, c0 = time.perf_counter(), time.process_time()
        out.append(tok)
        if len(out) == n:
            break
    CPU[:] = [time.process_time() - c0]
    return out, time.perf_counter() - t0


def batch_error(
    engine: LlamaCppEngine, ids: list[int], toks: list[int], states: np.ndarray
) -> float:
    """Worst top-32 relative error if the answer were re-run as one prefill batch."""
    llm = engine._llm
    llm.reset()
    engine._embeddings(False)
    llm.eval(ids[:-1])
    engine._embeddings(True)
    llm.eval([ids[-1], *toks[:-1]])
    lib = engine._lib
    rows = np.stack(
        [
            np.ctypeslib.as_array(
                lib.llama_get_embeddings_ith(engine._ctx, i), shape=(engine._n_embd,)
            ).copy()
            for i in range(len(toks))
        ]
    )
    worst = 0.0
    for j in range(0, len(toks), cm.CHUNK_SIZE):
        idx, vals = topk_entries(states[j : j + cm.CHUNK_SIZE], cm.k_for(len(states[j : j + 16])))
        flat = rows[j : j + cm.CHUNK_SIZE].reshape(-1)
        worst = max(worst, max(abs(v - flat[i]) / abs(v) for i, v in zip(idx, vals, strict=True)))
    return worst


class TwoPrefillReplay(LlamaCppEngine):
    """The verifier's replay before this change, kept as the baseline: the context evaluated
    twice, once for the first state and again for the first logits."""

    def replay_states(
        self,
        context_ids: Sequence[int],
        tokens: Sequence[int],
        on_logits: Callable[[int, np.ndarray], None],
    ) -> np.ndarray:
        """As before: first state up front, then a second prefill and the steps."""
        ctx, llm = list(context_ids), self._llm
        llm.reset()
        self._embeddings(False)
        llm.eval(ctx)
        states = np.empty((len(tokens), self._n_embd), dtype=np.float32)
        states[0] = self._last_prompt_state(ctx)
        llm.reset()
        self._embeddings(False)
        llm.eval(ctx)
        on_logits(0, self._logits())
        self._embeddings(True)
        for r, tok in enumerate(tokens[:-1], start=1):
            llm.eval([tok])
            states[r] = self._embedding()
            on_logits(r, self._logits())
        return states


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args()
    n = args.tokens
    eng = LlamaCppEngine(DEFAULT_MODEL, threads=args.threads, context_length=1024)
    settings = {
        "greedy": SamplingParams(0.0),
        "T=1": SamplingParams(1.0, 1.0, 7),
        "T=1,top_p=0.95": SamplingParams(1.0, 0.95, 7),
    }
    rates: dict[str, list[float]] = {f"{k} {w}": [] for k in settings for w in ("old", "new")}
    cpu_rates: dict[str, list[float]] = {k: [] for k in rates}
    commit_share: list[float] = []
    proof: list[float] = []
    commits: list[tuple[list[int], Any, list[int], np.ndarray, float]] = []
    for r in range(args.rounds):
        ids = eng.tokenize(PROMPTS[r % len(PROMPTS)])
        for name, params in settings.items():
            params = SamplingParams(params.temperature, params.top_p, 1000 + r)
            for which, gen in (
                ("old", old_generate(eng, ids, params)),
                ("new", eng.generate(ids, params)),
            ):
                _, dt = timed(gen, n)
                rates[f"{name} {which}"].append((n - 1) / dt)
                cpu_rates[f"{name} {which}"].append((n - 1) / CPU[0])
        # With a recorder: the whole cost of committing, timed apart from generation.
        # Same prompt and seed as the top-p run above: the same tokens, plus the recording.
        params = SamplingParams(1.0, 0.95, 1000 + r)
        rec = Recorder()
        eng.recorder = rec
        t0 = time.perf_counter()
        toks, dt = timed(eng.generate(ids, params), n)
        t1 = time.perf_counter()
        rates["recording"] = [*rates.get("recording", []), (n - 1) / dt]
        cpu_rates["recording"] = [*cpu_rates.get("recording", []), (n - 1) / CPU[0]]
        eng.recorder = None
        c = build_commitment(eng, DEFAULT_MODEL, ids, rec, params.seed or 0, 1.0, 0.95, "length")
        t2 = time.perf_counter()
        # The per-step part (reading one 640-float state) is inside t1 - t0; measured apart:
        # the commitment's own work is finishing the first state and building.
        commit_share.append((t2 - t1) / (t1 - t0))
        proof.append(len(c.encode()) / len(toks))
        commits.append((ids, c, toks, np.stack(rec.states), t1 - t0))
    print(
        f"model {DEFAULT_MODEL} Q4_K_M, {n} tokens, {args.rounds} rounds, "
        f"{args.threads} thread(s); decode tok/s medians:"
    )
    for name in settings:
        for label, table in (("wall", rates), ("cpu ", cpu_rates)):
            old = statistics.median(table[f"{name} old"])
            new = statistics.median(table[f"{name} new"])
            print(
                f"  {name:<15} {label} old chain {old:6.1f}   new seeded {new:6.1f}"
                f"   ratio {new / old:.3f}"
            )
    for label, table in (("wall", rates), ("cpu ", cpu_rates)):
        base = statistics.median(table["T=1,top_p=0.95 new"])
        rec_rate = statistics.median(table["recording"])
        print(
            f"  recording hidden states, T=1,top_p=0.95 {label}: {rec_rate:6.1f} tok/s,"
            f" ratio {rec_rate / base:.3f} to the same run without"
        )
    print(
        f"commitment cost (first state + build) / generation: median "
        f"{statistics.median(commit_share) * 100:.2f}%  max {max(commit_share) * 100:.2f}%"
    )
    print(f"proof bytes per token: {statistics.median(proof):.2f} (whole wire commitment)")
    verifiers = {t: LlamaCppEngine(DEFAULT_MODEL, threads=t, context_length=1024) for t in (1, 2)}
    for t, v in verifiers.items():
        rels, margins, ratio = [], [], []
        # Two threads crawl on a busy 2-core box (llama.cpp's per-op barrier): fewer audits.
        for ids, c, _toks, _states, gen_s in commits[: len(commits) if t == 1 else 2]:
            t0 = time.perf_counter()
            verdict = cm.judge(c, v.audit(ids, c, n), TOL, n)
            ratio.append((time.perf_counter() - t0) / gen_s)
            assert verdict.passed, verdict.reasons
            rels.append(verdict.worst_rel)
            margins.append(verdict.worst_margin)
        print(
            f"verifier t{t} vs provider t{args.threads}: worst rel {max(rels):.3g}, closest "
            f"margin {min(margins):.3g}, audit/generation time median "
            f"{statistics.median(ratio):.2f}"
        )
    # The replay against its two-prefill predecessor, interleaved audit by audit.
    old_v = TwoPrefillReplay(DEFAULT_MODEL, threads=1, context_length=1024)
    spent: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(2):
        for ids, c, _toks, _states, _gen_s in commits:
            for which, v in (("old", old_v), ("new", verifiers[1])):
                t0 = time.thread_time()
                assert cm.judge(c, v.audit(ids, c, n), TOL, n).passed
                spent[which].append(time.thread_time() - t0)
    old_s, new_s = statistics.median(spent["old"]), statistics.median(spent["new"])
    print(
        f"verifier t1 CPU per audit: two-prefill replay {old_s * 1e3:.0f} ms, one-prefill "
        f"{new_s * 1e3:.0f} ms, ratio {new_s / old_s:.3f}"
    )
    batched = [batch_error(verifiers[1], ids, toks, states) for ids, _, toks, states, _ in commits]
    print(
        f"one-batch prefill instead (not used): worst top-32 rel error {max(batched):.3g}, "
        f"median {statistics.median(batched):.3g}"
    )


if __name__ == "__main__":
    main()
