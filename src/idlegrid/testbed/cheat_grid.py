"""Cheat classes of issue 15 on a real loopback grid with the default model: the cheating
engines (llama.cpp gemma3:270m, one thread), the grid set-up, the request loop and the
net-credit accounting; `bench/bench_cheat_classes.py` reports them and
`tests/integration/test_cheat_classes_llamacpp.py` asserts them.

Each scenario is a real coordinator (SQLite, default trust policy unless named below) and
unmodified agents, every node with the default 5-credit inference stake posted, the
consumer paying through the official `openai` client. The cheat is the cheapest provider
(routing sends it the work first) or a verifier with the larger stake (the draw picks it
first). Requests go one at a time (8 tokens, T = 1) until the cheater is ejected or stops
being routed, or `cap` requests. Net credits = the cheater's balances at the end (stake,
accrual, provider account) minus what it staked; "paid out" is what reached its provider
account, the only balance it can withdraw.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from sqlalchemy import select

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.db.tables import Attempt
from idlegrid.core.ledger import MICRO, Price
from idlegrid.core.trust import commitment as cm
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

CONTEXT = 256
STAKE = 5 * MICRO  # the default inference stake
CHEAP, DEAR = Price(10 * MICRO, 40 * MICRO), Price(20 * MICRO, 80 * MICRO)
JUDGED = ("passed", "failed", "overturned")


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


class CollusiveLlama(LlamaCppEngine):
    """A verifier in league with one provider (way 6): its partner shares every commitment
    it makes (`partner`, set by whoever runs the two), and the verifier approves anything
    of the partner's without computing, in audits and as a dispute panelist alike. Every
    other audit it recomputes honestly, so it earns its fees and no canary of an honest
    provider's answer catches it."""

    partner: Callable[[], Iterable[bytes]] = staticmethod(lambda: ())

    def audit(
        self,
        context_ids: Sequence[int],
        c: Any,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        constraint: Any = None,
    ) -> Any:
        """Echo a commitment of the partner's (a dispute's truncated one too); recompute
        the rest."""
        ours = {cm.decode(b).header.context_hash for b in self.partner()}
        if c.header.context_hash in ours:
            return cheats.LazyVerifier.audit(self, context_ids, c, max_new_tokens, stop)  # type: ignore[arg-type]
        return super().audit(context_ids, c, max_new_tokens, stop, constraint)


def llama(cls: type[LlamaCppEngine] = LlamaCppEngine) -> LlamaCppEngine:
    """The default model on one thread, as every node of a cheat grid runs it."""
    return cls(DEFAULT_MODEL, threads=1, context_length=CONTEXT)


@dataclass(frozen=True)
class Node:
    """One agent of a cheat grid: its engine (a class the grid loads and closes, or an
    engine the caller owns and may reuse across grids), price, role and stake."""

    name: str
    engine: type[LlamaCppEngine] | LlamaCppEngine
    price: Price
    verifier: bool = False
    stake: int = STAKE


@contextmanager
def _env(env: Mapping[str, str]) -> Iterator[None]:
    """Trust knobs are read from the environment when the coordinator's services start."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `cond` until it holds (True) or `timeout_s` passes (False)."""
    ev = threading.Event()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        ev.wait(0.1)
    return False


class CheatGrid:
    """A loopback coordinator and one llama.cpp agent per node, every node's stake posted
    by the agent itself from credits minted to it, and a funded API key."""

    def __init__(self, tmp: Path, nodes: Sequence[Node], env: Mapping[str, str]) -> None:
        self.nodes = list(nodes)
        settings = CoordinatorSettings(
            data_dir=tmp,
            database_url=f"sqlite:///{tmp}/c.db",
            port=free_port(),
            heartbeat_interval_s=0.5,
            node_timeout_s=10.0,
            hw_proofs=False,
            payout_delay_s=0.0,
            # The real rule, whatever the environment says (the test suite's default is no
            # stake): without it paid work is routed before the agents' stakes are posted,
            # and a verifier judged then has nothing to slash.
            inference_stake=STAKE,
        )
        with _env(env):
            self.coord = CoordinatorThread(settings)
            self.coord.start()
        self.url = self.coord.url
        self.http = self.coord.admin(timeout=60)
        self.agents: dict[str, AgentThread] = {}
        self.engines: list[LlamaCppEngine] = []
        self._owned_engines: list[LlamaCppEngine] = []
        try:
            for n in nodes:
                if isinstance(n.engine, type):
                    self._owned_engines.append(llama(n.engine))
                    self.engines.append(self._owned_engines[-1])
                else:
                    self.engines.append(n.engine)
        except BaseException:  # a model that fails to load leaves nothing running
            self.close()
            raise
        self.agents = {
            n.name: AgentThread(
                make_agent(
                    self.url,
                    [e],
                    n.name,
                    price=n.price,
                    verifier=n.verifier,
                    device_price_h=MICRO,
                    stake_per_device=n.stake,
                )
            )
            for e, n in zip(self.engines, nodes, strict=True)
        }
        self.ids: dict[str, str] = {}
        self.key: dict[str, Any] = {}

    def start(self) -> CheatGrid:
        """Start every agent, post every stake, fund a key; raises if any step stalls."""
        for a in self.agents.values():
            a.start()
        if not wait(lambda: len(self.status()["nodes"]) == len(self.nodes), 60):
            raise TimeoutError("the agents did not register")
        self.ids = {n["name"]: n["id"] for n in self.status()["nodes"]}
        for n in self.nodes:  # each agent posts its stake from these, as `idlegrid up`'s do
            node_id = self.ids[n.name]
            self.http.post(
                "/api/v1/admin/mint",
                json={"node_id": node_id, "amount": n.stake, "reference": f"fund:{node_id}"},
            ).raise_for_status()
        market = self.coord.app.state.services.market
        if not wait(lambda: set(self.ids.values()) <= set(market.inference_staked), 60):
            raise TimeoutError("the stakes were not posted")
        self.key = self.http.post("/api/v1/admin/keys", json={"name": "cheats"}).json()
        self.http.post(
            "/api/v1/admin/mint",
            json={"key_id": self.key["key_id"], "amount": 1000 * MICRO, "reference": "m"},
        ).raise_for_status()
        return self

    def close(self) -> None:
        """Stop the agents and the coordinator; close the engines the grid loaded."""
        self.http.close()
        for a in self.agents.values():
            if a.thread is not None and a.thread.is_alive():
                a.stop(30)
        self.coord.stop()
        for e in self._owned_engines:
            e.close()

    def __enter__(self) -> CheatGrid:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> Any:
        """The coordinator's store (ledger checks, attempts)."""
        return self.coord.app.state.services.store

    def status(self) -> dict[str, Any]:
        """The operator's `/api/v1/status`."""
        out: dict[str, Any] = self.http.get("/api/v1/status").json()
        return out

    def record(self, name: str) -> dict[str, Any]:
        """The node's line in the status's trust section."""
        rec: dict[str, Any] = self.status()["trust"]["nodes"].get(self.ids[name], {})
        return rec

    def audits(self) -> list[dict[str, Any]]:
        """Every audit, canaries included (operator view)."""
        out: list[dict[str, Any]] = self.http.get("/api/v1/audits").json()["audits"]
        return out

    def entries(self) -> list[dict[str, Any]]:
        """The ledger's entries."""
        out: list[dict[str, Any]] = self.http.get("/api/v1/ledger").json()["entries"]
        return out

    def holdings(self, name: str) -> dict[str, int]:
        """The node's accounts (stakes, accrual, provider account) and their balances."""
        me = self.ids[name]
        return {a: v for a, v in self.status()["balances"].items() if me in a.split(":")}

    def losses(self, names: Iterable[str]) -> dict[str, int]:
        """Of these nodes, each one whose holdings fell below what it staked: by how much."""
        out = {}
        stakes = {n.name: n.stake for n in self.nodes}
        for name in names:
            held = sum(self.holdings(name).values())
            if held < stakes[name]:
                out[name] = stakes[name] - held
        return out

    def attempts_by(self, name: str) -> int:
        """Attempts the node delivered tokens in."""
        with self.store.read() as s:
            return len(
                s.scalars(
                    select(Attempt).where(
                        Attempt.node_id == self.ids[name], Attempt.output_tokens > 0
                    )
                ).all()
            )

    def signed(self, name: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """A request signed with node `name`'s key, as its agent would send it."""
        key = self.agents[name].agent.client.key
        raw = json.dumps(body).encode()
        return self.http.post(
            path, content=raw, headers=key.sign_headers("POST", path, raw, now=time.time())
        )

    def collude(self, verifier: str, provider: str) -> None:
        """Make `verifier` (a CollusiveLlama) the partner of `provider`, whose agent shares
        every commitment it keeps."""
        engine = self.engines[[n.name for n in self.nodes].index(verifier)]
        assert isinstance(engine, CollusiveLlama), engine
        kept = self.agents[provider].agent.ctx.commitments
        engine.partner = lambda: tuple(kept.values())

    def dispute(self, provider: str, audit_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """`provider` disputes its failed audit, as `idlegrid dispute` would; the dispute
        once it is ruled (TimeoutError if it is not within `timeout_s`)."""
        r = self.signed(
            provider,
            "/api/v1/disputes",
            {"kind": "inference", "audit_id": audit_id, "reason": "ask my friend"},
        )
        r.raise_for_status()
        did = r.json()["id"]

        def ruled() -> dict[str, Any] | None:
            for d in self.http.get("/api/v1/disputes").json()["disputes"]:
                if d["id"] == did and d["state"] in ("won", "lost"):
                    out: dict[str, Any] = d
                    return out
            return None

        if not wait(lambda: ruled() is not None, timeout_s):
            raise TimeoutError(f"dispute {did} was not ruled in {timeout_s:g} s")
        d = ruled()
        assert d is not None
        return d

    def serve(
        self,
        cap: int,
        stop: Callable[[], bool] = lambda: False,
        audited: bool = True,
        timeout_s: float = 60.0,
    ) -> tuple[int, int]:
        """Up to `cap` requests one at a time, until `stop()`; with `audited`, each waits
        until its answer's audits exist and are judged. (sent, refused)"""
        sent = refused = 0
        with openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.key["api_key"], max_retries=0
        ) as client:
            for i in range(cap):
                if stop():
                    break
                before = {a["id"] for a in self.audits()}
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
                    sent += 1
                    continue
                sent += 1
                if audited:
                    wait(lambda b=before: self._judged_since(b), timeout_s)  # type: ignore[misc]
        return sent, refused

    def _judged_since(self, before: set[str]) -> bool:
        """An audit of the answer exists, and it and its canaries are judged (older audits
        nobody can take, e.g. of an unverifiable provider, are not waited for)."""
        new = [a for a in self.audits() if a["id"] not in before]
        return any(not a["canary"] for a in new) and all(a["state"] in JUDGED for a in new)


@dataclass(frozen=True)
class Scenario:
    """Trust knobs, the nodes, the cheater, and its colluding verifier if it has one."""

    env: dict[str, str]
    nodes: list[Node]
    cheater: str
    partner: str | None = None


SCENARIOS: dict[str, Scenario] = {
    "invented": Scenario(
        {},
        [Node("cheater", cheats.LlamaInvented, CHEAP), Node("honest", LlamaCppEngine, DEAR, True)],
        "cheater",
    ),
    "seed-ignoring": Scenario(
        {},
        [
            Node("cheater", cheats.LlamaSeedIgnoring, CHEAP),
            Node("honest", LlamaCppEngine, DEAR, True),
        ],
        "cheater",
    ),
    "unverifiable": Scenario(
        {"IDLEGRID_TRUST_PROBATION_BUDGET_UCR": "2000"},
        [Node("cheater", Homebrew, CHEAP), Node("honest", LlamaCppEngine, DEAR, True)],
        "cheater",
    ),
    "lazy": Scenario(
        {"IDLEGRID_TRUST_CANARY_RATE": "0.1", "IDLEGRID_TRUST_FULL_AUDITS": "100000"},
        [Node("provider", LlamaCppEngine, CHEAP), Node("cheater", LazyLlama, DEAR, True)],
        "cheater",
    ),
    "holding": Scenario(
        {"IDLEGRID_TRUST_AUDIT_EXPIRY_S": "3", "IDLEGRID_TRUST_FULL_AUDITS": "100000"},
        [
            Node("provider", LlamaCppEngine, CHEAP),
            Node("cheater", HoldingLlama, DEAR, True),
            Node("honest", LlamaCppEngine, DEAR, True),
        ],
        "cheater",
    ),
    # An inventing provider whose partner verifier (half the verifier stake) approves its
    # answers and sits on the panel of its dispute; canaries off, so only the draw and the
    # panel stand in its way.
    "collusion": Scenario(
        {"IDLEGRID_TRUST_CANARY_RATE": "0"},
        [
            Node("cheater", cheats.LlamaInvented, CHEAP),
            Node("colluder", CollusiveLlama, DEAR, True, stake=3 * STAKE),
            *(Node(f"h{i}", LlamaCppEngine, DEAR, True) for i in range(3)),
        ],
        "cheater",
        partner="colluder",
    ),
}


def stopped_earning(g: CheatGrid, cheater: str) -> bool:
    """Ejected, or no more paid work routed to it (its probation budget is spent)."""
    rec = g.record(cheater)
    return bool(rec.get("ejected")) or rec.get("probation_budget_left") == 0


def outcome(
    g: CheatGrid, cheater: str, sent: int, refused: int, partner: str | None = None
) -> dict[str, Any]:
    """The cheater's work, record and net credits after paying out whatever is payable,
    and every honest node's losses (all but the cheater and its partner)."""
    stake = next(n.stake for n in g.nodes if n.name == cheater)
    verifier = next(n.verifier for n in g.nodes if n.name == cheater)
    me = g.ids[cheater]
    work = (
        sum(1 for a in g.audits() if a["verifier_id"] == me) if verifier else g.attempts_by(cheater)
    )
    g.http.post("/api/v1/admin/payouts").raise_for_status()  # whatever is payable, now
    mine = g.holdings(cheater)
    rec = g.record(cheater)
    return {
        "requests": sent,
        "refused": refused,
        "cheater work": work,
        "ejected": bool(rec.get("ejected")),
        "record": rec,
        "net": sum(mine.values()) - stake,
        "paid out": sum(v for a, v in mine.items() if a.startswith("provider:")),
        "held accrual": rec.get("held_accrual"),
        "honest losses": g.losses(n.name for n in g.nodes if n.name not in (cheater, partner)),
        "ledger ok": g.store.verify_ledger() == [],
    }


def run(name: str, cap: int) -> dict[str, Any]:
    """One scenario: serve until the cheater stops earning, then count; a cheater with a
    partner disputes its failed audit first."""
    sc = SCENARIOS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"cheat-{name}-"))
    with CheatGrid(tmp, sc.nodes, sc.env) as g:
        if sc.partner is not None:
            g.collude(sc.partner, sc.cheater)
        # Nobody can audit an unverifiable class: there is no verdict to wait for.
        sent, refused = g.serve(
            cap, lambda: stopped_earning(g, sc.cheater), audited=name != "unverifiable"
        )
        extra: dict[str, Any] = {}
        if sc.partner is not None:
            me = g.ids[sc.cheater]
            mine = [a for a in g.audits() if a["node_id"] == me and not a["canary"]]
            partner = g.ids[sc.partner]
            extra["partner audits"] = sum(a["verifier_id"] == partner for a in mine)
            failed = [a for a in mine if a["state"] == "failed"]
            if failed:
                d = g.dispute(sc.cheater, failed[0]["id"])
                names = {i: n for n, i in g.ids.items()}
                extra["dispute"] = {
                    "state": d["state"],
                    "votes": {names[p]: v for p, v in d["votes"].items()},
                }
        return {"scenario": name, **outcome(g, sc.cheater, sent, refused, sc.partner), **extra}
