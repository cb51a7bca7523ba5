"""Batched decoding in llama.cpp: aggregate tokens/s, and whether batching changes the numbers.

    PYTHONPATH=src python bench/bench_batched_decode.py --tokens 64 --threads 2

One llama.cpp context with several sequences (`n_seq_max`), driven through the low-level
API (`llama_batch_init`, `llama_decode`, `llama_memory_seq_rm`) with the same context
settings the engine's `Llama` uses. Each sequence's prompt is prefilled on its own; then
every step decodes one token of each of the N active sequences in one `llama_decode`.

Throughput: decode steps only (prefill excluded), N × tokens / seconds, for N = 1, 2, 4, 8,
interleaved round by round so that load on the shared machine hits every N alike.

Bit-identity: sequence 0 (one prompt, a fixed token stream taken from its solo greedy run,
so that every run feeds it the same tokens) is decoded (a) alone, (b) in a batch of N with
companions A, and (c) in a batch of N with different companions B (other prompts, other
lengths). At every step its hidden state (after the final norm) and logits are compared
bit for bit: (a) vs (b) says whether batching changes a sequence's numbers; (b) vs (c)
whether they depend on the companions' contents or only on the batch shape.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np

from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL

PROMPTS_A = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather.",
    "The capital of France is",
    "In 1969, the first humans",
    "A recipe for bread:",
    "The quick brown fox",
]
PROMPTS_B = [
    "Rain in Spain falls mainly on the plain, or so the song in the musical says, and",
    "import numpy as np\n",
    "Dear Sir or Madam, I am writing to complain about",
    "1, 2, 3, 5, 8, 13,",
    "The mitochondria is",
    "Photosynthesis converts",
    "Q: What is the tallest mountain?\nA:",
]


class Batched:
    """One llama.cpp context holding up to `n_seq` sequences, decoded one batch per step."""

    def __init__(
        self, engine: LlamaCppEngine, n_seq: int, n_ctx: int, unified: bool, model: object = None
    ) -> None:
        lib = self.lib = engine._lib
        params = lib.llama_context_default_params()
        src = engine._llm.context_params
        for name, _ in params._fields_:
            setattr(params, name, getattr(src, name))
        params.n_seq_max = n_seq
        params.n_ctx = n_ctx
        params.kv_unified = unified
        params.embeddings = False  # on for decode steps only, as the engine does
        self.ctx = lib.llama_init_from_model(model or engine._llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = engine._n_vocab
        self.n_embd = engine._n_embd
        self.batch = lib.llama_batch_init(max(512, n_seq), 0, n_seq)

    def clear(self) -> None:
        """Forget every sequence."""
        self.lib.llama_memory_clear(self.mem, True)

    def decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, seq_id, wants_output) rows."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(rows)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, seq: int, ids: Sequence[int]) -> None:
        """The prompt of one sequence in one batch, output at its last position."""
        n = len(ids)
        self.lib.llama_set_embeddings(self.ctx, False)  # else every position is an output
        self.decode([(t, p, seq, p == n - 1) for p, t in enumerate(ids)])
        self.lib.llama_set_embeddings(self.ctx, True)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of output row i's hidden state and logits."""
        lib = self.lib
        e = lib.llama_get_embeddings_ith(self.ctx, i)
        lg = lib.llama_get_logits_ith(self.ctx, i)
        return (
            np.ctypeslib.as_array(e, shape=(self.n_embd,)).copy(),
            np.ctypeslib.as_array(lg, shape=(self.n_vocab,)).copy(),
        )

    def close(self) -> None:
        """Free the batch and the context."""
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)


def run(
    b: Batched,
    prompts: Sequence[list[int]],
    steps: int,
    forced: list[int] | None = None,
    row: int = 0,
) -> tuple[float, list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Decode `steps` tokens of every prompt, batched; the sequence at `row` follows `forced`
    when given.

    Returns decode seconds, that sequence's (state, logits) per step, and its tokens.
    """
    b.clear()
    nxt: list[int] = []
    for s, ids in enumerate(prompts):
        b.prefill(s, ids)
        lg = b.lib.llama_get_logits_ith(b.ctx, -1)
        nxt.append(int(np.argmax(np.ctypeslib.as_array(lg, shape=(b.n_vocab,)))))
    if forced is not None:
        nxt[row] = forced[0]
    pos = [len(p) for p in prompts]
    trace: list[tuple[np.ndarray, np.ndarray]] = []
    toks0 = [nxt[row]]
    t0 = time.perf_counter()
    for k in range(steps):
        b.decode([(nxt[s], pos[s], s, True) for s in range(len(prompts))])
        for s in range(len(prompts)):
            state, logits = b.row(s)
            if s == row:
                trace.append((state, logits))
            nxt[s] = int(np.argmax(logits))
            pos[s] += 1
        if forced is not None and k + 1 < len(forced):
            nxt[row] = forced[k + 1]
        toks0.append(nxt[row])
    return time.perf_counter() - t0, trace, toks0


def compare(x: list[tuple[np.ndarray, np.ndarray]], y: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """'identical' or how far apart: steps differing, max relative state difference."""
    diff = [i for i, (a, b) in enumerate(zip(x, y, strict=True)) if not (
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))]  # fmt: skip
    if not diff:
        return "bit-identical"
    rel = max(
        float(np.max(np.abs(a[0] - b[0])) / (np.max(np.abs(a[0])) or 1.0))
        for a, b in zip(x, y, strict=True)
    )
    return f"differ at {len(diff)}/{len(x)} steps (first {diff[0]}), max rel state diff {rel:.2e}"


def main() -> None:
    """Throughput at 1, 2, 4, 8 sequences and the identity checks."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--split-kv", action="store_true", help="one KV stream per sequence")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=args.threads, context_length=1024)
    b = Batched(engine, max(sizes), 1024 * max(sizes), unified=not args.split_kv)
    tok_a = [engine.tokenize(p) for p in PROMPTS_A]
    tok_b = [tok_a[0]] + [engine.tokenize(p) for p in PROMPTS_B]
    print(f"llama-cpp-python {engine.describe()['version']}, {engine.describe()['device']}, "
          f"{args.threads} threads, kv_unified={not args.split_kv}")  # fmt: skip

    # the fixed token stream of sequence 0: its solo greedy run
    _, solo, forced = run(b, tok_a[:1], args.tokens)
    forced = forced[: args.tokens]

    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            dt, _, _ = run(b, tok_a[:n], args.tokens, forced)
            times[n].append(dt)
    base = args.tokens / statistics.median(times[1])
    print(f"\n{'seqs':>4} {'tok/s (median)':>15} {'x one seq':>10}")
    for n in sizes:
        rate = n * args.tokens / statistics.median(times[n])
        print(f"{n:>4} {rate:>15.1f} {rate / base:>10.2f}")

    print("\nsequence 0's hidden states and logits, step by step:")
    _, alone, _ = run(b, tok_a[:1], args.tokens, forced)
    print(f"  solo vs solo again:                     {compare(solo, alone)}")
    for n in sizes[1:]:
        _, with_a, _ = run(b, tok_a[:n], args.tokens, forced)
        _, with_b, _ = run(b, tok_b[:n], args.tokens, forced)
        _, with_a2, _ = run(b, tok_a[:n], args.tokens, forced)
        print(f"  N={n}: (a) solo vs batched:             {compare(alone, with_a)}")
        print(f"  N={n}: (b) companions A vs B:           {compare(with_a, with_b)}")
        print(f"  N={n}:     companions A vs A again:     {compare(with_a, with_a2)}")

    print("\nby row (the tracked sequence at row r of a batch of N, companions from B):")
    for n, r in ((2, 1), (3, 2), (4, 0), (4, 3), (5, 0), (5, 4), (6, 5), (8, 0), (8, 7)):
        mates = [tok_b[1 + (i % (len(tok_b) - 1))] for i in range(n)]
        mates[r] = tok_a[0]
        _, at, _ = run(b, mates, args.tokens, forced, row=r)
        print(f"  N={n} row {r} vs solo: {compare(alone, at)}")
    b.close()
    engine.close()


if __name__ == "__main__":
    main()
