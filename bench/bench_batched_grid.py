"""8 concurrent requests through a grid with one provider: continuous batching vs one slot.

    PYTHONPATH=src python bench/bench_batched_grid.py --concurrency 8 --max-tokens 64 --threads 2

Two local grids (coordinator + one provider process each, `--threads` engine threads) run
side by side: "old" serves one request at a time (`--parallel 0`, one slot), "new" one
engine copy with `--parallel <concurrency>` (engines/batched). Batches of `--concurrency`
simultaneous streamed completions (official openai client, greedy) alternate between the
two, so load on the shared machine hits both alike. Reported per side, medians over
batches: aggregate output tokens/s, time to first token p50 and p95; and new/old.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from idlegrid.client.localgrid import LocalGrid
from idlegrid.testbed.inprocess import free_port

MODEL = "gemma3:270m"
PROMPTS = [
    "Here is a long list of European cities:\n1.",
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Ingredients for a simple bread recipe:\n-",
]


def one(client: openai.OpenAI, prompt: str, max_tokens: int, t0: float) -> tuple[float, int]:
    """(ttft from the batch's start, output tokens) of one streamed completion."""
    first, tokens = None, 0
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
    return (first if first is not None else float("nan")), tokens


def batch(client: openai.OpenAI, n: int, max_tokens: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s and the TTFTs of `n` simultaneous completions."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        res = list(
            pool.map(lambda i: one(client, PROMPTS[i % len(PROMPTS)], max_tokens, t0), range(n))
        )
    wall = time.perf_counter() - t0
    return sum(t for _, t in res) / wall, [f for f, _ in res]


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    """Start both grids, alternate batches, print medians and ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2)
    args = ap.parse_args()
    grids = {
        "old": LocalGrid(Path(tempfile.mkdtemp(prefix="ig-old-")), free_port(), providers=1,
                         threads=args.threads, provider_args=("--parallel", "0")),
        "new": LocalGrid(Path(tempfile.mkdtemp(prefix="ig-new-")), free_port(), providers=1,
                         threads=args.threads,
                         provider_args=("--parallel", str(args.concurrency))),
    }  # fmt: skip
    clients: dict[str, openai.OpenAI] = {}
    rates: dict[str, list[float]] = {"old": [], "new": []}
    ttfts: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for name, g in grids.items():
            g.start()
            g.wait_for_hwproofs()
            clients[name] = openai.OpenAI(base_url=f"{g.url}/v1", api_key=g.api_key, max_retries=0)
            batch(clients[name], 2, 4)  # warm
        for b in range(args.batches):
            for name in ("old", "new") if b % 2 == 0 else ("new", "old"):
                rate, firsts = batch(clients[name], args.concurrency, args.max_tokens)
                rates[name].append(rate)
                ttfts[name].extend(firsts)
                print(name, f"{rate:.1f} tok/s", "TTFTs", [round(f, 1) for f in sorted(firsts)])
    finally:
        for c in clients.values():
            c.close()
        for g in grids.values():
            g.stop()
    print(f"{args.concurrency} concurrent x {args.max_tokens} tokens, one provider on "
          f"{args.threads} threads, {args.batches} batches each")  # fmt: skip
    print(f"{'path':<5} {'tok/s':>7} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    for name in ("old", "new"):
        r = statistics.median(rates[name])
        print(f"{name:<5} {r:>7.1f} {pct(ttfts[name], 0.5):>11.2f} {pct(ttfts[name], 0.95):>11.2f}")
    ratio = statistics.median(rates["new"]) / statistics.median(rates["old"])
    print(f"new / old aggregate: {ratio:.2f}x")


if __name__ == "__main__":
    main()
