"""Honest provider and honest verifier on a real loopback grid with the default model: every
answer audited, none may be flagged (issue 15); commitment and verifier cost on the way.

    PYTHONPATH=src python bench/bench_honest_audits.py --requests 1000 --tokens 8

A real coordinator (SQLite), an unmodified agent serving llama.cpp gemma3:270m Q4_K_M on
one thread, and a second unmodified agent on its own llama.cpp instance that verifies (it
is dearer, so routing sends the work to the first). The audit policy is set to audit every
answer (`IDLEGRID_TRUST_FULL_AUDITS`), canaries at their default rate; sampling cycles
through greedy, T = 1 and T = 0.8 with top-p 0.9, each request with its own seed. Paid
through the official `openai` client. A running summary is printed every `--batch`
requests, so a run cut short still reports what it did.

Engine time is measured inside the engines (a thin subclass that times `generate` steps,
the deferred first-state recompute that the commitment needs, and `audit`), both wall and
this thread's CPU time: the box is shared, and CPU time is what the other jobs disturb less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import openai

from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.commit import Recorder
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

CONTEXT = 256
SAMPLING = [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)]
SUBJECTS = ["weather", "river", "market", "library", "harbour", "garden", "engine", "winter"]


class Clock:
    """Wall and thread-CPU seconds spent in one kind of engine work."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def add(self, wall: float, cpu: float) -> None:
        """One piece of work."""
        self.wall.append(wall)
        self.cpu.append(cpu)


class TimedLlama(LlamaCppEngine):
    """The default engine, timing its generation, its commitment step and its audits."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gen, self.commit, self.verify = Clock(), Clock(), Clock()
        self._lock = threading.Lock()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """As the engine's, summing the time spent inside it per answer."""
        it = super().generate(prompt_ids, params)
        wall = cpu = 0.0
        try:  # the agent closes the generator at max_tokens: time it in `finally`
            while True:
                w, c = time.perf_counter(), time.thread_time()
                try:
                    token = next(it)
                except StopIteration:
                    break
                finally:
                    wall += time.perf_counter() - w
                    cpu += time.thread_time() - c
                yield token
        finally:
            with self._lock:
                self.gen.add(wall, cpu)

    def _complete(self, rec: Recorder, ids: list[int], serial: int) -> None:
        w, c = time.perf_counter(), time.thread_time()
        super()._complete(rec, ids, serial)
        with self._lock:
            self.commit.add(time.perf_counter() - w, time.thread_time() - c)

    def audit(self, *a: Any, **kw: Any) -> Any:
        """As the engine's, timed."""
        w, c = time.perf_counter(), time.thread_time()
        try:
            return super().audit(*a, **kw)
        finally:
            with self._lock:
                self.verify.add(time.perf_counter() - w, time.thread_time() - c)


def _wait(cond: Any, timeout_s: float) -> bool:
    ev = threading.Event()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        ev.wait(0.2)
    return False


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summary(
    http: Any, provider: TimedLlama, verifier: TimedLlama, nodes: dict[str, str], sent: int
) -> dict[str, Any]:
    """Print where the run stands: audits by state, worst honest error, costs."""
    audits = http.get("/api/v1/audits").json()["audits"]
    states: dict[str, int] = {}
    for a in audits:
        key = ("canary " if a["canary"] else "") + a["state"]
        states[key] = states.get(key, 0) + 1
    # Canaries are built to fail (values 1 % off): the honest error is the real audits'.
    verdicts = [a["verdict"] for a in audits if a["verdict"] and not a["canary"]]
    rels = [v["worst_rel"] for v in verdicts if v.get("worst_rel") is not None]
    margins = [v["worst_margin"] for v in verdicts if v.get("worst_margin") is not None]
    trust = http.get("/api/v1/status").json()["trust"]["nodes"]
    flagged = {n: trust.get(i, {}).get("failed", 0) for n, i in nodes.items()}
    g, cm, v = provider.gen, provider.commit, verifier.verify
    print(
        f"requests {sent}: audits {dict(sorted(states.items()))}; failed records {flagged}; "
        f"worst rel {max(rels, default=float('nan')):.3g}, "
        f"closest margin {min(margins, default=float('nan')):.3g}",
    )
    n = min(len(g.cpu), len(cm.cpu))
    commit_share = [cm.cpu[i] / g.cpu[i] for i in range(n) if g.cpu[i] > 0]
    print(
        f"  generation median {_med(g.wall) * 1e3:.0f} ms wall / {_med(g.cpu) * 1e3:.0f} ms CPU;"
        f" commitment step {_med(cm.wall) * 1e3:.1f} ms / {_med(cm.cpu) * 1e3:.1f} ms CPU"
        f" (median share of its answer's CPU {_med(commit_share) * 100:.2f} %);"
        f" audit {_med(v.wall) * 1e3:.0f} ms / {_med(v.cpu) * 1e3:.0f} ms CPU"
        f" (audit/generation CPU {_med(v.cpu) / _med(g.cpu):.2f})",
        flush=True,
    )
    return {"states": states, "flagged": flagged}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    os.environ["IDLEGRID_TRUST_FULL_AUDITS"] = str(10 * args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="honest-audits-"))
    settings = CoordinatorSettings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.5,
        node_timeout_s=10.0,
        hw_proofs=False,
        inference_stake=0,  # the bench is about false positives, not the stake rules
    )
    coord = CoordinatorThread(settings)
    coord.start()
    provider = TimedLlama(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    verifier = TimedLlama(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    cheap, dear = Price(10 * MICRO, 40 * MICRO), Price(20 * MICRO, 80 * MICRO)
    agents = [
        AgentThread(make_agent(coord.url, [provider], "provider", price=cheap)),
        AgentThread(make_agent(coord.url, [verifier], "verifier", verifier=True, price=dear)),
    ]
    http = coord.admin(timeout=60)
    client = None
    try:
        for a in agents:
            a.start()
        _wait(lambda: len(http.get("/api/v1/status").json()["nodes"]) == 2, 60)
        nodes = {n["name"]: n["id"] for n in http.get("/api/v1/status").json()["nodes"]}
        key = http.post("/api/v1/admin/keys", json={"name": "bench"}).json()
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 10_000 * MICRO, "reference": "m"},
        )
        client = openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=2)
        t0 = time.perf_counter()
        for i in range(args.requests):
            temp, top_p = SAMPLING[i % len(SAMPLING)]
            client.completions.create(
                model=DEFAULT_MODEL,
                prompt=f"Note {i} about the {SUBJECTS[i % len(SUBJECTS)]}:",
                max_tokens=args.tokens,
                temperature=temp,
                top_p=top_p,
                seed=i,
            )
            if (i + 1) % args.batch == 0:
                summary(http, provider, verifier, nodes, i + 1)
        served = time.perf_counter() - t0
        _wait(
            lambda: all(
                a["state"] in ("passed", "failed")
                for a in http.get("/api/v1/audits").json()["audits"]
            ),
            600,
        )
        print(f"served {args.requests} requests in {served:.0f} s; all audits judged:")
        out = summary(http, provider, verifier, nodes, args.requests)
        store = coord.app.state.services.store
        balances = http.get("/api/v1/status").json()["balances"]
        verifier_pay = {k: v for k, v in balances.items() if nodes["verifier"] in k}
        print(
            f"  ledger verifies: {store.verify_ledger() == []}; provider accrual "
            f"{balances.get(ledger.accrual_account(nodes['provider']), 0)} µcr; verifier "
            f"accounts {verifier_pay}; flagged {out['flagged']}"
        )
    finally:
        if client is not None:
            client.close()
        http.close()
        for a in agents:
            a.stop(30)
        coord.stop()
        provider.close()
        verifier.close()


if __name__ == "__main__":
    main()
