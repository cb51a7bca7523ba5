"""Chaos on a real local grid: streaming clients while providers are SIGKILLed and restarted.

Used by `bench/bench_chaos.py` and the chaos test, so both run the same thing: a `LocalGrid`
(real coordinator and agent processes on loopback), N clients each streaming completions
through the official `openai` client one after another, a killer that SIGKILLs one provider
every `kill_every_s`, and the grid's own supervisor restarting what died. Every request
must complete (continued elsewhere, charged once) or fail with a clear error.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai

from idlegrid.client.localgrid import LocalGrid


@dataclass
class ChaosResult:
    """What the clients saw and what the grid did."""

    served: list[int]  # completed requests per client
    failed: list[str]  # errors clients got
    latencies_s: list[float]
    kills: int
    restarts: int
    ledger_ok: bool
    supervisor_log: list[str] = field(default_factory=list)

    @property
    def fairness(self) -> float:
        """Most requests any client got served over the fewest (1.0: perfectly even)."""
        return max(self.served) / max(min(self.served), 1)

    def p(self, q: float) -> float:
        """A latency percentile in seconds."""
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def summary(self) -> str:
        """One paragraph for a person."""
        return (
            f"served {sum(self.served)} ({self.served}), failed {len(self.failed)}, "
            f"kills {self.kills}, restarts {self.restarts}, fairness "
            f"{self.fairness:.2f}, latency p50 {statistics.median(self.latencies_s):.2f} s"
            f" p99 {self.p(0.99):.2f} s, ledger {'ok' if self.ledger_ok else 'BROKEN'}"
        )


def run_chaos(
    grid: LocalGrid,
    *,
    clients: int,
    duration_s: float,
    kill_every_s: float,
    max_tokens: int = 24,
    seed: int = 0,
) -> ChaosResult:
    """Drive a started grid (funded key) for `duration_s`; stop it before returning."""
    served = [0] * clients
    failed: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    rng = random.Random(seed)
    log: list[str] = []

    def client(i: int) -> None:
        c = openai.OpenAI(
            base_url=f"{grid.url}/v1", api_key=grid.api_key, max_retries=0, timeout=120
        )
        n = 0
        while not done.is_set():
            began = time.monotonic()
            try:
                text = ""
                for chunk in c.completions.create(
                    model=grid.model,
                    prompt=f"client {i} request {n}",
                    max_tokens=max_tokens,
                    stream=True,
                ):
                    text += chunk.choices[0].text if chunk.choices else ""
                with lock:
                    served[i] += 1
                    latencies.append(time.monotonic() - began)
            except openai.APIError as exc:
                with lock:
                    failed.append(f"client {i}: {type(exc).__name__}: {exc}")
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    kills = 0
    start = time.monotonic()
    next_kill = start + kill_every_s
    tick = threading.Event()
    while time.monotonic() - start < duration_s:
        now = time.monotonic()
        if now >= next_kill:
            live = [p for p in grid.agents if p.poll() is None]
            if live:
                rng.choice(live).kill()
                kills += 1
            next_kill += kill_every_s
        log.extend(grid.supervise())
        tick.wait(0.2)  # the supervisor's own period, as `idlegrid up` runs it
    done.set()
    for t in threads:
        t.join(timeout=180)
    restarts = sum(grid.restarts(f"provider-{i}") for i in range(len(grid.agents)))
    with httpx.Client(
        base_url=grid.url,
        trust_env=False,
        timeout=30,
        headers={"Authorization": f"Bearer {grid.operator_key}"},
    ) as c:
        ledger_ok = bool(c.get("/api/v1/ledger/verify").json().get("ok"))
    return ChaosResult(served, failed, latencies, kills, restarts, ledger_ok, log)
