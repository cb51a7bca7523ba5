"""Chaos on a real local grid: providers SIGKILLed under load, restarted by the supervisor.

    PYTHONPATH=src python bench/bench_chaos.py --engine fake --duration 180 --kill-every 30
    PYTHONPATH=src python bench/bench_chaos.py --engine llama.cpp --model gemma3:270m

Baseline in the same run: the same grid and clients for the same time without kills.
Reported: failed requests (goal 0), p50/p99 latency, per-client fairness (max ÷ min
requests served, goal ≤ 1.5), kills and restarts, and whether the ledger verifies.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from idlegrid.client.localgrid import LocalGrid
from idlegrid.testbed.chaos import run_chaos
from idlegrid.testbed.inprocess import free_port


def grid(engine: str, model: str, providers: int, delay: float) -> LocalGrid:
    """A fresh grid in a temporary data dir, started and funded."""
    g = LocalGrid(
        data_dir=Path(tempfile.mkdtemp(prefix="bench-chaos-")),
        port=free_port(),
        providers=providers,
        engine=engine,
        model=model,
        threads=1,
        funding_credits=10_000,
        provider_args=["--skip-benchmark"],
        extra_env={
            "IDLEGRID_FAKE_TOKEN_DELAY": str(delay),
            "IDLEGRID_NODE_TIMEOUT_S": "3",
            "IDLEGRID_HEARTBEAT_INTERVAL_S": "0.5",
            "IDLEGRID_STALL_TIMEOUT_S": "10",
        },
    )
    g.start(timeout_s=600)
    g.wait_for_hwproofs(timeout_s=300)
    return g


def main() -> None:
    """Baseline phase, then the chaos phase, each on a fresh grid."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="fake")
    ap.add_argument("--model", default=None)
    ap.add_argument("--providers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--kill-every", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--fake-delay", type=float, default=0.05, help="s per token (fake engine)")
    a = ap.parse_args()
    model = a.model or ("fake:1" if a.engine == "fake" else "gemma3:270m")
    print(
        f"{a.providers} providers ({a.engine}, {model}), {a.clients} streaming clients, "
        f"{a.duration:.0f} s per phase, {a.max_tokens} tokens per request"
    )
    for name, every in (
        ("baseline (no kills)", a.duration * 10),
        (f"chaos (SIGKILL every {a.kill_every:.0f} s)", a.kill_every),
    ):
        g = grid(a.engine, model, a.providers, a.fake_delay)
        try:
            r = run_chaos(
                g,
                clients=a.clients,
                duration_s=a.duration,
                kill_every_s=every,
                max_tokens=a.max_tokens,
            )
        finally:
            g.stop()
        print(f"{name}: {r.summary()}")
        for f in r.failed[:5]:
            print(f"  {f}")


if __name__ == "__main__":
    main()
