"""Issue 15's cheat classes on real loopback grids with the default model (llama.cpp
gemma3:270m Q4_K_M, one thread per node): unmodified agents, each cheat plugged in as the
engine of a provider or of a verifier (`testbed/cheat_grid.py`), every node staked the
default 5 credits, the consumer paying through the official `openai` client.

One test per way: (2) an engine name nobody verifies, (5) a lazy verifier, (6) a provider
and its colluding verifier, (7) a verifier holding audits, (8) a provider inventing tokens
in probation. Each ends with the cheater not paid, slashed or ejected, no honest provider or
verifier holding less than it staked, and the ledger verifying. Ways 1, 3 and 4 (what is
paid) are `test_pay_llamacpp.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from idlegrid.core import ledger
from idlegrid.core.trust import selection
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.testbed import cheats
from idlegrid.testbed.cheat_grid import (
    CHEAP,
    DEAR,
    STAKE,
    CheatGrid,
    CollusiveLlama,
    HoldingLlama,
    Homebrew,
    LazyLlama,
    Node,
    llama,
    wait,
)

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def honest() -> Iterator[list[LlamaCppEngine]]:
    """Three honest engines, loaded once for the module (one grid at a time uses them)."""
    engines = [llama() for _ in range(3)]
    yield engines
    for e in engines:
        e.close()


def _ejected(g: CheatGrid, name: str) -> bool:
    return bool(g.record(name).get("ejected"))


def _honest_whole(g: CheatGrid, *cheaters: str) -> None:
    """No honest node holds less than it staked, nobody honest is flagged, the books hold."""
    others = [n.name for n in g.nodes if n.name not in cheaters]
    assert g.losses(others) == {}
    for name in others:
        rec = g.record(name)
        assert not rec.get("ejected") and rec.get("failed", 0) == 0, (name, rec)
        assert rec.get("verifier_failed", 0) == 0 and rec.get("verifier_expired", 0) == 0
    assert g.store.verify_ledger() == []


def _stakes(g: CheatGrid, name: str) -> int:
    return sum(v for a, v in g.holdings(name).items() if a.startswith("stake:"))


def _paid_out(g: CheatGrid, name: str) -> int:
    """What reached the node's withdrawable account after a payout of everything payable."""
    g.http.post("/api/v1/admin/payouts").raise_for_status()
    return g.holdings(name).get(ledger.provider_account(g.ids[name]), 0)


def test_way2_an_engine_nobody_verifies_is_held_and_stops_being_routed(
    tmp_path: Path, honest: list[LlamaCppEngine]
) -> None:
    nodes = [
        Node("cheater", Homebrew, CHEAP),
        Node("honest", honest[0], DEAR, verifier=True),
        Node("honest2", honest[1], DEAR, verifier=True),
    ]
    with CheatGrid(tmp_path, nodes, {"IDLEGRID_TRUST_PROBATION_BUDGET_UCR": "1000"}) as g:
        rec = g.record("cheater")
        assert rec["det_class"].startswith("homebrew/") and rec["verifiable"] is False
        spent = lambda: g.record("cheater")["probation_budget_left"] == 0  # noqa: E731
        sent, refused = g.serve(8, stop=spent, audited=False)
        assert spent() and refused == 0 and sent < 8, (sent, g.record("cheater"))
        served = g.attempts_by("cheater")
        assert served == sent
        rec = g.record("cheater")
        accrual = g.holdings("cheater")[ledger.accrual_account(g.ids["cheater"])]
        assert rec["verifiable"] is False and rec["held_accrual"] == accrual > 0
        # Nobody of its kernel family can take its audits: they wait, undesignated.
        mine = [a for a in g.audits() if a["node_id"] == g.ids["cheater"]]
        assert sum(not a["canary"] for a in mine) == served
        assert all(a["state"] == "pending" and a["verifier_id"] is None for a in mine)
        # Budget spent: paid work goes to the honest nodes, whose answers are audited.
        sent2, refused2 = g.serve(2)
        assert (sent2, refused2) == (2, 0)
        assert g.attempts_by("cheater") == served
        assert g.attempts_by("honest") + g.attempts_by("honest2") == 2
        assert _paid_out(g, "cheater") == 0  # held, never paid while nobody can verify it
        assert g.holdings("cheater")[ledger.accrual_account(g.ids["cheater"])] == accrual
        assert _paid_out(g, "honest") + _paid_out(g, "honest2") > 0
        honest_audits = [
            a for a in g.audits() if a["node_id"] != g.ids["cheater"] and not a["canary"]
        ]
        assert len(honest_audits) >= 2 and all(a["state"] == "passed" for a in honest_audits)
        print(f"\n[way 2] {served} answers, {accrual} µcr held, 0 paid out")
        _honest_whole(g, "cheater")


def test_way5_a_lazy_verifier_is_caught_by_a_canary(
    tmp_path: Path, honest: list[LlamaCppEngine]
) -> None:
    # Canaries are drawn at φ × the provider's audit rate, which is 1 in probation: φ = 1.0
    # plants one on every answer (both go to the one verifier there is).
    nodes = [Node("provider", honest[0], CHEAP), Node("lazy", LazyLlama, DEAR, verifier=True)]
    with CheatGrid(tmp_path, nodes, {"IDLEGRID_TRUST_CANARY_RATE": "1.0"}) as g:
        sent, _ = g.serve(4, stop=lambda: _ejected(g, "lazy"))
        assert wait(lambda: _ejected(g, "lazy"), 60), g.record("lazy")
        rec = g.record("lazy")
        assert rec["verifier_failed"] >= 1
        canaries = [a for a in g.audits() if a["canary"]]
        approved = [a for a in canaries if a["state"] == "passed"]
        assert approved and all(a["verifier_id"] == g.ids["lazy"] for a in approved)

        def canary_slashed() -> bool:
            # The first approval judged slashes the whole stake (a later one finds nothing to
            # take), and the ejection can be seen before that slash commits (CI, under load).
            ids = {a["id"] for a in g.audits() if a["canary"] and a["state"] == "passed"}
            keys = [e["key"] for e in g.entries()]
            return any(k.split(":")[1] in ids for k in keys if k.startswith("canary-slash:"))

        routine = ("hold:", "settle:", "audit-pay:", "mint:")
        assert wait(canary_slashed, 30), [
            e["key"] for e in g.entries() if not e["key"].startswith(routine)
        ]
        assert _stakes(g, "lazy") == 0
        net = sum(g.holdings("lazy").values()) - STAKE
        assert net < 0
        print(f"\n[way 5] caught after {sent} answers; lazy verifier's net {net:+d} µcr")
        _honest_whole(g, "lazy")


def test_way6_a_colluding_verifier_cannot_save_its_partner(
    tmp_path: Path, honest: list[LlamaCppEngine]
) -> None:
    """The cheater's partner approves its answers (and recomputes everyone else's honestly)
    and sits on the panel of its dispute; the other audits and the panel's majority are
    honest. Canaries off: only the draw and the panel stand in the way."""
    nodes = [
        Node("cheater", cheats.LlamaInvented, CHEAP),
        # Three times an honest verifier's stake: half the draws of its partner's audits.
        Node("colluder", CollusiveLlama, DEAR, verifier=True, stake=3 * STAKE),
        *(Node(f"h{i}", honest[i], DEAR, verifier=True) for i in range(3)),
    ]
    with CheatGrid(tmp_path, nodes, {"IDLEGRID_TRUST_CANARY_RATE": "0"}) as g:
        g.collude("colluder", "cheater")
        sent, _ = g.serve(12, stop=lambda: _ejected(g, "cheater"))
        assert _ejected(g, "cheater"), g.record("cheater")  # P(12 to the partner) = 2e-4
        mine = [a for a in g.audits() if a["node_id"] == g.ids["cheater"]]
        by_partner = [a for a in mine if a["verifier_id"] == g.ids["colluder"]]
        assert all(a["state"] == "passed" for a in by_partner)  # it did collude
        (failed,) = [a for a in mine if a["state"] == "failed"]
        challenger = next(n for n, i in g.ids.items() if i == failed["verifier_id"])
        assert challenger.startswith("h")
        d = g.dispute("cheater", failed["id"])
        assert d["state"] == "lost", d
        honest_panel = {g.ids[n] for n in ("h0", "h1", "h2") if n != challenger}
        assert set(d["panel"]) == {g.ids["colluder"], *honest_panel}
        assert d["votes"] == {
            g.ids["colluder"]: "provider",
            **{p: "challenger" for p in honest_panel},
        }, d
        assert set(d["ruling"]["paid"]) == honest_panel
        assert [a["state"] for a in g.audits() if a["id"] == failed["id"]] == ["failed"]
        assert _ejected(g, "cheater") and _stakes(g, "cheater") == 0
        # What its partner approved was forfeited with the failure: nothing to pay out.
        assert _paid_out(g, "cheater") == 0
        assert sum(g.holdings("cheater").values()) == 0
        # The colluder, outvoted, is neither paid for the panel nor slashed.
        assert _stakes(g, "colluder") == 3 * STAKE
        (pay,) = [e for e in g.entries() if e["key"] == f"panel-pay:{d['id']}"]
        paid = {p["account"] for p in pay["postings"] if p["amount"] > 0}
        assert paid == {ledger.provider_account(p) for p in honest_panel}
        print(
            f"\n[way 6] {sent} answers, {len(by_partner)} of {len(mine)} audits by the "
            "partner; dispute lost 2 of 3; cheater's net "
            f"{sum(g.holdings('cheater').values()) - STAKE:+d} µcr"
        )
        _honest_whole(g, "cheater", "colluder")


def test_way7_a_verifier_holding_audits_loses_its_lapse_slash_and_is_skipped(
    tmp_path: Path, honest: list[LlamaCppEngine]
) -> None:
    big = 100 * STAKE  # a hundred times the honest verifier's stake: drawn first, almost surely
    nodes = [
        Node("provider", honest[0], CHEAP),
        Node("holder", HoldingLlama, DEAR, verifier=True, stake=big),
        Node("honest", honest[1], DEAR, verifier=True),
    ]
    env = {"IDLEGRID_TRUST_AUDIT_EXPIRY_S": "2", "IDLEGRID_TRUST_CANARY_RATE": "0"}
    with CheatGrid(tmp_path, nodes, env) as g:
        sent, _ = g.serve(3)
        mine = [a for a in g.audits() if a["node_id"] == g.ids["provider"]]
        assert len(mine) == sent == 3
        # The honest verifier did every audit, the lapsed ones after the holder's deadline.
        assert all(a["state"] == "passed" for a in mine), mine
        assert {a["verifier_id"] for a in mine} == {g.ids["honest"]}
        lapses = g.record("holder")["verifier_expired"]
        assert lapses >= 1 and sum(g.ids["holder"] in a["expired"] for a in mine) == lapses
        left = big
        for _ in range(lapses):
            left -= selection.hold_slash(left, 500)
        assert _stakes(g, "holder") == left < big
        keys = [e["key"] for e in g.entries()]
        assert sum(k.startswith("lapse-slash:") for k in keys) == lapses
        assert not _ejected(g, "holder")  # skipped, not ejected: it may report again
        print(f"\n[way 7] {lapses} lapse(s), holder's net {left - big:+d} µcr")
        _honest_whole(g, "holder")


def test_way8_an_inventing_provider_fails_its_first_audit_in_probation(
    tmp_path: Path, honest: list[LlamaCppEngine]
) -> None:
    nodes = [
        Node("cheater", cheats.LlamaInvented, CHEAP),
        Node("honest", honest[0], DEAR, verifier=True),
    ]
    with CheatGrid(tmp_path, nodes, {}) as g:
        sent, _ = g.serve(3, stop=lambda: _ejected(g, "cheater"))
        rec = g.record("cheater")
        assert rec["ejected"] and rec["passed"] == 0 and rec["failed"] >= 1, rec
        # Each request waits for its answer's verdict: the first one ejected it. A canary
        # (drawn at the default φ on one answer in ten) is planted on the same answer.
        mine = [a for a in g.audits() if a["node_id"] == g.ids["cheater"]]
        (audit,) = [a for a in mine if not a["canary"]]
        assert sent == 1 and audit["state"] == "failed", (sent, audit)
        keys = [e["key"] for e in g.entries()]
        assert any(k.startswith(f"slash:{audit['id']}:") for k in keys)
        assert _stakes(g, "cheater") == 0
        assert _paid_out(g, "cheater") == 0
        assert sum(g.holdings("cheater").values()) == 0  # stake, accrual and pay: all gone
        print(f"\n[way 8] ejected after {sent} answer(s); net {-STAKE:+d} µcr")
        _honest_whole(g, "cheater")
