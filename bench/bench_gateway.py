"""Gateway overhead and provider scaling, measured against baselines in the same run.

    .venv/bin/python bench/bench_gateway.py [--rounds 5] [--ttft-pairs 48] [--max-tokens 64]

1. Overhead: single-stream decode tokens/s through a real local grid (coordinator + one
   provider process, 1 engine thread) divided by the same engine called in this process
   (1 thread), same prompts, alternating runs; and the time to first token the grid adds,
   from `--ttft-pairs` separate short requests (the engine's own prefill time varies by
   ±15 ms from one call to the next here, so a 10 ms difference needs many pairs).
2. Scaling: 8 concurrent requests against 1 provider, then against 2 (1 thread each);
   output tokens/s of the second over the first.
Medians over rounds; these machines are shared and noisy, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from idlegrid.client.localgrid import LocalGrid
from idlegrid.engines.base import SamplingParams, stream_pieces
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.testbed.inprocess import free_port

MODEL = "gemma3:270m"
PROMPTS = [
    "Here is a long list of European cities:\n1.",
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Ingredients for a simple bread recipe:\n-",
]


def direct_run(engine: LlamaCppEngine, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft s, decode tok/s, tokens) for the engine called in-process."""
    start = time.perf_counter()
    first = last = start
    n = 0
    ids = engine.tokenize(prompt)
    for piece in stream_pieces(engine, ids, SamplingParams(temperature=0.0), max_tokens=max_tokens):
        if piece.token_id < 0:
            continue
        now = time.perf_counter()
        if n == 0:
            first = now
        last = now
        n += 1
    return first - start, (n - 1) / (last - first) if n > 1 else 0.0, n


def grid_run(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft s, decode tok/s, tokens) through the grid, measured by the consumer."""
    start = time.perf_counter()
    first = last = start
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    seen = 0
    tokens = 0
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if seen == 0:
                first = now
            last = now
            seen += 1
    if not seen:
        raise RuntimeError(f"no text came back for {prompt!r}")
    # Decode rate over the tokens after the first, as for the direct run.
    return first - start, (tokens - 1) / (last - first) if tokens > 1 else 0.0, tokens


def concurrent_tps(client: openai.OpenAI, requests: int, max_tokens: int) -> float:
    """Aggregate output tokens/s of `requests` simultaneous completions."""

    def one(i: int) -> int:
        r = client.completions.create(
            model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0
        )
        return r.usage.completion_tokens if r.usage else 0

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        total = sum(pool.map(one, range(requests)))
    return total / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--ttft-pairs", type=int, default=48)
    ap.add_argument(
        "--scaling-batches",
        type=int,
        default=4,
        help="batches of --concurrency requests timed against 1, then 2 providers",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    grid = LocalGrid(data_dir=data_dir, port=free_port(), providers=1, threads=1)
    engine = LlamaCppEngine(MODEL, threads=1)
    results: dict[str, object] = {}
    try:
        grid.start()
        grid.wait_for_hwproofs()  # steady serving, not the start-up proof
        client = openai.OpenAI(base_url=f"{grid.url}/v1", api_key=grid.api_key, max_retries=0)
        grid_run(client, PROMPTS[0], 8)  # warm both paths
        direct_run(engine, PROMPTS[0], 8)
        d_tps: list[float] = []
        g_tps: list[float] = []
        for r in range(args.rounds):
            for prompt in PROMPTS:
                # Alternate which side goes first so drift on the machine hits both alike.
                order = ("direct", "grid") if r % 2 == 0 else ("grid", "direct")
                for side in order:
                    if side == "direct":
                        d_tps.append(direct_run(engine, prompt, args.max_tokens)[1])
                    else:
                        g_tps.append(grid_run(client, prompt, args.max_tokens)[1])
        ratios = [g / d for g, d in zip(g_tps, d_tps, strict=True) if d]
        # Time to first token: short requests (the first token is all they wait for).
        t_direct, t_grid = [], []
        for i in range(args.ttft_pairs):
            prompt = PROMPTS[i % len(PROMPTS)]
            for side in ("direct", "grid") if i % 2 == 0 else ("grid", "direct"):
                if side == "direct":
                    t_direct.append(direct_run(engine, prompt, 1)[0])
                else:
                    t_grid.append(grid_run(client, prompt, 1)[0])
        added = [g - d for g, d in zip(t_grid, t_direct, strict=True)]
        results["overhead"] = {
            "direct_decode_tps_median": statistics.median(d_tps),
            "grid_decode_tps_median": statistics.median(g_tps),
            "tps_ratio_median": statistics.median(ratios),
            "samples": len(ratios),
            "direct_ttft_ms_median": 1000 * statistics.median(t_direct),
            "grid_ttft_ms_median": 1000 * statistics.median(t_grid),
            "added_ttft_ms_median": 1000 * statistics.median(added),
            "ttft_pairs": len(added),
        }
        engine.close()

        one = [
            concurrent_tps(client, args.concurrency, args.max_tokens)
            for _ in range(args.scaling_batches)
        ]
        grid.providers = 2
        grid.start_provider(1)
        grid.wait_for_providers(2)
        grid.fund_providers()  # paid requests go only to staked providers (issue 15)
        grid.wait_for_hwproofs()
        concurrent_tps(client, 2, 8)  # warm the second provider
        two = [
            concurrent_tps(client, args.concurrency, args.max_tokens)
            for _ in range(args.scaling_batches)
        ]
        results["scaling"] = {
            "concurrency": args.concurrency,
            "one_provider_tps_median": statistics.median(one),
            "two_providers_tps_median": statistics.median(two),
            "speedup": statistics.median(two) / statistics.median(one),
        }
    finally:
        grid.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    o, s = results["overhead"], results["scaling"]  # type: ignore[assignment]
    print(
        f"decode tok/s  direct {o['direct_decode_tps_median']:.1f}  grid "  # type: ignore[index]
        f"{o['grid_decode_tps_median']:.1f}  ratio (median of pairs) "  # type: ignore[index]
        f"{o['tps_ratio_median']:.3f}"
    )  # type: ignore[index]
    print(
        f"TTFT ms       direct {o['direct_ttft_ms_median']:.1f}  grid "  # type: ignore[index]
        f"{o['grid_ttft_ms_median']:.1f}  added (median of pairs) "  # type: ignore[index]
        f"{o['added_ttft_ms_median']:.1f}"
    )  # type: ignore[index]
    print(
        f"scaling       1 provider {s['one_provider_tps_median']:.1f} tok/s, 2 providers "  # type: ignore[index]
        f"{s['two_providers_tps_median']:.1f} tok/s: {s['speedup']:.2f}x"
    )  # type: ignore[index]


if __name__ == "__main__":
    main()
