"""The grid against llama.cpp's own server, same model, same threads, same client (issue 19).

    bench/build_llama_server.sh          # once: prints the binary's path
    PYTHONPATH=src python bench/bench_vs_llama_server.py --pairs 3 \
        [--server /work/llama-server-build/build/bin/llama-server]

(a) `llama-server -m <default model's GGUF> -np 8 -t 2 -c <8 × 8192>`; (b) a local grid
(coordinator + one provider process, 2 engine threads, its default `--parallel`: the start-up
benchmark picks the concurrency it advertises), started the way bench/bench_batched_grid.py
does. Both through the official openai client: `--concurrency` simultaneous streamed
greedy `--max-tokens` completions, then one stream alone. Runs alternate A/B, B/A, ... per
pair so the shared machine's load hits both alike; each run records the load average. Per
pair: aggregate tok/s, TTFT p50/p95, single-stream tok/s and TTFT, and grid ÷ llama-server;
then the medians of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

from idlegrid.client.localgrid import LocalGrid
from idlegrid.engines.llamacpp import DEFAULT_CONTEXT
from idlegrid.engines.models import DEFAULT_MODEL, resolve_model
from idlegrid.testbed.inprocess import free_port

PROMPTS = [
    "Here is a long list of European cities:\n1.",
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Ingredients for a simple bread recipe:\n-",
]
SERVER = "/work/llama-server-build/build/bin/llama-server"


@dataclass
class Run:
    """One side's measurements in one pair."""

    rate: float  # aggregate output tokens/s of the concurrent batch
    ttfts: list[float]
    single_rate: float  # one stream alone, tokens/s from request to last token
    single_ttft: float
    load: float  # 1-minute load average when the run started


TEMPERATURE = [0.0]  # --temperature: 0 is greedy on both sides


def one(client: openai.OpenAI, prompt: str, max_tokens: int, t0: float) -> tuple[float, int]:
    """(TTFT from `t0`, output tokens) of one streamed completion."""
    first, tokens, pieces = None, None, 0
    stream = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, max_tokens=max_tokens, temperature=TEMPERATURE[0],
        seed=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    with stream:
        for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                pieces += 1
                if first is None:
                    first = time.perf_counter() - t0
    # Usage when the server reports it; else one streamed piece per token (llama-server's way).
    return (first if first is not None else float("nan")), tokens if tokens else pieces


def measure(client: openai.OpenAI, n: int, max_tokens: int) -> Run:
    """`n` simultaneous completions, then one alone."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        res = list(
            pool.map(lambda i: one(client, PROMPTS[i % len(PROMPTS)], max_tokens, t0), range(n))
        )
    rate = sum(t for _, t in res) / (time.perf_counter() - t0)
    t1 = time.perf_counter()
    ttft, toks = one(client, PROMPTS[0], max_tokens, t1)
    single = toks / (time.perf_counter() - t1)
    return Run(rate, [f for f, _ in res], single, ttft, load)


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Direct:
    """The grid's engine called in this process, no grid around it: `BatchedLlama` of
    `concurrency` slots on the same threads, each sequence consumed from its own thread.
    What the grid loses against it is the grid's (processes, relay); what it loses against
    llama-server is the engine's (hidden-state capture, Python sampling, hand-offs)."""

    def __init__(self, concurrency: int, threads: int) -> None:
        from idlegrid.engines.batched import BatchedLlama
        from idlegrid.engines.llamacpp import LlamaCppEngine

        self.engine = LlamaCppEngine(DEFAULT_MODEL, threads=threads, context_length=1024)
        self.batched = BatchedLlama(self.engine, concurrency, context_per_seq=256)
        self.steps: list[tuple[int, int, float, float, float]] = []  # steps, rows, s, s, wall

    def measure(self, n: int, max_tokens: int) -> Run:
        """`n` simultaneous sequences, then one alone; records the run's step counters."""
        load = os.getloadavg()[0]
        b = self.batched
        k0, d0, s0 = len(b.step_sizes), b.decode_s, b.sample_s
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            res = list(pool.map(lambda i: self._one(PROMPTS[i % len(PROMPTS)], max_tokens, t0),
                                range(n)))  # fmt: skip
        wall = time.perf_counter() - t0
        rows = sum(b.step_sizes[k0:])
        self.steps.append((len(b.step_sizes) - k0, rows, b.decode_s - d0, b.sample_s - s0, wall))
        t1 = time.perf_counter()
        ttft, toks = self._one(PROMPTS[0], max_tokens, t1)
        single = toks / (time.perf_counter() - t1)
        return Run(sum(t for _, t in res) / wall, [f for f, _ in res], single, ttft, load)

    def _one(self, prompt: str, max_tokens: int, t0: float) -> tuple[float, int]:
        from idlegrid.engines.base import SamplingParams
        from idlegrid.engines.commit import Recorder

        ids = self.engine.tokenize(prompt)
        first, got = float("nan"), 0
        it = self.batched.generate(ids, SamplingParams(TEMPERATURE[0], 1.0, seed=7), Recorder())
        for _ in it:
            if not got:
                first = time.perf_counter() - t0
            got += 1
            if got >= max_tokens:
                break
        it.close()  # type: ignore[attr-defined]
        return first, got

    def close(self) -> None:
        """Free the batch and the engine."""
        self.batched.close()
        self.engine.close()


@contextmanager
def llama_server(binary: str, parallel: int, threads: int, log: Path) -> Iterator[str]:
    """A running llama-server on the default model; yields its /v1 URL."""
    port = free_port()
    gguf = resolve_model(DEFAULT_MODEL).gguf_path
    ctx = str(parallel * DEFAULT_CONTEXT)
    cmd = [binary, "-m", str(gguf), "-np", str(parallel), "-t", str(threads), "-c", ctx,
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    print("llama-server:", " ".join(cmd))
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy in 300 s; see {log}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    """Start both, alternate pairs of runs, print per-pair numbers and median ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default=SERVER)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args()
    TEMPERATURE[0] = a.temperature
    tmp = Path(tempfile.mkdtemp(prefix="ig-vs-llama-server-"))
    grid = LocalGrid(tmp / "grid", free_port(), providers=1, threads=a.threads)
    runs: dict[str, list[Run]] = {"llama-server": [], "grid": [], "direct": []}
    direct = Direct(a.concurrency, a.threads) if a.direct else None
    with llama_server(a.server, a.concurrency, a.threads, tmp / "llama-server.log") as url:
        clients = {"llama-server": openai.OpenAI(base_url=url, api_key="none", max_retries=0)}
        try:
            t = time.perf_counter()
            grid.start()
            grid.wait_for_hwproofs()
            print(f"grid up in {time.perf_counter() - t:.0f} s (start-up benchmark included)")
            for node in grid.live_nodes():
                eng = node["engine"]
                assert isinstance(eng, dict)
                print(
                    f"provider: slots {node['slots']}, parallel {eng.get('parallel')}, "
                    f"aggregate tok/s by sequences {eng.get('aggregate_tps')}"
                )
            clients["grid"] = openai.OpenAI(
                base_url=f"{grid.url}/v1", api_key=grid.api_key, max_retries=0
            )
            for c in clients.values():
                measure(c, 2, 4)  # warm
            if direct is not None:
                direct.measure(2, 4)
                direct.steps.clear()
            for p in range(a.pairs):
                order = ["llama-server", "grid", *(["direct"] if direct is not None else [])]
                for name in order if p % 2 == 0 else order[::-1]:
                    if direct is not None and name == "direct":
                        r = direct.measure(a.concurrency, a.max_tokens)
                    else:
                        r = measure(clients[name], a.concurrency, a.max_tokens)
                    runs[name].append(r)
                    print(
                        f"pair {p} {name:12} {r.rate:6.1f} tok/s  TTFT p50 "
                        f"{pct(r.ttfts, 0.5):.2f} p95 {pct(r.ttfts, 0.95):.2f} s  single "
                        f"{r.single_rate:5.1f} tok/s TTFT {r.single_ttft:.2f} s  load {r.load:.1f}",
                        flush=True,
                    )
        finally:
            for c in clients.values():
                c.close()
            grid.stop()
            if direct is not None:
                direct.close()
    ls, gr = runs["llama-server"], runs["grid"]
    print(
        f"\n{a.concurrency} concurrent streamed {a.max_tokens}-token completions at T "
        f"{a.temperature:g}, "
        f"{a.threads} threads each, {a.pairs} alternating pairs; machine {os.cpu_count()} cores, "
        "shared with other engineers' test runs (load averages above)"
    )
    print(
        "| pair | llama-server tok/s | grid tok/s | ratio | TTFT p50/p95 s llama-server | "
        "grid | single tok/s llama-server | grid | ratio | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    agg, single = [], []
    for p, (x, y) in enumerate(zip(ls, gr, strict=True)):
        agg.append(y.rate / x.rate)
        single.append(y.single_rate / x.single_rate)
        print(
            f"| {p} | {x.rate:.1f} | {y.rate:.1f} | {agg[-1]:.2f} | "
            f"{pct(x.ttfts, 0.5):.2f} / {pct(x.ttfts, 0.95):.2f} | "
            f"{pct(y.ttfts, 0.5):.2f} / {pct(y.ttfts, 0.95):.2f} | {x.single_rate:.1f} | "
            f"{y.single_rate:.1f} | {single[-1]:.2f} | {x.load:.1f} / {y.load:.1f} |"
        )
    print(
        f"median grid ÷ llama-server: {a.concurrency} concurrent {statistics.median(agg):.2f}, "
        f"single stream {statistics.median(single):.2f}"
    )
    if direct is None:
        return
    print(
        "\nthe engine direct (BatchedLlama in this process, same threads; per step of its "
        "concurrent run: llama_decode, sampling + row reads, the rest of the step's wall time)"
    )
    print(
        "| pair | direct tok/s | ÷ llama-server | grid ÷ direct | single tok/s | single: grid "
        "÷ direct | steps | mean width | decode ms | sampling ms | other ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    solo = []  # issue 19's single-stream target compares the grid with the engine direct
    for p, (x, y, z, (k, rows, dec, smp, wall)) in enumerate(
        zip(ls, gr, runs["direct"], direct.steps, strict=True)
    ):
        k = max(k, 1)
        solo.append(y.single_rate / z.single_rate)
        print(
            f"| {p} | {z.rate:.1f} | {z.rate / x.rate:.2f} | {y.rate / z.rate:.2f} | "
            f"{z.single_rate:.1f} | {solo[-1]:.2f} | {k} | {rows / k:.1f} | "
            f"{1000 * dec / k:.1f} | {1000 * smp / k:.1f} | {1000 * (wall - dec - smp) / k:.1f} |"
        )
    print(f"median single stream grid ÷ direct: {statistics.median(solo):.2f}")


if __name__ == "__main__":
    main()
