"""Who audits whom, on a real loopback grid (tiny engines, unmodified agents, cheats plugged
in as verifier engines): colluders cannot steer their partner's audits, a verifier that
approves what its partner shared is caught by a task canary, a verifier that takes audits
and never reports loses stake and is skipped, and nobody audits a provider on its own
network."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from idlegrid.agent.node_client import NodeClient
from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.trust.tables import TrustAudit, TrustCommitment
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Posting, Price
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import selection
from idlegrid.engines.base import Generation, SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment, recompute
from idlegrid.engines.tiny import TinyEngine
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

CHEAP, DEAR = Price(10 * MICRO, 40 * MICRO), Price(1000 * MICRO, 4000 * MICRO)


def wait_until(cond: Any, timeout_s: float = 60.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


class Grid:
    """A coordinator and named agents, each with a stake posted by the issuer."""

    def __init__(self, tmp: Path, agents: dict[str, tuple[Any, Price, bool, int]]) -> None:
        settings = CoordinatorSettings(
            data_dir=tmp,
            database_url=f"sqlite:///{tmp}/c.db",
            port=free_port(),
            fee_bps=2000,
            heartbeat_interval_s=0.3,
            node_timeout_s=3.0,
            long_poll_s=2.0,
        )
        self.coord = CoordinatorThread(settings)
        self.coord.start()
        self.threads: list[AgentThread] = []
        self.agents = {}
        for name, (engine, price, verifier, _) in agents.items():
            a = make_agent(self.coord.url, [engine], name, price=price, verifier=verifier)
            self.agents[name] = a
            t = AgentThread(a)
            t.start()
            self.threads.append(t)
        wait_for_live(self.coord.url, len(agents))
        self.store = self.coord.app.state.services.store
        with self.coord.admin() as c:
            self.key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": self.key["key_id"], "amount": 1000 * MICRO, "reference": "m"},
            )
            self.ids = {n["name"]: n["id"] for n in c.get("/api/v1/status").json()["nodes"]}
        for name, (*_, stake) in agents.items():
            if stake:
                acct = ledger.stake_account(self.ids[name], "cpu")
                self.store.post(
                    ledger.make_entry(
                        f"stake:{name}",
                        Cause("test", name),
                        [Posting(ledger.ISSUER, -stake), Posting(acct, stake)],
                    )
                )

    def stop(self) -> None:
        for t in reversed(self.threads):
            t.stop(10)
        self.coord.stop()

    def status(self) -> dict:
        with self.coord.admin() as c:
            return c.get("/api/v1/status").json()

    def audits(self) -> list[dict]:
        with self.coord.admin() as c:
            return c.get("/api/v1/audits").json()["audits"]

    def stake(self, name: str) -> int:
        return self.status()["balances"].get(ledger.stake_account(self.ids[name], "cpu"), 0)

    def serve(self, n: int, stop: Any = None) -> int:
        with openai.OpenAI(
            base_url=f"{self.coord.url}/v1", api_key=self.key["api_key"], max_retries=0
        ) as client:
            for i in range(n):
                if stop is not None and stop():
                    return i
                client.completions.create(
                    model="tiny", prompt=f"Request {i}: tell me", max_tokens=16, temperature=1.0
                )
                wait_until(lambda: all(a["state"] in ("passed", "failed") for a in self.audits()))
        return n


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[Any]:
    made: list[Grid] = []

    def start(agents: dict[str, tuple[Any, Price, bool, int]]) -> Grid:
        g = Grid(tmp_path, agents)
        made.append(g)
        return g

    yield start
    for g in made:
        g.stop()


def test_colluders_get_their_stake_share_of_their_partners_audits(grid, monkeypatch) -> None:
    """col-a serves; col-b (its partner, a lazy verifier that approves whatever it gets)
    and an honest verifier with three times col-b's stake audit. First-come claims gave the
    partner 9 of 10 audits; the stake-weighted draw gives it about a quarter."""
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRUST_FULL_AUDITS", "1000")  # every answer audited
    g = grid(
        {
            "col-a": (TinyEngine("tiny"), CHEAP, True, 50 * MICRO),
            "col-b": (cheats.LazyVerifier("tiny"), DEAR, True, 50 * MICRO),
            "honest": (TinyEngine("tiny"), DEAR, True, 150 * MICRO),
        }
    )
    n = 24
    assert g.serve(n) == n
    mine = [a for a in g.audits() if a["node_id"] == g.ids["col-a"]]
    assert len(mine) == n and all(a["id"].startswith("aud-") for a in mine)
    by = {name: sum(a["verifier_id"] == g.ids[name] for a in mine) for name in g.ids}
    share = by["col-b"] / n
    print(f"partner's share of col-a's audits: {by['col-b']}/{n} = {share:.2f} (stake 0.25)")
    assert by["col-a"] == 0 and by["col-b"] + by["honest"] == n
    assert share <= 0.55, by  # P(Binomial(24, 0.25) >= 14) < 0.001
    assert g.store.verify_ledger() == []
    assert g.stake("honest") == 150 * MICRO


class SharingLazyVerifier(TinyEngine):
    """A verifier its provider shares every commitment with: it approves (echoes) whatever
    matches a shared commitment without computing, and recomputes anything else. Spots every
    "values" canary; the "task" canaries keep the provider's blob and catch it."""

    shared: Any = None  # () -> set of the provider's commitment blobs

    def audit(
        self, context_ids: Sequence[int], c: Any, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> Any:
        """Echo a shared commitment's numbers; recompute the rest."""
        if c.encode() in type(self).shared():
            return cheats.LazyVerifier.audit(self, context_ids, c, max_new_tokens, stop)  # type: ignore[arg-type]
        return super().audit(context_ids, c, max_new_tokens, stop)


def test_verifier_that_trusts_its_partners_commitments_is_caught_by_a_canary(
    grid, monkeypatch
) -> None:
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "1.0")
    g: Grid | None = None

    def shared() -> set[bytes]:
        assert g is not None
        with g.store.read() as s:
            return set(s.scalars(select(TrustCommitment.blob)))

    SharingLazyVerifier.shared = staticmethod(shared)
    g = grid(
        {
            "provider": (TinyEngine("tiny"), CHEAP, False, 50 * MICRO),
            "friend": (SharingLazyVerifier("tiny"), DEAR, True, 50 * MICRO),
        }
    )
    friend = g.ids["friend"]
    g.serve(12, stop=lambda: g.status()["trust"]["nodes"][friend]["ejected"])
    st = g.status()
    v = st["trust"]["nodes"][friend]
    assert v["ejected"] and v["verifier_failed"] == 1, v
    assert g.stake("friend") == 0
    canaries = [a for a in g.audits() if a["canary"]]
    assert all(a["id"].startswith("aud-") for a in canaries)
    # The canary it approved carried the provider's own commitment, byte for byte.
    approved = next(a for a in canaries if a["state"] == "passed")
    with g.store.read() as s:
        com = s.get(TrustCommitment, (approved["task_id"], approved["attempt"]))
        assert s.get(TrustAudit, approved["id"]).blob == com.blob
    # The values canaries it recognised were rejected, and the honest provider lost nothing.
    assert st["trust"]["nodes"][g.ids["provider"]]["failed"] == 0
    assert g.stake("provider") == 50 * MICRO
    assert g.store.verify_ledger() == []


class Holder(TinyEngine):
    """Takes audits and never reports (its recomputation always dies)."""

    def audit(self, *args: Any, **kw: Any) -> Any:
        """Never a report."""
        raise RuntimeError("holding")


def test_verifier_that_holds_audits_loses_stake_and_is_skipped(grid, monkeypatch) -> None:
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRUST_AUDIT_EXPIRY_S", "1.5")
    stake = 100 * MICRO
    g = grid(
        {
            "provider": (TinyEngine("tiny"), CHEAP, False, 50 * MICRO),
            # 100 times the honest verifier's stake: it is drawn first, almost surely
            "holder": (Holder("tiny"), DEAR, True, stake),
            "honest": (TinyEngine("tiny"), DEAR, True, MICRO),
        }
    )
    assert g.serve(4) == 4  # every audit ends judged: the lapsed ones by the honest verifier
    st = g.status()
    h = st["trust"]["nodes"][g.ids["holder"]]
    lapses = h["verifier_expired"]
    assert lapses >= 1, h
    # 5 % of its stake per lapse, burned, each entry naming the audit that lapsed
    left = stake
    for _ in range(lapses):
        left -= selection.hold_slash(left, 500)
    assert g.stake("holder") == left
    with g.coord.admin() as c:
        ents = c.get("/api/v1/ledger").json()["entries"]
    assert len([e for e in ents if e["key"].startswith("lapse-slash:")]) == lapses
    # Skipped after its lapse: every audit was done by the honest verifier.
    mine = [a for a in g.audits() if a["node_id"] == g.ids["provider"]]
    assert {a["verifier_id"] for a in mine} == {g.ids["honest"]}
    assert all(a["state"] == "passed" for a in mine)
    assert g.stake("honest") == MICRO and g.stake("provider") == 50 * MICRO
    assert g.store.verify_ledger() == []


def test_no_verifier_audits_a_provider_on_its_own_network(grid, monkeypatch) -> None:
    """Every node here connects from 127.0.0.1: with loopback not exempt, one network."""
    monkeypatch.setenv("IDLEGRID_TRUST_EXEMPT_LOOPBACK", "0")
    g = grid(
        {
            "provider": (TinyEngine("tiny"), CHEAP, False, 50 * MICRO),
            "neighbour": (TinyEngine("tiny"), DEAR, True, 50 * MICRO),
        }
    )
    with openai.OpenAI(
        base_url=f"{g.coord.url}/v1", api_key=g.key["api_key"], max_retries=0
    ) as client:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0)
    wait_until(lambda: any(a["node_id"] == g.ids["provider"] for a in g.audits()))

    async def poll() -> dict | None:
        nc = NodeClient(g.coord.url, g.agents["neighbour"].client.key)
        try:
            return await nc.call("/api/v1/audits/poll", {"models": ["tiny"]})
        finally:
            await nc.close()

    assert asyncio.run(poll()) is None
    assert all(a["state"] == "pending" and a["verifier_id"] is None for a in g.audits())


def test_task_canary_makes_an_honest_recomputation_fail() -> None:
    """The provider's honest commitment, re-checked on the perturbed prompt, fails the
    judge (its context hash and numbers differ); on the real prompt it passes."""
    eng = TinyEngine("tiny")
    prompt = "Request 7: tell me"
    ids = eng.tokenize(prompt)
    rec, res = Recorder(), Generation()
    eng.recorder = rec  # type: ignore[attr-defined]
    for _ in stream_pieces(eng, ids, SamplingParams(1.0, 1.0, 5), max_tokens=12, result=res):
        pass
    eng.recorder = None  # type: ignore[attr-defined]
    c = cm.decode(build_commitment(eng, "tiny", ids, rec, 5, 1.0, 1.0, res.finish_reason).encode())
    tol = cm.Tolerance(rel=2e-5, rank_slack=2e-5, margin=1e-3)
    assert cm.judge(c, recompute(eng, ids, c, 12), tol, 12).passed
    bad = selection.perturb_text(prompt, b"s" * 32, b"d" * 32)
    v = cm.judge(c, recompute(eng, eng.tokenize(bad), c, 12), tol, 12)
    assert not v.passed and any("context hash" in r for r in v.reasons)
