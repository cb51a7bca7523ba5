"""Earnings are income for work: a grid whose provider is minted stake credits, as
`idlegrid up` does, reports only what the provider served."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import openai

from idlegrid.config import CoordinatorSettings
from idlegrid.core import income
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

MODEL = "fake:1"


def _until(predicate: Any, timeout_s: float = 20.0) -> Any:
    tick = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        value = predicate()
        if value:
            return value
        tick.wait(0.05)
    raise TimeoutError("condition not reached")


def test_minted_stake_is_not_earnings(tmp_path: Path, database_url: str) -> None:
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, port=free_port(), heartbeat_interval_s=0.2
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agent = AgentThread(
        make_agent(
            coordinator.url,
            [FakeEngine(MODEL)],
            "p0",
            device_price_h=50_000,
            stake_per_device=5 * MICRO,
        )
    )
    agent.start()
    try:
        with coordinator.admin(timeout=30) as c:
            node = _until(lambda: [n for n in c.get("/api/v1/status").json()["nodes"] if n["live"]])
            node_id = node[0]["id"]
            c.post(  # the stake faucet of `idlegrid up` (localgrid.fund_providers)
                "/api/v1/admin/mint",
                json={"node_id": node_id, "amount": 20 * MICRO, "reference": "faucet"},
            ).raise_for_status()
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "k"},
            ).raise_for_status()
            # The agent stakes from the minted credits on a heartbeat.
            _until(
                lambda: any(
                    a.startswith(f"stake:{node_id}:") and v > 0
                    for a, v in c.get("/api/v1/status").json()["balances"].items()
                )
            )
        with openai.OpenAI(
            base_url=f"{coordinator.url}/v1", api_key=key["api_key"], max_retries=0
        ) as client:
            answer = client.completions.create(model=MODEL, prompt="earn", max_tokens=8)
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        with coordinator.admin(timeout=30) as c:
            status = c.get("/api/v1/status").json()
            settled = [
                p["amount"]
                for e in c.get("/api/v1/ledger").json()["entries"]
                if e["key"].startswith("settle:")
                for p in e["postings"]
                if p["account"] == f"accrual:{node_id}"
            ]
            report = c.get("/api/v1/economics/earnings", params={"period": "1h"}).json()
            page = c.get("/").text
        served = sum(settled)
        assert served > 0
        row = report["providers"][0]
        # The balance holds 20 minted credits less the 5 staked; none of it is income.
        assert status["balances"][f"provider:{node_id}"] == 15 * MICRO
        assert row["earned"] == served == row["income"][income.TOKENS]
        assert {k for k, v in row["income"].items() if v} == {income.TOKENS}
        assert row["paid"] == 0 and row["accrued"] == served  # not paid out yet
        assert status["nodes"][0]["earned"] == served and status["nodes"][0]["paid"] == 0
        assert "15.0" not in page.split('id="providers-table"')[1].split("</table>")[0]
    finally:
        agent.stop()
        coordinator.stop()
