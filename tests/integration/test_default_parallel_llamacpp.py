"""A provider built as `idlegrid provide` builds it, with no --parallel: batched slots sized
from the machine, the start-up benchmark at 1, 2, 4, 8 sequences, and the registered slots
and engine facts carrying the best measured concurrency. A constrained request (JSON
mode) still finds the batched provider: it runs on the engine's own context."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from idlegrid.agent.slots import HEADROOM, build_slots, choose_parallel
from idlegrid.config import CoordinatorSettings
from idlegrid.engines import parallel as par
from idlegrid.engines.batching import BatchedSlot
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

CONTEXT = 256


def test_default_provider_batches_benchmarks_and_registers_its_best_concurrency(
    tmp_path: Path,
) -> None:
    loaded: list[LlamaCppEngine] = []

    def load() -> LlamaCppEngine:
        loaded.append(LlamaCppEngine(DEFAULT_MODEL, threads=2, context_length=CONTEXT))
        return loaded[-1]

    built = build_slots(load, bench_tokens=4)
    try:
        engine = loaded[0]
        assert len(loaded) == 1  # one model copy for every slot
        # The machine chose: what free memory allows (this box: 8).
        expected = choose_parallel(engine, None)
        assert built.parallel == expected >= 2
        assert engine.kv_bytes_per_token() == par.kv_bytes_per_token(18, 1, 256, 256)
        assert sorted(built.aggregate_tps) == par.levels(expected)
        assert all(t > 0 for t in built.aggregate_tps.values())
        best = par.best_concurrency(built.aggregate_tps)
        # Batch lines may fill `best` slots; one more sequence is kept for interactive work.
        assert len(built.engines) == best + HEADROOM
        assert all(isinstance(e, BatchedSlot) for e in built.engines)
        assert built.decode_tps > 0 and built.prefill_tps > 0
        facts = built.engines[0].describe()
        assert facts["concurrency"] == best and facts["grammar"]
        assert facts["headroom"] == HEADROOM and facts["parallel"] == best + HEADROOM
        assert facts["aggregate_tps"].keys() == {str(n) for n in built.aggregate_tps}
        _serve(tmp_path, built.engines, best)
    finally:
        for e in built.engines[:1]:
            e.close()
        for e in loaded:
            e.close()


def _serve(tmp_path: Path, engines: list, best: int) -> None:
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.3,
        node_timeout_s=5.0,
        long_poll_s=2.0,
        hw_proofs=False,
    )
    coord = CoordinatorThread(settings)
    coord.start()
    agent = AgentThread(make_agent(coord.url, engines, "provider"))
    http = coord.admin()
    try:
        agent.start()
        wait_for_live(coord.url, 1)
        (node,) = http.get("/api/v1/status").json()["nodes"]
        # The router sends it up to this many at once, batch lines up to `best`.
        assert node["slots"] == best + HEADROOM
        assert node["engine"]["concurrency"] == best
        key = http.post("/api/v1/admin/keys", json={"name": "t"}).json()
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 100_000_000, "reference": "m"},
        )
        with openai.OpenAI(
            base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0
        ) as client:
            out = client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": "A JSON object with a name."}],
                response_format={"type": "json_object"},
                max_tokens=24,
                temperature=0.0,
            )
        text = out.choices[0].message.content or ""
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut at max_tokens: still the start of an object
            assert text.lstrip().startswith("{")
    finally:
        http.close()
        agent.stop(30)
        coord.stop()
