"""Hardware proofs on a real loopback grid: an honest CPU provider next to one cheat.

(g) claims an RTX-4090 on this CPU: its product is right but late for a 4090, so it is
demoted to what it proved and loses the RTX-4090 stake. (h) computes half the product, or
the whole product from bfloat16 inputs: the row openings catch it. The honest CPU provider
must pass every proof and keep its stake. Sizes are scaled down (IDLEGRID_HW_*), time is
the coordinator's own clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlegrid.agent.roles.hwprover import HonestProver
from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Posting
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
    wait_until,
)

STAKE = 5 * MICRO
JUDGED = ("passed", "failed", "late")  # a late proof's re-try is issued with its verdict
CPU = [{"model": "CPU", "count": 1, "vram_gb": 4.0}]


class Grid:
    def __init__(
        self,
        coord: CoordinatorThread,
        agents: dict[str, AgentThread],
        nodes: dict[str, str],
        api_key: str,
    ) -> None:
        self.coord, self.agents, self.nodes, self.api_key = coord, agents, nodes, api_key

    def get(self, path: str, **params: Any) -> Any:
        with httpx.Client(
            base_url=self.coord.url,
            trust_env=False,
            timeout=30,
            headers={"authorization": f"Bearer {self.api_key}"},
        ) as c:
            return c.get(path, params=params).json()

    def admin_get(self, path: str, **params: Any) -> Any:
        """GET with the operator key: proofs, every balance."""
        with self.coord.admin(timeout=30) as c:
            return c.get(path, params=params).json()

    def proofs(self, name: str) -> list[dict[str, Any]]:
        return self.admin_get("/api/v1/hwproofs", node=self.nodes[name])["proofs"]  # type: ignore[no-any-return]

    def judged(self, name: str) -> bool:
        ps = self.proofs(name)
        return len(ps) >= 2 and all(p["state"] in JUDGED for p in ps)

    def balance(self, acct: str) -> int:
        return int(self.admin_get("/api/v1/status")["balances"].get(acct, 0))

    def offers(self, name: str) -> list[dict[str, Any]]:
        return [
            o for o in self.get("/api/v1/offers")["offers"] if o["provider"] == self.nodes[name]
        ]


@pytest.fixture
def grid_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    for k, v in {
        "N_CPU": "512",
        "N_GPU": "3072",
        "RTT_S": "0.1",
        "MEM_CAP_MB": "8",
        "RECHECK_PER_HOUR": "0",
    }.items():
        monkeypatch.setenv(f"IDLEGRID_HW_{k}", v)
    started: list[Any] = []

    def start(cheat_devices: list[dict[str, Any]], cheat_prover: Any) -> Grid:
        settings = CoordinatorSettings(
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path}/c.db",
            port=free_port(),
            heartbeat_interval_s=0.2,
            node_timeout_s=30.0,
            long_poll_s=2.0,
            stake_per_device=STAKE,
        )
        coord = CoordinatorThread(settings)
        coord.start()
        started.append(coord)
        agents, nodes = {}, {}
        with coord.admin() as c:
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
        for name, devices, prover in (
            ("honest", CPU, None),
            ("cheat", cheat_devices, cheat_prover),
        ):
            agent = make_agent(
                coord.url,
                [FakeEngine("fake:1")],
                name,
                prover=prover,
                device_price_h=100_000,
                devices=devices,
            )
            nodes[name] = agent.client.key.node_id
            for d in devices:  # the stake for the claimed class, posted by the operator
                coord_store_post(coord, nodes[name], d["model"])
            agents[name] = AgentThread(agent)
            agents[name].start()
            started.append(agents[name])
            if name == "honest":
                # In one process the agents share one BLAS pool, which serialises their
                # products; on separate machines they would not wait for each other.
                wait_until(lambda: judged(nodes["honest"]), timeout_s=60)
        wait_for_live(coord.url, 2)
        g = Grid(coord, agents, nodes, key["api_key"])
        wait_until(lambda: g.judged("cheat"), timeout_s=90)
        return g

    def judged(node: str) -> bool:
        with started[0].admin() as c:
            ps = c.get("/api/v1/hwproofs", params={"node": node}).json()["proofs"]
        return len(ps) >= 2 and all(p["state"] in JUDGED for p in ps)

    def coord_store_post(coord: CoordinatorThread, node: str, cls: str) -> None:
        wait_until(lambda: hasattr(coord.app.state, "services"))
        acct = ledger.stake_account(node, cls)
        coord.app.state.services.store.post(
            ledger.make_entry(
                f"stake:{node}:{cls}",
                Cause("test", node),
                [Posting(ledger.ISSUER, -STAKE), Posting(acct, STAKE)],
            )
        )

    yield start
    for s in reversed(started):
        s.stop() if isinstance(s, CoordinatorThread) else s.stop(10)


def _honest_untouched(g: Grid) -> None:
    ps = g.proofs("honest")
    assert {p["kind"] for p in ps} == {"matmul", "memory"}
    assert all(p["state"] == "passed" for p in ps), [p["verdict"] for p in ps]
    assert g.balance(ledger.stake_account(g.nodes["honest"], "CPU")) == STAKE
    (offer,) = g.offers("honest")
    assert offer["device"] == "CPU" and offer["verified"] is True
    with g.coord.admin() as c:
        assert c.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}


def test_g_claimed_gpu_is_demoted_to_what_it_proved_and_slashed(grid_factory) -> None:
    g = grid_factory(cheats.CLAIMED_GPU, None)
    # Right but late: the first time is re-tried at no cost, the second counts.
    late, mm = sorted(
        (p for p in g.proofs("cheat") if p["kind"] == "matmul"),
        key=lambda p: p["state"] == "failed",
    )
    assert late["state"] == "late" and mm["reason"] == f"re-try of late {late['id']}"
    v = mm["verdict"]
    assert mm["state"] == "failed" and v["correct"] and not v["in_time"], v
    assert v["elapsed_s"] > v["budget_s"]
    assert v["proven_class"] == "CPU"
    assert g.balance(ledger.stake_account(g.nodes["cheat"], "RTX-4090")) == 0
    (offer,) = g.offers("cheat")
    assert offer["device"] == "CPU" and offer["verified"] is True  # what it did prove
    _honest_untouched(g)


class _LateOnce(HonestProver):
    """An honest prover whose first memory chase is held up (a busy machine): right, late."""

    def __init__(self) -> None:
        self.chases = 0

    def chase(self, buf: Any, chase_seed: bytes, spec: Any) -> Any:
        self.chases += 1
        if self.chases == 1:
            time.sleep(1.5)  # past the scaled-down budget: the point of this prover
        return super().chase(buf, chase_seed, spec)


def test_an_honest_prover_late_once_is_re_tried_and_keeps_its_stake(grid_factory) -> None:
    prover = _LateOnce()
    g = grid_factory(CPU, prover)
    mem = [p for p in g.proofs("cheat") if p["kind"] == "memory"]
    late = next(p for p in mem if p["state"] == "late")
    v = late["verdict"]
    assert v["wrong_samples"] == 0 and v["elapsed_s"] > v["budget_s"], v
    (retry,) = [p for p in mem if p is not late]
    assert retry["state"] == "passed" and retry["reason"] == f"re-try of late {late['id']}"
    assert prover.chases == 2
    # No slash, no demotion: the claim stands verified on the re-try.
    assert g.balance(ledger.stake_account(g.nodes["cheat"], "CPU")) == STAKE
    (offer,) = g.offers("cheat")
    assert offer["device"] == "CPU" and offer["verified"] is True
    _honest_untouched(g)


@pytest.mark.parametrize("prover", [cheats.PartialProver, cheats.LowPrecisionProver])
def test_h_partial_or_low_precision_product_is_caught_by_row_openings(grid_factory, prover) -> None:
    g = grid_factory(CPU, prover())
    mm = next(p for p in g.proofs("cheat") if p["kind"] == "matmul")
    assert mm["state"] == "failed" and not mm["verdict"]["correct"], mm
    assert any("error" in r for r in mm["verdict"]["reasons"])
    assert g.balance(ledger.stake_account(g.nodes["cheat"], "CPU")) == 0
    (offer,) = g.offers("cheat")
    assert offer["verified"] is False
    _honest_untouched(g)


def test_bad_proof_messages_get_precise_errors_and_move_no_credits(grid_factory) -> None:
    g = grid_factory(CPU, None)
    honest = g.agents["honest"].agent
    pid = g.proofs("honest")[0]["id"]
    other = g.proofs("cheat")[0]["id"]
    before = g.admin_get("/api/v1/status")["balances"]

    async def calls() -> list[int]:
        out = []
        client = type(honest.client)(g.coord.url, honest.client.key)
        try:
            for path, body in (
                (f"/api/v1/hwproofs/{pid}/start", {}),  # judged already
                (f"/api/v1/hwproofs/{other}/start", {}),  # not its own
                ("/api/v1/hwproofs/nope/open", {"openings": []}),
                (f"/api/v1/hwproofs/{pid}/commit", {"root": "zz"}),
                (f"/api/v1/hwproofs/{pid}/open", {"openings": "x"}),
            ):
                try:
                    await client.call(path, body)
                    out.append(200)
                except Exception as exc:  # the client maps statuses to typed errors
                    out.append(getattr(exc, "data", {}).get("status") or type(exc).__name__)
        finally:
            await client.close()
        return out

    got = asyncio.run(calls())
    assert got == ["Conflict", 404, 404, "InvalidRequest", "InvalidRequest"], got
    # An unsigned call is refused outright.
    r = httpx.post(f"{g.coord.url}/api/v1/hwproofs/{pid}/start", json={}, trust_env=False)
    assert r.status_code == 401
    assert g.admin_get("/api/v1/status")["balances"] == before


def test_nvidia_cc_attestation_is_accepted_as_extra_evidence_on_a_gpu() -> None:
    """GPU-only: a confidential-computing GPU attests with a nonce we chose."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU: NVIDIA attestation needs a CC-capable GPU")
    from idlegrid.agent.hardware import attestation

    evidence = attestation.collect(nonce=b"n" * 32)
    if evidence is None:
        pytest.skip("GPU present but not in confidential-computing mode")
    assert attestation.verify(evidence, nonce=b"n" * 32).nonce_match
