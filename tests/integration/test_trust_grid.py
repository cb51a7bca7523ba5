"""Audits on a real loopback grid: tiny engines, a verifier-mode agent, the openai client.

Each cheat runs as the only cheap provider next to an honest verifier (dearer, so requests
go to the cheater); probation audits every early request, so the cheater must be caught,
slashed and ejected within 10 requests, and the consumer refunded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Posting, Price
from idlegrid.engines.tiny import TinyEngine
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

STAKE = 50 * MICRO


def _wait(cond, timeout_s: float = 30.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


@pytest.fixture
def grid_factory(tmp_path: Path) -> Iterator:
    started: list = []

    def start(provider_engine, verifier_engine) -> tuple:
        settings = CoordinatorSettings(
            data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/c.db", port=free_port(),
            fee_bps=2000, heartbeat_interval_s=0.3, node_timeout_s=3.0, long_poll_s=2.0)
        coord = CoordinatorThread(settings)
        coord.start()
        started.append(coord)
        provider = make_agent(coord.url, [provider_engine], "provider",
                              price=Price(10 * MICRO, 40 * MICRO))
        verifier = make_agent(coord.url, [verifier_engine], "verifier", verifier=True,
                              price=Price(1000 * MICRO, 4000 * MICRO))
        threads = [AgentThread(provider), AgentThread(verifier)]
        for t in threads:
            t.start()
            started.append(t)
        wait_for_live(coord.url, 2)
        store = coord.app.state.grid.store
        with httpx.Client(base_url=coord.url, trust_env=False) as c:
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post("/api/v1/admin/mint", json={"key_id": key["key_id"], "amount": 100 * MICRO,
                                               "reference": "m"})
            nodes = {n["name"]: n["id"] for n in c.get("/api/v1/status").json()["nodes"]}
        for name in ("provider", "verifier"):
            acct = ledger.stake_account(nodes[name], "cpu")
            store.post(ledger.make_entry(f"stake:{name}", Cause("test", name),
                                         [Posting(ledger.ISSUER, -STAKE), Posting(acct, STAKE)]))
        return coord, key, nodes

    yield start
    for s in reversed(started):
        s.stop() if isinstance(s, CoordinatorThread) else s.stop(10)


def _status(url: str) -> dict:
    with httpx.Client(base_url=url, trust_env=False) as c:
        return c.get("/api/v1/status").json()


def _audits(url: str) -> list[dict]:
    with httpx.Client(base_url=url, trust_env=False) as c:
        return c.get("/api/v1/audits").json()["audits"]


def _settled(url: str) -> bool:
    return all(a["state"] in ("passed", "failed") for a in _audits(url))


def _serve(url: str, key: dict, n: int, temperature: float, provider_id: str) -> int:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key["api_key"], max_retries=0)
    served = 0
    for i in range(n):
        if _status(url)["trust"]["nodes"][provider_id]["ejected"]:
            break
        client.completions.create(model="tiny", prompt=f"Request {i}: tell me", max_tokens=24,
                                  temperature=temperature)
        served += 1
        _wait(lambda: _settled(url))
    return served


def test_honest_provider_passes_every_audit_and_verifier_is_paid(grid_factory) -> None:
    coord, key, nodes = grid_factory(TinyEngine("tiny"), TinyEngine("tiny"))
    served = _serve(coord.url, key, 6, 1.0, nodes["provider"])
    assert served == 6
    audits = [a for a in _audits(coord.url) if a["node_id"] == nodes["provider"]]
    assert len([a for a in audits if not a["canary"]]) == 6  # probation: every one
    assert all(a["state"] == "passed" for a in audits if not a["canary"]), audits
    st = _status(coord.url)
    me = st["trust"]["nodes"][nodes["provider"]]
    assert me["passed"] == 6 and me["failed"] == 0 and me["probation"] and not me["ejected"]
    assert st["trust"]["p_steady"] < 0.1
    assert st["balances"][ledger.stake_account(nodes["provider"], "cpu")] == STAKE
    assert st["balances"].get(ledger.provider_account(nodes["verifier"]), 0) > 0


@pytest.mark.parametrize("cheat,temperature", [
    ("a", 0.0), ("b", 0.0), ("c", 1.0), ("d", 1.0), ("e", 0.0), ("f", 1.0)])
def test_cheater_is_caught_slashed_and_ejected_within_ten_requests(grid_factory, cheat,
                                                                   temperature) -> None:
    coord, key, nodes = grid_factory(cheats.CHEATS[cheat]("tiny"), TinyEngine("tiny"))
    before = _status(coord.url)["balances"][ledger.consumer_account(key["key_id"])]
    served = _serve(coord.url, key, 10, temperature, nodes["provider"])
    st = _status(coord.url)
    me = st["trust"]["nodes"][nodes["provider"]]
    assert me["ejected"] and me["failed"] >= 1, me
    assert served <= 10
    assert st["balances"].get(ledger.stake_account(nodes["provider"], "cpu"), 0) == 0
    failed = [a for a in _audits(coord.url) if a["state"] == "failed" and not a["canary"]]
    assert failed and failed[0]["verdict"]["reasons"]
    # The consumer got the cheated request's charge back from the stake.
    entries = httpx.get(f"{coord.url}/api/v1/ledger", trust_env=False).json()["entries"]
    slashes = [e for e in entries if e["key"].startswith("slash:")]
    refunded = sum(p["amount"] for e in slashes for p in e["postings"]
                   if p["account"] == ledger.consumer_account(key["key_id"]))
    assert refunded > 0
    after = st["balances"][ledger.consumer_account(key["key_id"])]
    assert after > before - served * 24 * 4000  # paid less than it would without refunds


def test_lazy_verifier_is_caught_by_a_canary(grid_factory, monkeypatch) -> None:
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "1.0")
    coord, key, nodes = grid_factory(TinyEngine("tiny"), cheats.LazyVerifier("tiny"))
    _serve(coord.url, key, 1, 0.0, nodes["provider"])
    st = _status(coord.url)
    v = st["trust"]["nodes"][nodes["verifier"]]
    assert v["ejected"] and v["verifier_failed"] == 1
    assert st["balances"].get(ledger.stake_account(nodes["verifier"], "cpu"), 0) == 0
    # The honest provider is not flagged by the canary.
    assert st["trust"]["nodes"][nodes["provider"]]["failed"] == 0
