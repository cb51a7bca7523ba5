"""Audits on a real loopback grid: tiny engines, a verifier-mode agent, the openai client.

Each cheat runs as the only cheap provider next to an honest verifier (dearer, so requests
go to the cheater); probation audits every early request, so the cheater must be caught,
slashed and ejected within 10 requests, and the consumer refunded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from idlegrid.agent.node_client import NodeClient
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
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path}/c.db",
            port=free_port(),
            fee_bps=2000,
            heartbeat_interval_s=0.3,
            node_timeout_s=3.0,
            long_poll_s=2.0,
        )
        coord = CoordinatorThread(settings)
        coord.start()
        started.append(coord)
        provider = make_agent(
            coord.url, [provider_engine], "provider", price=Price(10 * MICRO, 40 * MICRO)
        )
        verifier = make_agent(
            coord.url,
            [verifier_engine],
            "verifier",
            verifier=True,
            price=Price(1000 * MICRO, 4000 * MICRO),
        )
        start.agents = {"provider": provider, "verifier": verifier}
        threads = [AgentThread(provider), AgentThread(verifier)]
        for t in threads:
            t.start()
            started.append(t)
        wait_for_live(coord.url, 2)
        store = coord.app.state.services.store
        with coord.admin() as c:
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 100 * MICRO, "reference": "m"},
            )
            nodes = {n["name"]: n["id"] for n in c.get("/api/v1/status").json()["nodes"]}
        for name in ("provider", "verifier"):
            acct = ledger.stake_account(nodes[name], "cpu")
            store.post(
                ledger.make_entry(
                    f"stake:{name}",
                    Cause("test", name),
                    [Posting(ledger.ISSUER, -STAKE), Posting(acct, STAKE)],
                )
            )
        return coord, key, nodes

    yield start
    for s in reversed(started):
        s.stop() if isinstance(s, CoordinatorThread) else s.stop(10)


def _status(coord: CoordinatorThread) -> dict:
    with coord.admin() as c:  # the operator's view: every balance too
        return c.get("/api/v1/status").json()


def _audits(coord: CoordinatorThread) -> list[dict]:
    with coord.admin() as c:
        return c.get("/api/v1/audits").json()["audits"]


def _settled(coord: CoordinatorThread) -> bool:
    return all(a["state"] in ("passed", "failed") for a in _audits(coord))


def _serve(
    coord: CoordinatorThread, key: dict, n: int, temperature: float, provider_id: str
) -> int:
    served = 0
    with openai.OpenAI(
        base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0
    ) as client:  # an unclosed client fails a later test with a ResourceWarning
        for i in range(n):
            if _status(coord)["trust"]["nodes"][provider_id]["ejected"]:
                break
            client.completions.create(
                model="tiny",
                prompt=f"Request {i}: tell me",
                max_tokens=24,
                temperature=temperature,
            )
            served += 1
            _wait(lambda: _settled(coord))
    return served


def test_honest_provider_passes_every_audit_and_verifier_is_paid(grid_factory) -> None:
    coord, key, nodes = grid_factory(TinyEngine("tiny"), TinyEngine("tiny"))
    served = _serve(coord, key, 6, 1.0, nodes["provider"])
    assert served == 6
    audits = [a for a in _audits(coord) if a["node_id"] == nodes["provider"]]
    assert len([a for a in audits if not a["canary"]]) == 6  # probation: every one
    assert all(a["state"] == "passed" for a in audits if not a["canary"]), audits
    st = _status(coord)
    me = st["trust"]["nodes"][nodes["provider"]]
    assert me["passed"] == 6 and me["failed"] == 0 and me["probation"] and not me["ejected"]
    assert st["trust"]["p_steady"] < 0.1
    assert st["balances"][ledger.stake_account(nodes["provider"], "cpu")] == STAKE
    assert st["balances"].get(ledger.provider_account(nodes["verifier"]), 0) > 0


@pytest.mark.parametrize(
    "cheat,temperature", [("a", 0.0), ("b", 0.0), ("c", 1.0), ("d", 1.0), ("e", 0.0), ("f", 1.0)]
)
def test_cheater_is_caught_slashed_and_ejected_within_ten_requests(
    grid_factory, cheat, temperature
) -> None:
    coord, key, nodes = grid_factory(cheats.CHEATS[cheat]("tiny"), TinyEngine("tiny"))
    before = _status(coord)["balances"][ledger.consumer_account(key["key_id"])]
    served = _serve(coord, key, 10, temperature, nodes["provider"])
    st = _status(coord)
    me = st["trust"]["nodes"][nodes["provider"]]
    assert me["ejected"] and me["failed"] >= 1, me
    assert served <= 10
    assert st["balances"].get(ledger.stake_account(nodes["provider"], "cpu"), 0) == 0
    failed = [a for a in _audits(coord) if a["state"] == "failed" and not a["canary"]]
    assert failed and failed[0]["verdict"]["reasons"]
    # The consumer got the cheated request's charge back from the stake.
    entries = httpx.get(
        f"{coord.url}/api/v1/ledger", trust_env=False, headers=coord.operator_headers
    ).json()["entries"]
    slashes = [e for e in entries if e["key"].startswith("slash:")]
    refunded = sum(
        p["amount"]
        for e in slashes
        for p in e["postings"]
        if p["account"] == ledger.consumer_account(key["key_id"])
    )
    assert refunded > 0
    after = st["balances"][ledger.consumer_account(key["key_id"])]
    assert after > before - served * 24 * 4000  # paid less than it would without refunds


def test_lazy_verifier_is_caught_by_a_canary(grid_factory, monkeypatch) -> None:
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "1.0")
    coord, key, nodes = grid_factory(TinyEngine("tiny"), cheats.LazyVerifier("tiny"))
    _serve(coord, key, 1, 0.0, nodes["provider"])
    st = _status(coord)
    v = st["trust"]["nodes"][nodes["verifier"]]
    assert v["ejected"] and v["verifier_failed"] == 1
    assert st["balances"].get(ledger.stake_account(nodes["verifier"], "cpu"), 0) == 0
    # The honest provider is not flagged by the canary.
    assert st["trust"]["nodes"][nodes["provider"]]["failed"] == 0


class _Build(TinyEngine):
    """The tiny engine as if compiled for another CPU variant: same numbers, other class.

    Its numbers match the verifier's exactly, so a judge across variants would pass it here;
    the test shows that none happens at all, as on llama.cpp where AVX2 and AVX-512 builds
    differ by 4-14 % and a cross-variant verdict would slash an honest provider.
    """

    def __init__(self, model_id: str, device: str) -> None:
        super().__init__(model_id)
        self._device = device

    def describe(self) -> dict:
        return {**super().describe(), "device": self._device}

    def det_class(self) -> str:
        d = self.describe()
        return f"{d['engine']}/{d['version']}/{d['dtype']}/{d['device']}/t{d['threads']}"


def test_no_audit_is_judged_across_cpu_variants(grid_factory) -> None:
    coord, key, nodes = grid_factory(
        _Build("tiny", "cpu-x86-64-v4"), _Build("tiny", "cpu-x86-64-v3")
    )
    with openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0) as client:
        for i in range(3):
            client.completions.create(
                model="tiny", prompt=f"Request {i}", max_tokens=8, temperature=1.0
            )

    def mine() -> list[dict]:  # canaries test verifiers, and fail by design: left out
        return [a for a in _audits(coord) if a["node_id"] == nodes["provider"] and not a["canary"]]

    _wait(lambda: len(mine()) == 3)  # probation audits every answer

    # Asked as the other-variant verifier, the coordinator has no audit to hand out.
    async def poll_as_verifier() -> dict | None:
        client = NodeClient(coord.url, grid_factory.agents["verifier"].client.key)
        try:
            return await client.call("/api/v1/audits/poll", {"models": ["tiny"]})
        finally:
            await client.close()

    assert asyncio.run(poll_as_verifier()) is None
    assert all(a["state"] == "pending" and a["verifier_id"] is None for a in mine()), mine()
    # A verifier of the provider's own variant takes them and passes them.
    same = make_agent(
        coord.url,
        [_Build("tiny", "cpu-x86-64-v4")],
        "verifier-v4",
        verifier=True,
        price=Price(1000 * MICRO, 4000 * MICRO),
    )
    t = AgentThread(same)
    t.start()
    try:
        _wait(lambda: all(a["state"] == "passed" for a in mine()), 60.0)
        v4 = next(n["id"] for n in _status(coord)["nodes"] if n["name"] == "verifier-v4")
        assert {a["verifier_id"] for a in mine()} == {v4}
    finally:
        t.stop(10)


def test_identical_seeded_requests_are_both_served_and_audited(grid_factory) -> None:
    """Two identical requests with one explicit seed commit to one digest; each answer still
    gets its own audit (ids per task and attempt), and neither finish fails."""
    coord, key, nodes = grid_factory(TinyEngine("tiny"), TinyEngine("tiny"))
    with openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0) as c:
        ask = {"model": "tiny", "prompt": "Same", "max_tokens": 12, "temperature": 1.0, "seed": 7}
        texts = [c.completions.create(**ask).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]
    _wait(lambda: _settled(coord) and len(_audits(coord)) >= 2)
    real = [a for a in _audits(coord) if a["node_id"] == nodes["provider"] and not a["canary"]]
    assert len(real) == 2 and len({a["id"] for a in real}) == 2  # probation: both audited
    assert len({a["task_id"] for a in real}) == 2
    assert all(a["state"] == "passed" for a in real), real
