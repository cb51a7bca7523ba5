"""Disputes over embedding audits on a real loopback grid (all-MiniLM-L6-v2 agents, the
official openai client). There is nothing to bisect: the panel of three verifiers, drawn
after the audit, recomputes every vector and the majority rules with the audits' tolerance.
An honest provider failed by a lying verifier wins (the liar slashed and ejected); a
provider serving a cheaper model's vectors loses (the slash stands)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from test_trust_disputes import CHEAP, DEAR, DISPUTES, STAKE, Grid, opening

from idlegrid.core import ledger
from idlegrid.engines.minilm import MODEL_ID, MiniLMEngine
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import wait_until

pytestmark = pytest.mark.slow
TEXTS = ["The cat sits on the mat.", "Quarterly revenue grew 5%."]


@pytest.fixture
def grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Grid]:
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRUST_DISPUTE_ANSWER_S", "30")
    g = Grid(tmp_path)
    yield g
    g.stop()


def _failed_embedding_audit(g: Grid) -> dict:
    with openai.OpenAI(base_url=f"{g.url}/v1", api_key=g.key["api_key"], max_retries=0) as c:
        got = c.embeddings.create(model=MODEL_ID, input=TEXTS)
    assert len(got.data) == 2
    wait_until(lambda: any(a["state"] in ("passed", "failed") for a in g.audits()), 90)
    (audit,) = [a for a in g.audits() if a["node_id"] == g.ids["provider"]]
    assert audit["state"] == "failed" and audit["verdict"]["kind"] == "embedding", audit
    return audit


def _panel(g: Grid) -> list[str]:
    """Three honest verifiers, joined after the audit: with k = 3, the panel is all of them."""
    for name in ("p1", "p2", "p3"):
        g.add(name, MiniLMEngine(threads=1), DEAR, verifier=True)
    return [g.ids[n] for n in ("p1", "p2", "p3")]


def _settled(g: Grid) -> dict:
    try:
        wait_until(lambda: g.disputes() and g.disputes()[0]["state"] in ("won", "lost"), 120)
    except Exception:
        pytest.fail(f"not settled: {g.disputes()}")
    return g.disputes()[0]


def test_honest_provider_wins_an_embedding_dispute_against_a_lying_verifier(grid: Grid) -> None:
    g = grid
    g.add("provider", MiniLMEngine(threads=1), CHEAP)
    g.add("liar", cheats.MiniLMFalseAccuser(threads=1), DEAR, verifier=True)
    audit = _failed_embedding_audit(g)
    assert g.status()["balances"].get(ledger.stake_account(g.ids["provider"], "cpu"), 0) == 0
    panel = _panel(g)
    r = g.signed("provider", DISPUTES, opening(audit, reason="my vectors are the model's"))
    assert r.status_code == 200, r.text
    d = _settled(g)
    assert d["state"] == "won" and d["ruling"]["provider_right"] is True, d
    assert d["votes"] == {p: "provider" for p in panel} and d["rounds"] == []
    assert "the committed vectors holds" in d["ruling"]["detail"]
    assert d["ruling"]["slashed"] == "challenger"
    st = g.status()
    assert st["balances"][ledger.stake_account(g.ids["provider"], "cpu")] == STAKE  # reversed
    assert st["balances"].get(ledger.stake_account(g.ids["liar"], "cpu"), 0) == 0
    nodes = st["trust"]["nodes"]
    assert nodes[g.ids["liar"]]["ejected"] and not nodes[g.ids["provider"]]["ejected"]
    assert [a["state"] for a in g.audits() if a["id"] == audit["id"]] == ["overturned"]
    assert g.signed("provider", DISPUTES, opening(audit)).status_code == 409  # final
    g.books_ok()


def test_cheaper_models_vectors_lose_their_dispute(grid: Grid) -> None:
    g = grid
    g.add("provider", cheats.MiniLMTruncated(threads=1), CHEAP)
    g.add("verifier", MiniLMEngine(threads=1), DEAR, verifier=True)
    audit = _failed_embedding_audit(g)
    panel = _panel(g)
    r = g.signed("provider", DISPUTES, opening(audit, reason="they are right, I promise"))
    assert r.status_code == 200, r.text
    d = _settled(g)
    assert d["state"] == "lost" and d["ruling"]["provider_right"] is False, d
    assert d["votes"] == {p: "challenger" for p in panel}
    assert d["ruling"]["slashed"] is None
    st = g.status()
    assert st["balances"][ledger.stake_account(g.ids["verifier"], "cpu")] == STAKE
    assert st["trust"]["nodes"][g.ids["provider"]]["ejected"]
    assert [a["state"] for a in g.audits() if a["id"] == audit["id"]] == ["failed"]
    g.books_ok()
