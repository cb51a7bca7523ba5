"""Verified inference on the default engine: llama.cpp serving gemma3:270m (Q4_K_M).

A real loopback grid: a llama.cpp provider on one thread, a llama.cpp verifier on two (a
different determinism class), the openai client. Every answer carries a commitment; the
provider is on probation, so each is audited, and every audit must pass. A llama.cpp
provider that invents its tokens (c) or ignores the seed (f) fails on every audit. Greedy
output with commitments on is llama-cpp-python's own greedy output, token for token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO, Price
from idlegrid.core.trust import commitment as cm
from idlegrid.engines.base import Generation, SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL, resolve_model
from idlegrid.testbed import cheats
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
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)  # the coordinator's cross-class one


@pytest.fixture(scope="module")
def provider() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def verifier() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=2, context_length=CONTEXT)
    yield engine
    engine.close()


def _wait(cond, timeout_s: float = 60.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


def _serve_and_audit(
    engine, verifier, prompt: str, temperature: float, top_p: float, seed: int, max_tokens: int = 8
) -> tuple[Generation, cm.Verdict]:
    ids = engine.tokenize(prompt)
    rec, res = Recorder(), Generation()
    engine.recorder = rec
    try:
        for _ in stream_pieces(
            engine, ids, SamplingParams(temperature, top_p, seed), max_tokens=max_tokens, result=res
        ):
            pass
        c = build_commitment(
            engine, DEFAULT_MODEL, ids, rec, seed, temperature, top_p, res.finish_reason
        )
    finally:
        engine.recorder = None
    c = cm.decode(c.encode())
    return res, cm.judge(c, verifier.audit(ids, c, max_tokens), TOL, max_tokens)


def test_greedy_with_commitments_is_llama_cpps_greedy(provider) -> None:
    import llama_cpp

    prompt = "The capital of France is"
    res, verdict = _serve_and_audit(provider, provider, prompt, 0.0, 1.0, 3, max_tokens=16)
    raw = llama_cpp.Llama(
        model_path=str(resolve_model(DEFAULT_MODEL).gguf_path),
        n_ctx=CONTEXT,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    try:
        direct = raw.create_completion(
            prompt,
            max_tokens=16,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
        )["choices"][0]["text"]
    finally:
        raw.close()
    assert res.text == direct and len(direct) > 10
    assert verdict.passed and verdict.worst_rel == 0.0  # same class, same schedule: exact


def test_cheats_on_llama_cpp_fail_their_audits(provider) -> None:
    # The honest engine verifies here (one thread: two crawl on a busy 2-core box); the grid
    # test below covers a verifier of another thread count.
    for i, cls in enumerate((cheats.LlamaInvented, cheats.LlamaSeedIgnoring)):
        cheat = cls(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
        try:
            # 24 tokens at T 1.5: an own draw matching the seeded one on all is negligible.
            _, verdict = _serve_and_audit(
                cheat, provider, f"Story {i}: once upon a time", 1.5, 1.0, 100 + i, max_tokens=24
            )
        finally:
            cheat.close()
        assert not verdict.passed, cls.__name__
        assert any("not the one the seed samples" in r for r in verdict.reasons)
        assert verdict.worst_rel == 0.0  # its fingerprint is honest: only the draw lies


def test_llama_cpp_grid_answers_are_committed_and_pass_audits(
    tmp_path: Path, provider, verifier
) -> None:
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
    agents = [
        AgentThread(make_agent(coord.url, [provider], "provider")),
        AgentThread(
            make_agent(
                coord.url,
                [verifier],
                "verifier",
                verifier=True,
                price=Price(1000 * MICRO, 4000 * MICRO),
            )
        ),
    ]
    http = coord.admin()  # the operator's client: admin routes and audits
    try:
        for a in agents:
            a.start()
        wait_for_live(coord.url, 2)
        key = http.post("/api/v1/admin/keys", json={"name": "t"}).json()
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 100 * MICRO, "reference": "m"},
        )
        nodes = {n["name"]: n["id"] for n in http.get("/api/v1/status").json()["nodes"]}
        client = openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0)
        for temperature, top_p in ((1.0, 0.95), (0.0, 1.0)):
            out = client.completions.create(
                model=DEFAULT_MODEL,
                prompt="Once upon a time",
                max_tokens=6,
                temperature=temperature,
                top_p=top_p,
            )
            assert out.choices[0].text

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        _wait(
            lambda: len(audits()) == 2 and all(a["state"] in ("passed", "failed") for a in audits())
        )
        for a in audits():
            assert a["node_id"] == nodes["provider"]
            assert a["state"] == "passed", a["verdict"]
            v = a["verdict"]
            assert (
                v["provider_class"].startswith("llama.cpp/")
                and v["provider_class"] != v["verifier_class"]
            )  # threads 1 against 2
            assert v["worst_rel"] == 0.0
        trust = http.get("/api/v1/status").json()["trust"]["nodes"][nodes["provider"]]
        assert trust["passed"] == 2 and trust["failed"] == 0
    finally:
        http.close()
        for a in agents:
            a.stop(30)
        coord.stop()
