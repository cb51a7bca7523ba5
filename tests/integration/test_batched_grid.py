"""A provider serving concurrent requests from one batch, audited, on both batching engines.

A real loopback grid: a provider whose two slots share one batch (`BatchedLlama`: one
llama.cpp decode per step over both requests; `BatchedTorch`: one forward), a plain verifier
of the same engine on two threads, the openai client. Two requests sent at once (before the
verifier joins, so that both go to the provider) are decoded in the same steps; both are
audited (the provider is on probation) and both pass: llama.cpp's exactly, on the batch
schedule its answers commit; torch's within the same-class tolerance of one prefill. A
provider whose batched sampler ignores the seed fails both audits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.batched import BatchedLlama
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

pytestmark = pytest.mark.slow

CONTEXT = 256
TOKENS = 40


@pytest.fixture(scope="module")
def verifier() -> Iterator[LlamaCppEngine]:
    pytest.importorskip("llama_cpp")
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=2, context_length=CONTEXT)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def torch_verifier() -> Iterator[Any]:
    pytest.importorskip("torch")
    from idlegrid.engines.torch_hf import TorchEngine

    engine = TorchEngine(DEFAULT_MODEL, threads=2, context_length=CONTEXT)
    yield engine
    engine.close()


def _wait(cond: Any, timeout_s: float = 120.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


def _grid(tmp_path: Path, batched: Any, verifier: Any) -> list[dict]:
    """Two concurrent completions on a 2-slot batched provider; their settled audits."""
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
        AgentThread(make_agent(coord.url, batched.slots(), "provider")),
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
    http = coord.admin()
    try:
        # The verifier joins once both answers are in: else it would serve one of them.
        agents[0].start()
        wait_for_live(coord.url, 1)
        key = http.post("/api/v1/admin/keys", json={"name": "t"}).json()
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 100 * MICRO, "reference": "m"},
        )
        provider_id = next(
            n["id"] for n in http.get("/api/v1/status").json()["nodes"] if n["name"] == "provider"
        )
        texts: list[str] = []
        with openai.OpenAI(
            base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0
        ) as client:

            def ask(prompt: str, seed: int) -> None:
                out = client.completions.create(
                    model=DEFAULT_MODEL, prompt=prompt, max_tokens=TOKENS, temperature=1.0,
                    seed=seed,
                )  # fmt: skip
                texts.append(out.choices[0].text)

            threads = [
                threading.Thread(target=ask, args=(p, s))
                for p, s in (("Once upon a time", 1), ("The three primary colors are", 2))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        assert len(texts) == 2
        assert max(batched.step_sizes) == 2  # the two requests shared decode steps
        agents[1].start()

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        _wait(
            lambda: len(audits()) == 2 and all(a["state"] in ("passed", "failed") for a in audits())
        )
        assert all(a["node_id"] == provider_id for a in audits())
        return audits()
    finally:
        http.close()
        for a in agents:
            if a.thread is not None:  # the verifier starts only once both answers are in
                a.stop(30)
        coord.stop()


def test_two_concurrent_batched_answers_are_both_audited_and_pass(
    tmp_path: Path, verifier: LlamaCppEngine
) -> None:
    provider = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    batched = BatchedLlama(provider, 2, context_per_seq=CONTEXT)
    try:
        for a in _grid(tmp_path, batched, verifier):
            assert a["state"] == "passed", a["verdict"]
            assert a["verdict"]["worst_rel"] == 0.0
    finally:
        batched.close()
        provider.close()


def test_a_seed_ignoring_batched_provider_fails_under_concurrency(
    tmp_path: Path, verifier: LlamaCppEngine
) -> None:
    provider = cheats.LlamaSeedIgnoring(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    batched = BatchedLlama(provider, 2, context_per_seq=CONTEXT)
    try:
        for a in _grid(tmp_path, batched, verifier):
            assert a["state"] == "failed", a["verdict"]
    finally:
        batched.close()
        provider.close()


@pytest.mark.parametrize("cheat", [False, True], ids=["honest", "seed-ignoring"])
def test_two_concurrent_batched_torch_answers_are_audited_honest_pass_cheat_fails(
    tmp_path: Path, torch_verifier: Any, cheat: bool
) -> None:
    from idlegrid.engines.torch_batched import BatchedTorch
    from idlegrid.engines.torch_hf import TorchEngine

    kind = cheats.TorchSeedIgnoring if cheat else TorchEngine
    provider = kind(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    batched = BatchedTorch(provider, 2, context_per_seq=CONTEXT)
    try:
        for a in _grid(tmp_path, batched, torch_verifier):
            assert a["state"] == ("failed" if cheat else "passed"), a["verdict"]
    finally:
        batched.close()
        provider.close()
