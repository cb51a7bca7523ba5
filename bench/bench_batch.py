"""Batch throughput and what a running batch does to interactive latency, on a loopback grid
(coordinator + in-process agents, FakeEngine with a fixed per-token delay: the ratios
measure routing and coordinator overhead, not a model).

1. The same N short lines sent interactively by as many concurrent clients as the grid
   has slots (the concurrency it sustains), then as one batch (`/v1/batches`, at most
   `batch_in_flight` = slots lines at once): aggregate output tokens/s of each, and the
   ratio batch / interactive (target >= 0.9).
2. Streaming time to first token of interactive requests on the idle grid, then while a
   large batch runs: the ratio of the medians (target <= 1.5: batch lines yield).

    .venv/bin/python bench/bench_batch.py [--lines 1000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from idlegrid.client.localgrid import LocalGrid
from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

MODEL = "fake:1"


def _body(i: int, max_tokens: int, model: str = MODEL) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"short line {i}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _interactive(
    client: openai.OpenAI, n: int, conc: int, max_tokens: int, model: str = MODEL
) -> float:
    """Output tokens/s of n requests sent by `conc` clients at once."""

    def one(i: int) -> int:
        r = client.chat.completions.create(**_body(i, max_tokens, model))  # type: ignore[call-overload]
        assert r.usage is not None
        return int(r.usage.completion_tokens)

    start = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens / (time.perf_counter() - start)


def _batch(
    client: openai.OpenAI, n: int, max_tokens: int, wait: bool = True, model: str = MODEL
) -> Any:
    lines = [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions"}
        | {"body": _body(i, max_tokens, model)}
        for i in range(n)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    fid = client.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="batch").id
    start = time.perf_counter()
    b = client.batches.create(
        input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
    )
    if not wait:
        return b
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)  # a poll interval
        b = client.batches.retrieve(b.id)
    took = time.perf_counter() - start
    assert b.status == "completed" and b.request_counts.completed == n, b
    # The tokens the lines produced (a line may end before max_tokens), as the interactive
    # side counts its usage: n * max_tokens overstated the batch where a model stops early.
    out = client.files.content(b.output_file_id).text
    tokens = sum(
        json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
        for x in out.splitlines()
        if x
    )
    return tokens / took


def _ttft(client: openai.OpenAI, samples: int, model: str = MODEL) -> list[float]:
    out = []
    for i in range(samples):
        start = time.perf_counter()
        stream = client.chat.completions.create(**_body(10_000 + i, 4, model), stream=True)  # type: ignore[call-overload]
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        assert first is not None
        out.append(first)
    return out


def _attempts(db: Path | None, since: float, until: float) -> dict[str, float]:
    """What the coordinator's attempts table says of one phase: slots held on average, the
    median attempt, and the median refill (a node's attempt end to its next attempt start:
    how long a freed slot sat idle, plus the agent's and the coordinator's hand-over)."""
    if db is None or not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db)) as c:
        rows = c.execute(
            "SELECT node_id, started_at, ended_at FROM task_attempts"
            " WHERE started_at >= ? AND ended_at IS NOT NULL AND ended_at <= ?",
            (since, until),
        ).fetchall()
    if not rows:
        return {}
    wall = max(e for _, _, e in rows) - min(s for _, s, _ in rows)
    ends: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    for node, s, e in rows:
        ends.setdefault(node, []).append(e)
        starts.setdefault(node, []).append(s)
    refills = []
    for node, es in ends.items():
        ss = sorted(starts[node])
        for e in sorted(es):
            later = [s for s in ss if s >= e]
            if later:
                refills.append(later[0] - e)
    return {
        "slots_held": round(sum(e - s for _, s, e in rows) / max(wall, 1e-9), 2),
        "attempt_ms": round(1000 * statistics.median(e - s for _, s, e in rows), 1),
        "refill_ms": round(1000 * statistics.median(refills), 1) if refills else 0.0,
        "refill_mean_ms": round(1000 * statistics.fmean(refills), 1) if refills else 0.0,
        "refill_p95_ms": round(1000 * _p95(refills), 1) if refills else 0.0,
    }


def _p95(xs: list[float]) -> float:
    return sorted(xs)[int(0.95 * (len(xs) - 1))]


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used, and the whole machine's."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    out["machine"] = (sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])) / tick  # less idle, iowait
    return out


def _cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {k: round((after[k] - before[k]) / wall, 2) for k in before if k in after}


def _measure(
    url: str,
    api_key: str,
    args: argparse.Namespace,
    slots: int,
    model: str = MODEL,
    db: Path | None = None,
    pids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Throughput of both ways, then TTFT idle and while a batch runs, on the grid at url
    (`db`: the coordinator's SQLite file, to read each phase's attempts)."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120) as client:
        pids = pids or {}
        c0, t0 = _cpu_s(pids), time.time()
        interactive = _interactive(client, args.lines, slots, args.tokens, model)
        c1, t1 = _cpu_s(pids), time.time()
        batch = _batch(client, args.lines, args.tokens, model=model)
        c2, t2 = _cpu_s(pids), time.time()
        phases = {
            "interactive_attempts": _attempts(db, t0, t1),
            "batch_attempts": _attempts(db, t1, t2),
            # Cores each process kept busy in each phase (the machine's includes the bench).
            "interactive_cores": _cores(c0, c1, t1 - t0),
            "batch_cores": _cores(c1, c2, t2 - t1),
        }
        idle = _ttft(client, args.ttft_samples, model)
        big = _batch(client, args.lines * 2, args.tokens, wait=False, model=model)
        while True:
            counts = client.batches.retrieve(big.id).request_counts
            if counts is not None and counts.completed >= slots:
                break
            time.sleep(0.05)  # a poll interval
        busy = _ttft(client, args.ttft_samples, model)
        left = client.batches.retrieve(big.id).request_counts
        client.batches.cancel(big.id)
    return {
        "processes": bool(args.processes),
        "lines": args.lines,
        "tokens_per_line": args.tokens,
        "slots": slots,
        "batch_in_flight": args.in_flight or slots,
        "token_delay_s": args.token_delay,
        "interactive_tok_s": round(interactive, 1),
        "batch_tok_s": round(batch, 1),
        "batch_ratio": round(batch / interactive, 3),
        "ttft_idle_ms": round(1000 * statistics.median(idle), 1),
        "ttft_busy_ms": round(1000 * statistics.median(busy), 1),
        "ttft_ratio": round(statistics.median(busy) / statistics.median(idle), 3),
        "batch_running_during_ttft": left is not None and left.completed < left.total,
        "load_average": round(os.getloadavg()[0], 2),
        **phases,
    }


def _in_processes(
    args: argparse.Namespace, slots: int, tmp: Path, headroom: int, preempt: bool = True
) -> dict[str, Any]:
    """The same measurement on a grid of separate processes (`LocalGrid`: the coordinator
    and each provider its own `idlegrid` process, as `idlegrid up` runs them), so that the
    clients, the coordinator and the agents do not share one interpreter's lock.

    `headroom`: slots each provider keeps from batch lines (docs/batch.md). With the fake
    engine they are slots more (the batch's capacity stays `--slots`); with llama.cpp the
    batch gets that many more sequences than its start-up benchmark's best. `preempt`
    off: a streaming arrival waits for the batch's decode under way (llama.cpp only)."""
    env = {"IDLEGRID_HW_PROOFS": "false", "IDLEGRID_PREEMPT": "1" if preempt else "0"}
    if args.engine == "fake":
        kind: dict[str, Any] = {"engine": "fake", "model": MODEL, "threads": 1}
        provider = ["--slots", str(args.slots + headroom), "--headroom", str(headroom)]
        env |= {
            "IDLEGRID_FAKE_TOKEN_DELAY": str(args.token_delay),
            "IDLEGRID_BATCH_IN_FLIGHT": str(args.in_flight or slots),
        }
    else:  # the default model; lines beyond the batch slots wait in the queue
        kind = {"threads": 2}
        provider = ["--headroom", str(headroom)]
        env["IDLEGRID_BATCH_IN_FLIGHT"] = str(args.in_flight or 64)
    grid = LocalGrid(
        data_dir=tmp / f"headroom-{headroom}-preempt-{int(preempt)}",
        port=free_port(),
        providers=args.providers,
        funding_credits=1000,
        provider_args=provider,
        extra_env=env,
        **kind,
    )
    try:
        grid.start()
        grid.wait_for_stake()
        if args.engine != "fake":  # the batch slots the providers registered
            nodes: list[dict[str, Any]] = grid.live_nodes()
            slots = sum(int(n["slots"]) - int(n["engine"].get("headroom", 0)) for n in nodes)
        db = grid.data_dir / "coordinator.db"
        pids = {"coordinator": grid.coordinator.pid} if grid.coordinator else {}
        pids |= {f"provider{i}": p.pid for i, p in enumerate(grid.agents)}
        measured = _measure(grid.url, grid.api_key, args, slots, grid.model, db, pids)
        return {"headroom": headroom, "preempt": preempt, **measured}
    finally:
        grid.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--providers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--token-delay", type=float, default=0.01)
    ap.add_argument("--ttft-samples", type=int, default=20)
    # Below the slot count, a slot stays free during the batch: TTFT then shows the load
    # alone, without a batch line yielding (a diagnostic baseline for the yield's cost).
    ap.add_argument("--in-flight", type=int, default=0, help="batch lines at once (0: slots)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--processes", action="store_true", help="a LocalGrid of processes")
    ap.add_argument(
        "--headroom", default="0", help="--processes: slots kept from batch lines, e.g. 0,1"
    )
    ap.add_argument("--engine", choices=("fake", "llama"), default="fake", help="--processes")
    ap.add_argument(
        "--preempt",
        default="on",
        help="--processes: streams abort batch decodes: on,off",
    )
    args = ap.parse_args()
    slots = args.providers * args.slots
    tmp = Path(tempfile.mkdtemp(prefix="idlegrid-bench-batch-"))
    if args.processes:
        runs = [
            (int(h), p == "on") for h in args.headroom.split(",") for p in args.preempt.split(",")
        ]
        for h, preempt in runs:
            result = _in_processes(args, slots, tmp, h, preempt)
            print(
                json.dumps(result)
                if args.json
                else "\n".join(f"{k}: {v}" for k, v in result.items()) + "\n",
                flush=True,
            )
        return
    # No verifier runs here, so the fake providers are unverifiable: with the default
    # probation budget their held pay caps their paid work and the grid stops routing to
    # them after ~1,100 answers (docs/trust.md). This measures routing, not trust.
    os.environ.setdefault("IDLEGRID_TRUST_PROBATION_BUDGET_UCR", "-1")
    settings = CoordinatorSettings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/c.db",
        port=free_port(),
        hw_proofs=False,
        batch_in_flight=args.in_flight or slots,
        inference_stake=0,  # newcomers serve paid work at once: this measures routing
    )
    coord = CoordinatorThread(settings)
    coord.start()
    agents = [
        AgentThread(
            make_agent(
                coord.url,
                [FakeEngine(MODEL, token_delay=args.token_delay) for _ in range(args.slots)],
                f"p{i}",
            )
        )
        for i in range(args.providers)
    ]
    result: dict[str, Any] = {}
    try:
        for a in agents:
            a.start()
        wait_for_live(coord.url, args.providers)
        with coord.admin(timeout=30) as c:
            key = c.post("/api/v1/admin/keys", json={"name": "bench"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 10**6 * MICRO, "reference": "b"},
            ).raise_for_status()
        result = _measure(coord.url, key["api_key"], args, slots)
    finally:
        for a in agents:
            a.stop(30)
        coord.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
