"""No credit leaves escrow for work that was not committed and could not be checked (issue 15),
on a real loopback grid with the default engine (llama.cpp, gemma3:270m).

Each cheat is the cheapest provider (so routing sends it the requests first), plugged into
the unmodified agent as its engine, beside an honest llama.cpp provider that also verifies:
(p1) answers with no commitment, (p2) honest answers whose reported prompt count is 3.8x
the real one, (p3) part of an answer and then a crash with no part commitment. For each:
the cheater earns nothing for unchecked work, the consumer pays only for committed work at
the real prompt count, the honest provider is paid all its committed work and never flagged,
and the ledger verifies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.db.tables import Attempt, Task
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Price, Share
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
pytest.importorskip("llama_cpp")

CONTEXT = 256
CHEAP, DEAR = Price(10 * MICRO, 40 * MICRO), Price(20 * MICRO, 80 * MICRO)
REQUESTS = 3


@pytest.fixture(scope="module")
def honest() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    yield engine
    engine.close()


def _wait(cond, timeout_s: float = 120.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


@pytest.mark.parametrize("cheat", ["uncommitted", "inflated-prompt", "part-dump"])
def test_a_cheater_earns_nothing_for_work_nobody_can_check(
    tmp_path: Path, honest: LlamaCppEngine, cheat: str
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
    engine = cheats.PAY_CHEATS[cheat](DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    agents = [
        AgentThread(make_agent(coord.url, [engine], "cheater", price=CHEAP)),
        AgentThread(make_agent(coord.url, [honest], "honest", verifier=True, price=DEAR)),
    ]
    http = coord.admin()
    client: openai.OpenAI | None = None
    try:
        for a in agents:
            a.start()
        wait_for_live(coord.url, 2)
        key = http.post("/api/v1/admin/keys", json={"name": "t"}).json()
        consumer = ledger.consumer_account(key["key_id"])
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 100 * MICRO, "reference": "m"},
        )
        nodes = {n["name"]: n["id"] for n in http.get("/api/v1/status").json()["nodes"]}
        client = openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0)
        prompts = [f"Request {i}: the weather today is" for i in range(REQUESTS)]
        failed = 0
        for prompt in prompts:
            try:
                out = client.completions.create(
                    model=DEFAULT_MODEL, prompt=prompt, max_tokens=8, temperature=0.0
                )
                assert out.choices[0].text
            except openai.APIError as exc:  # every attempt went to the cheater: nothing owed
                assert "attempts" in str(exc), exc
                failed += 1

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        # The cheater's committed answers (p2 only) are audited by the honest verifier.
        _wait(
            lambda: all(
                a["state"] in ("passed", "failed")
                for a in audits()
                if a["node_id"] == nodes["cheater"]
            )
        )
        store = coord.app.state.services.store
        assert store.verify_ledger() == []
        with store.read() as s:
            tasks = {t.id: t for t in s.scalars(select(Task))}
            attempts = list(s.scalars(select(Attempt)))
            s.expunge_all()
        assert len(tasks) == REQUESTS
        # What the rule says each provider earns, from what was committed and the real prompt.
        real_prompt = {p: len(honest.tokenize(p)) for p in prompts}
        owed: dict[str, int] = {}
        charged = 0
        cheater_tokens = 0
        for a in attempts:
            t = tasks[a.task_id]
            if a.node_id == nodes["cheater"]:
                cheater_tokens += a.output_tokens
            final = t.state == "done" and a.attempt == t.attempt
            prompt = real_prompt[t.payload["prompt"]] if final else 0
            out = a.output_tokens if a.committed else 0
            charge = Share(a.node_id, prompt, out, Price(a.prompt_price, a.output_price)).charge()
            if t.state == "done":
                charged += charge
                fee = ledger.fee_of(charge, settings.fee_bps)
                owed[a.node_id] = owed.get(a.node_id, 0) + charge - fee
        for t in tasks.values():
            if t.state == "done":  # billed from the commitment, whatever the provider claimed
                assert t.prompt_tokens == real_prompt[t.payload["prompt"]]
        balances = http.get("/api/v1/status").json()["balances"]
        # What each earned for serving (the honest one also earns audit fees as verifier).
        settles = [e for e in store.entries() if e["key"].startswith("settle:")]
        earned = {
            n: sum(
                int(p["amount"])
                for e in settles
                for p in e["postings"]
                if p["account"] == ledger.accrual_account(i)
            )
            for n, i in nodes.items()
        }
        cheater_attempts = [a for a in attempts if a.node_id == nodes["cheater"]]
        assert cheater_attempts, "routing never reached the cheater"
        if cheat == "inflated-prompt":
            # Paid for its real work at the real prompt count, not a credit more.
            assert earned["cheater"] == owed[nodes["cheater"]] > 0
            assert all(a.committed for a in cheater_attempts)
        else:
            assert earned["cheater"] == 0
            assert balances.get(ledger.accrual_account(nodes["cheater"]), 0) == 0
            assert cheater_tokens > 0  # it did deliver: nobody could check it, so unpaid
            assert not any(a.committed for a in cheater_attempts)
        # The honest provider is paid for all its committed work and never flagged.
        assert earned["honest"] == owed.get(nodes["honest"], 0)
        trust = http.get("/api/v1/status").json()["trust"]["nodes"]
        assert trust.get(nodes["honest"], {}).get("failed", 0) == 0
        assert trust.get(nodes["cheater"], {}).get("failed", 0) == 0  # nothing false to catch
        # The consumer paid only for committed work.
        assert 100 * MICRO - balances[consumer] == charged
        print(
            f"\n[{cheat}] cheater attempts {len(cheater_attempts)}, tokens it delivered "
            f"{cheater_tokens}, credits it earned {earned['cheater']} µcr; "
            f"honest earned {earned['honest']} µcr; consumer charged {charged} µcr; "
            f"failed requests {failed}/{REQUESTS}"
        )
    finally:
        if client is not None:
            client.close()
        http.close()
        for a in agents:
            a.stop(30)
        coord.stop()
        if hasattr(engine, "close"):
            engine.close()
