"""Cheat classes of issue 15 on a real loopback grid with the default model: the cheating
engines (llama.cpp gemma3:270m, one thread), the grid set-up, the request loop and the
net-credit accounting that `bench/bench_cheat_classes.py` reports.

Each scenario is a real coordinator (SQLite, default trust policy unless named below) and
unmodified agents, every node with the default 5-credit inference stake posted, the
consumer paying through the official `openai` client. The cheat is the cheapest provider
(routing sends it the work first) or a verifier with the larger stake (the draw picks it
first). Requests go one at a time (8 tokens, T = 1) until the cheater is ejected or stops
being routed, or `cap` requests. Net credits = the cheater's balances at the end (stake,
accrual, provider account) minus the 5 staked; "paid out" is what reached its provider
account, the only balance it can withdraw.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openai
from sqlalchemy import select

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.db.tables import Attempt
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

CONTEXT = 256
STAKE = 5 * MICRO  # the default inference stake
CHEAP, DEAR = Price(10 * MICRO, 40 * MICRO), Price(20 * MICRO, 80 * MICRO)


class Homebrew(LlamaCppEngine):
    """Honest numbers under an engine name that no verifier on the grid runs (way 2)."""

    def describe(self) -> dict[str, Any]:
        """As llama.cpp's, renamed."""
        return {**super().describe(), "engine": "homebrew"}


class LazyLlama(LlamaCppEngine):
    """A verifier that approves everything: the commitment's own numbers, nothing computed."""

    def audit(
        self,
        context_ids: Sequence[int],
        c: Any,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        constraint: Any = None,
    ) -> Any:
        """A report echoing the commitment."""
        return cheats.LazyVerifier.audit(self, context_ids, c, max_new_tokens, stop)  # type: ignore[arg-type]


class HoldingLlama(LlamaCppEngine):
    """A verifier that takes audits and never reports (its recomputation always dies)."""

    def audit(self, *args: Any, **kw: Any) -> Any:
        """Never a report."""
        raise RuntimeError("holding")


def _llama(cls: type[LlamaCppEngine]) -> LlamaCppEngine:
    return cls(DEFAULT_MODEL, threads=1, context_length=CONTEXT)


# name -> (env, [(node, engine class, price, verifier)], the cheater's node)
SCENARIOS: dict[str, tuple[dict[str, str], list[tuple[str, type, Price, bool]], str]] = {
    "invented": (
        {},
        [("cheater", cheats.LlamaInvented, CHEAP, False), ("honest", LlamaCppEngine, DEAR, True)],
        "cheater",
    ),
    "seed-ignoring": (
        {},
        [
            ("cheater", cheats.LlamaSeedIgnoring, CHEAP, False),
            ("honest", LlamaCppEngine, DEAR, True),
        ],
        "cheater",
    ),
    "unverifiable": (
        {"IDLEGRID_TRUST_PROBATION_BUDGET_UCR": "2000"},
        [("cheater", Homebrew, CHEAP, False), ("honest", LlamaCppEngine, DEAR, True)],
        "cheater",
    ),
    "lazy": (
        {"IDLEGRID_TRUST_CANARY_RATE": "0.1", "IDLEGRID_TRUST_FULL_AUDITS": "100000"},
        [("provider", LlamaCppEngine, CHEAP, False), ("cheater", LazyLlama, DEAR, True)],
        "cheater",
    ),
    "holding": (
        {"IDLEGRID_TRUST_AUDIT_EXPIRY_S": "3", "IDLEGRID_TRUST_FULL_AUDITS": "100000"},
        [
            ("provider", LlamaCppEngine, CHEAP, False),
            ("cheater", HoldingLlama, DEAR, True),
            ("honest", LlamaCppEngine, DEAR, True),
        ],
        "cheater",
    ),
}


def _wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    ev = threading.Event()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        ev.wait(0.2)
    return False


def run(name: str, cap: int) -> dict[str, Any]:
    """One scenario: serve until the cheater stops earning, then count."""
    env, roster, cheater = SCENARIOS[name]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tmp = Path(tempfile.mkdtemp(prefix=f"cheat-{name}-"))
    settings = CoordinatorSettings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.5,
        node_timeout_s=10.0,
        hw_proofs=False,
        payout_delay_s=0.0,
    )
    coord = CoordinatorThread(settings)
    coord.start()
    engines = [_llama(cls) for _, cls, _, _ in roster]
    agents = [
        AgentThread(
            make_agent(
                coord.url,
                [e],
                node,
                price=price,
                verifier=verifier,
                device_price_h=MICRO,
                stake_per_device=STAKE,
            )
        )
        for e, (node, _, price, verifier) in zip(engines, roster, strict=True)
    ]
    http = coord.admin(timeout=60)
    try:
        for a in agents:
            a.start()
        _wait(lambda: len(http.get("/api/v1/status").json()["nodes"]) == len(roster), 60)
        ids = {n["name"]: n["id"] for n in http.get("/api/v1/status").json()["nodes"]}
        store = coord.app.state.services.store
        for node_id in ids.values():  # each agent posts it from these, as `idlegrid up`'s do
            http.post(
                "/api/v1/admin/mint",
                json={"node_id": node_id, "amount": STAKE, "reference": f"fund:{node_id}"},
            ).raise_for_status()
        market = coord.app.state.services.market
        assert _wait(lambda: set(ids.values()) <= set(market.inference_staked), 60), "no stake"

        def status() -> dict[str, Any]:
            out: dict[str, Any] = http.get("/api/v1/status").json()
            return out

        key = http.post("/api/v1/admin/keys", json={"name": "bench"}).json()
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 1000 * MICRO, "reference": "m"},
        )
        me = ids[cheater]

        def record() -> dict[str, Any]:
            rec: dict[str, Any] = status()["trust"]["nodes"].get(me, {})
            return rec

        served = refused = 0
        with openai.OpenAI(
            base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0
        ) as client:
            for i in range(cap):
                rec = record()
                if rec.get("ejected") or rec.get("probation_budget_left") == 0:
                    break  # it stopped earning: ejected, or no more paid work routed to it
                try:
                    client.completions.create(
                        model=DEFAULT_MODEL,
                        prompt=f"Request {i}: the weather today is",
                        max_tokens=8,
                        temperature=1.0,
                        seed=i,
                    )
                except openai.APIStatusError:
                    refused += 1  # nobody left to serve it (e.g. the probation budget)
                served = i + 1
                if name == "unverifiable":
                    continue  # nobody can audit its class: there is no verdict to wait for
                _wait(
                    lambda: all(
                        a["state"] in ("passed", "failed")
                        for a in http.get("/api/v1/audits").json()["audits"]
                    ),
                    60,
                )
        with store.read() as s:
            by_cheater = len(
                s.scalars(
                    select(Attempt).where(Attempt.node_id == me, Attempt.output_tokens > 0)
                ).all()
            )
        audits = http.get("/api/v1/audits").json()["audits"]
        if name in ("lazy", "holding"):
            by_cheater = sum(1 for a in audits if a["verifier_id"] == me)
        http.post("/api/v1/admin/payouts").raise_for_status()  # whatever is payable, now
        st = status()
        bal = st["balances"]
        mine = {a: v for a, v in bal.items() if me in a}
        honest_loss = {
            n: STAKE - sum(v for a, v in bal.items() if i in a)
            for n, i in ids.items()
            if n != cheater and sum(v for a, v in bal.items() if i in a) < STAKE
        }
        return {
            "scenario": name,
            "requests": served,
            "refused": refused,
            "cheater work": by_cheater,
            "ejected": bool(record().get("ejected")),
            "record": record(),
            "net": sum(mine.values()) - STAKE,
            "paid out": sum(v for a, v in mine.items() if a.startswith("provider:")),
            "held accrual": record().get("held_accrual"),
            "honest losses": honest_loss,
            "ledger ok": store.verify_ledger() == [],
        }
    finally:
        http.close()
        for a in agents:
            a.stop(30)
        coord.stop()
        for e in engines:
            e.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
