"""Training disputes on a real loopback grid: a provider contests a failed segment audit,
the coordinator drives the core's game round by round over signed node routes, the agents
answer from their executors (the real one on a tiny GPT), and a panel of three training
verifiers (neither party) each recompute the disputed operator or step; the majority rules.
The ruling moves money: an overturned slash is reversed and the false verifier pays the
panel and loses its stake; a cheat's slash stands and it pays the panel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlegrid.agent.roles.trainer import TorchExecutor
from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Posting
from idlegrid.engines.tiny import TinyEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    device_offer,
    free_port,
    make_agent,
    wait_for_live,
    wait_until,
)

torch = pytest.importorskip("torch")
verified = pytest.importorskip("idlegrid.training.verified")
cheats = pytest.importorskip("idlegrid.testbed.training_cheats")

PRICE = 1_000
STAKE = 200_000
VSTAKE = 300_000  # a verifier's own stake, what a false accusation costs it


def spec(steps: int = 8, interval: int = 4) -> dict[str, Any]:
    """Two segments of a tiny GPT: seconds on one CPU thread."""
    return {
        "dataset": {"ref": "stdlib:v1", "sha256": verified.corpus_sha256(), "windows": 64},
        "model": {"arch": "gpt", "vocab": 256, "seq": 16, "layers": 1, "dim": 32, "heads": 2},
        "steps": steps,
        "checkpoint_interval": interval,
        "batch_size": 4,
        "init_seed": 3,
        "job_seed": 5,
        "price_per_step": PRICE,
        "stake_required": STAKE,
    }


class Grid:
    """A coordinator, a funded consumer key, and agents (keys kept on disk)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.settings = CoordinatorSettings(
            data_dir=tmp,
            database_url=f"sqlite:///{tmp}/c.db",
            port=free_port(),
            heartbeat_interval_s=0.3,
            node_timeout_s=3.0,
            long_poll_s=2.0,
            hw_proofs=False,
            # Offers count as staked without a market stake: these tests are about disputes.
            stake_per_device=0,
        )
        self.coord = CoordinatorThread(self.settings)
        self.coord.start()
        self.http = httpx.Client(base_url=self.coord.url, trust_env=False, timeout=30)
        # The operator's client: admin routes, the ledger, every balance.
        self.admin = self.coord.admin(timeout=30)
        key = self.admin.post("/api/v1/admin/keys", json={"name": "t"}).json()
        self.auth = {"Authorization": f"Bearer {key['api_key']}"}
        self.mint(key_id=key["key_id"], amount=10 * MICRO)
        self.agents: dict[str, AgentThread] = {}
        self.ids: dict[str, str] = {}

    @property
    def knobs(self) -> Any:
        return self.coord.app.state.services.jobs.settings

    def mint(self, **body: Any) -> None:
        ref = f"m-{body.get('key_id') or body.get('node_id')}"
        self.admin.post("/api/v1/admin/mint", json={**body, "reference": ref}).raise_for_status()

    def agent(self, name: str, **config: Any) -> str:
        config.setdefault("train_threads", 1)
        if config.get("trainer"):  # sells a device-hour: the market places jobs on it
            config = {**device_offer(), **config}
        a = make_agent(self.coord.url, [TinyEngine("tiny")], name, key_dir=self.tmp, **config)
        t = AgentThread(a)
        t.start()
        self.agents[name] = t
        wait_for_live(
            self.coord.url, sum(1 for x in self.agents.values() if x.thread and x.thread.is_alive())
        )
        nodes = {n["name"]: n["id"] for n in self.http.get("/api/v1/status").json()["nodes"]}
        self.ids[name] = nodes[name]
        self.mint(node_id=nodes[name], amount=1 * MICRO)
        if config.get("train_verifier"):  # a verifier's stake answers for its reports
            self.coord.app.state.services.store.post(
                ledger.make_entry(
                    f"vstake:{name}",
                    Cause("test", name),
                    [
                        Posting(ledger.ISSUER, -VSTAKE),
                        Posting(ledger.stake_account(nodes[name], "cpu"), VSTAKE),
                    ],
                )
            )
        return nodes[name]

    def submit(self) -> str:
        r = self.http.post("/api/v1/jobs", json={"spec": spec()}, headers=self.auth)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/jobs/{job_id}", headers=self.auth)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def failed_audit(self, job_id: str) -> dict[str, Any]:
        wait_until(
            lambda: any(a["state"] == "failed" for a in self.job(job_id)["audits"]),
            60,
            interval_s=0.2,
        )
        return next(a for a in self.job(job_id)["audits"] if a["state"] == "failed")

    def ruled(self, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
        def done() -> bool:
            ds = self.job(job_id)["disputes"]
            return bool(ds) and ds[0]["state"] in ("won", "lost")

        wait_until(done, timeout_s, interval_s=0.2)
        d: dict[str, Any] = self.job(job_id)["disputes"][0]
        return d

    def signed(
        self, name: str, path: str, body: dict[str, Any], *, tamper: bool = False
    ) -> httpx.Response:
        key = self.agents[name].agent.client.key
        raw = json.dumps(body).encode()
        headers = key.sign_headers("POST", path, raw, now=time.time())
        if tamper:
            raw = raw.replace(b"}", b', "x": 1}')
        return self.http.post(path, content=raw, headers=headers)

    def panel(self) -> list[str]:
        """Three training verifiers for the dispute panel, joined after the audit: with
        exactly k = 3 eligible, the panel is all of them."""
        return [self.agent(n, train_verifier=True) for n in ("referee", "p2", "p3")]

    def entry(self, key: str) -> dict[str, Any]:
        (e,) = [e for e in self.admin.get("/api/v1/ledger").json()["entries"] if e["key"] == key]
        return dict(e)

    def panel_fee(self) -> int:
        """One panelist's pay: the verifier fee of one segment (4 steps)."""
        return PRICE * 4 * self.knobs.verifier_fee_bps // 10_000

    def ejected(self) -> tuple[set[str], set[str]]:
        """Who is ejected: in the coordinator's cache, and in the store's rows."""
        from idlegrid.coordinator.trust.tables import TrustNode

        svc = self.coord.app.state.services
        with svc.store.read() as s:
            rows = {n.node_id for n in s.query(TrustNode).all() if n.ejected}
        return set(svc.ctx.ejected), rows

    def balances(self) -> dict[str, int]:
        got: dict[str, int] = self.admin.get("/api/v1/status").json()["balances"]
        return got

    def check_books(self) -> None:
        assert self.admin.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}
        assert self.coord.app.state.services.store.verify_ledger() == []
        bal = self.balances()
        assert sum(bal.values()) == 0
        assert all(v >= 0 for k, v in bal.items() if not k.startswith(("system:issuer",))), bal

    def stop(self) -> None:
        for t in self.agents.values():
            if t.thread is not None and t.thread.is_alive():
                t.stop(10)
        self.http.close()
        self.admin.close()
        self.coord.stop()


@pytest.fixture
def grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Grid]:
    monkeypatch.setenv("IDLEGRID_TRAIN_CHALLENGE_S", "0.5")
    monkeypatch.setenv("IDLEGRID_TRAIN_LEASE_TIMEOUT_S", "30")
    monkeypatch.setenv("IDLEGRID_TRAIN_PROBE_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_DISPUTE_ROUND_S", "20")
    g = Grid(tmp_path)
    yield g
    g.stop()


DISPUTES = "/api/v1/disputes"  # the one route family, both kinds


def opening(audit: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The body that opens a training dispute over `audit`."""
    return {"kind": "training", "audit_id": audit["id"], **kw}


def keys(job: dict[str, Any]) -> list[str]:
    return [e["key"] for e in job["ledger"]]


def cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    return CliRunner().invoke(app, list(args))


def test_honest_provider_wins_against_a_lying_verifier(grid: Grid) -> None:
    provider = grid.agent("provider", trainer=True)
    liar = grid.agent("liar", train_verifier=True, train_executor=cheats.LyingVerifier(1))
    job_id = grid.submit()
    audit = grid.failed_audit(job_id)  # segment 0 is always audited: the liar fails it
    stake_acct = f"stake:{provider}:job-{job_id}"
    assert grid.balances().get(stake_acct, 0) == 0  # slashed
    panel = grid.panel()
    referee = panel[0]
    res = cli(
        "dispute",
        audit["id"],
        "--kind",
        "training",
        "--coordinator",
        grid.coord.url,
        "--key-file",
        str(grid.tmp / "provider.key"),
        "--reason",
        "I trained honestly",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["kind"] == "training"
    d = grid.ruled(job_id)
    assert d["state"] == "won" and d["kind"] == "training", d
    assert d["provider_id"] == provider and d["challenger_id"] == liar
    # The one listing shows it (operator only), filtered by kind and by node.
    listed = grid.admin.get(DISPUTES).json()["disputes"]
    assert [(x["id"], x["kind"], x["state"]) for x in listed] == [(d["id"], "training", "won")]
    assert (
        grid.admin.get(DISPUTES, params={"kind": "training", "node": referee}).json()["disputes"]
        == listed
    )
    assert grid.admin.get(DISPUTES, params={"kind": "inference"}).json()["disputes"] == []
    assert grid.admin.get(DISPUTES, params={"node": "nobody"}).json()["disputes"] == []
    bad = grid.admin.get(DISPUTES, params={"kind": "bogus"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kind"
    assert grid.http.get(DISPUTES).status_code == 401
    r = d["ruling"]
    assert r["provider_right"] is True and "unpaid" not in r, r
    assert sorted(d["panel"]) == sorted(panel) and d["votes"] == {p: "provider" for p in panel}
    assert sorted(r["paid"]) == sorted(panel) and r["slashed"] == "challenger"
    assert r["reason"].endswith("panel 3 of 3 on step 1"), r
    # The liar's replay lies from the segment's second step: that is the disputed step; its
    # op trace is honest, so the referee recomputed the whole step (no single op differs).
    assert r["step"] == 1 and r["op_index"] is None, r
    assert r["rounds"] <= 2  # ⌈log₂ 4⌉ step rounds, no op rounds
    job = grid.job(job_id)
    ks = keys(job)
    assert f"reverse:{d['id']}" in ks
    assert f"dispute-penalty:{d['id']}:stake:{liar}:cpu" in ks
    assert f"panel-pay:{d['id']}" in ks
    # Each of the majority is paid one segment's verifier fee, by the liar's stake.
    fee = grid.panel_fee()
    pay = grid.entry(f"panel-pay:{d['id']}")
    assert {p["account"]: p["amount"] for p in pay["postings"]} == {
        f"stake:{liar}:cpu": -3 * fee,
        **{ledger.provider_account(p): fee for p in panel},
    }
    cache, rows = grid.ejected()
    assert liar in rows and cache == rows and provider not in rows
    overturned = next(a for a in job["audits"] if a["id"] == audit["id"])
    assert overturned["state"] == "overturned"
    kinds = [e["kind"] for e in job["events"]]
    assert "dispute-opened" in kinds and "dispute-won" in kinds
    # The provider is no longer excluded: it takes the job again, the referee audits it
    # (the liar is ejected), and the job finishes with the stake returned.
    job = grid.job(job_id)
    wait_until(lambda: grid.job(job_id)["state"] == "done", 60, interval_s=0.2)
    bal = grid.balances()
    assert bal.get(stake_acct, 0) == 0 and bal.get(f"stake:{liar}:cpu", 0) == 0
    assert bal.get(f"provider:{provider}", 0) > 1 * MICRO  # paid + half the liar's stake
    assert grid.job(job_id)["bill"]["compensated"] == 0  # the compensation went back
    grid.check_books()


def test_a_cheat_loses_its_dispute_and_the_slash_stands(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid.agent("cheat", trainer=True, train_executor=TorchExecutor(1, trainer_cls=cheats.ChangedLR))
    verifier = grid.agent("verifier", train_verifier=True)
    job_id = grid.submit()
    audit = grid.failed_audit(job_id)
    panel = grid.panel()
    before = grid.job(job_id)["bill"]
    vbefore = grid.balances()
    r = grid.signed("cheat", DISPUTES, opening(audit, reason="no"))
    assert r.status_code == 200, r.text
    d = grid.ruled(job_id)
    assert d["state"] == "lost" and d["ruling"]["provider_right"] is False, d
    assert d["ruling"]["step"] == 0 and d["ruling"]["op_index"] is not None
    assert d["votes"] == {p: "challenger" for p in panel} and "unpaid" not in d["ruling"]
    assert sorted(d["ruling"]["paid"]) == sorted(panel) and d["ruling"]["slashed"] is None
    # Down to one operator of step 0 (the optimizer's update), recomputed by the panel.
    assert d["ruling"]["reason"].endswith(f"panel 3 of 3 on op {d['ruling']['op_index']} of step 0")
    assert d["done_at"] - d["created_at"] < 60
    monkeypatch.setenv("IDLEGRID_API_KEY", grid.auth["Authorization"][7:])
    shown = cli("job", job_id, "--coordinator", grid.coord.url, "--data-dir", str(grid.tmp / "cli"))
    assert shown.exit_code == 0 and "challenger right" in shown.output, shown.output
    job = grid.job(job_id)
    ks = keys(job)
    assert f"reverse:{d['id']}" not in ks and f"panel-pay:{d['id']}" in ks
    assert not any(k.startswith(f"dispute-penalty:{d['id']}") for k in ks)
    # The cheat pays the panel (its account first); the verifier loses nothing.
    fee = grid.panel_fee()
    pay = grid.entry(f"panel-pay:{d['id']}")
    credited = {p["account"]: p["amount"] for p in pay["postings"] if p["amount"] > 0}
    assert credited == {ledger.provider_account(p): fee for p in panel}
    debited = {p["account"]: p["amount"] for p in pay["postings"] if p["amount"] < 0}
    assert debited == {ledger.provider_account(grid.ids["cheat"]): -3 * fee}
    bal = grid.balances()
    assert bal[f"stake:{verifier}:cpu"] == vbefore[f"stake:{verifier}:cpu"] == VSTAKE
    cache, rows = grid.ejected()
    assert verifier not in rows and cache == rows
    assert job["bill"]["compensated"] == before["compensated"] > 0
    assert next(a for a in job["audits"] if a["id"] == audit["id"])["state"] == "failed"
    again = grid.signed("cheat", DISPUTES, opening(audit))
    assert again.status_code == 409 and "already" in again.json()["error"]["message"]
    grid.check_books()


def test_a_silent_challenger_loses_the_game_but_is_not_slashed(grid: Grid) -> None:
    provider = grid.agent("provider", trainer=True)
    liar = grid.agent("liar", train_verifier=True, train_executor=cheats.LyingVerifier(1))
    job_id = grid.submit()
    audit = grid.failed_audit(job_id)
    grid.agents["liar"].stop(10)  # the challenger will not answer
    grid.knobs.dispute_round_s = 1.0
    r = grid.signed("provider", DISPUTES, opening(audit))
    assert r.status_code == 200, r.text
    d = grid.ruled(job_id, 30)
    assert d["state"] == "won" and "did not answer" in d["ruling"]["reason"], d
    # Won on the game's deadline, before any panel: the challenger forfeits what its slash
    # paid out, but only a panel slashes (or ejects) it, and nobody is paid for a panel.
    assert d["panel"] == [] and d["votes"] == {} and d["ruling"]["slashed"] is None
    ks = keys(grid.job(job_id))
    assert f"reverse:{d['id']}" in ks and f"panel-pay:{d['id']}" not in ks
    assert not any(k.startswith(f"dispute-penalty:{d['id']}") for k in ks)
    bal = grid.balances()
    assert bal.get(f"stake:{provider}:job-{job_id}", 0) == STAKE
    assert bal[f"stake:{liar}:cpu"] == VSTAKE
    cache, rows = grid.ejected()
    assert liar not in rows and cache == rows
    grid.check_books()


def test_refusals(grid: Grid) -> None:
    grid.agent("provider", trainer=True)
    grid.agent("verifier", train_verifier=True)
    job_id = grid.submit()
    wait_until(
        lambda: any(a["state"] == "passed" for a in grid.job(job_id)["audits"]), 60, interval_s=0.2
    )
    audit = next(a for a in grid.job(job_id)["audits"] if a["state"] == "passed")
    assert audit["id"].startswith("taud-")
    before = grid.balances()
    passed = grid.signed("provider", DISPUTES, opening(audit, reason="why not"))
    assert passed.status_code == 409 and "did not fail" in passed.json()["error"]["message"]
    # The CLI tells the kind from the audit id (taud-…) and says the same.
    res = cli(
        "dispute",
        audit["id"],
        "--coordinator",
        grid.coord.url,
        "--key-file",
        str(grid.tmp / "provider.key"),
    )
    assert res.exit_code == 1 and "did not fail" in res.output, res.output
    assert grid.signed("verifier", DISPUTES, opening(audit)).status_code == 404  # not its own
    # The wrong kind looks in the other game's table: no such audit there.
    wrong = grid.signed("provider", DISPUTES, opening(audit) | {"kind": "inference"})
    assert wrong.status_code == 404
    for body in (opening(audit) | {"kind": "bogus"}, {"audit_id": audit["id"]}):
        r = grid.signed("provider", DISPUTES, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kind", r.text
    bad = grid.signed("provider", DISPUTES, opening(audit, reason="x"), tamper=True)
    assert bad.status_code == 401 and "signature" in bad.json()["error"]["message"]
    assert grid.http.post(DISPUTES, json=opening(audit)).status_code == 401  # unsigned
    assert grid.signed("provider", f"{DISPUTES}/tdsp-x/query", {"round": 1}).status_code == 404
    assert grid.signed("provider", f"{DISPUTES}/tdsp-x/answer", {"round": -1}).status_code == 400
    assert grid.job(job_id)["disputes"] == []
    # Nothing was posted by any refusal (the job itself may have moved on meanwhile).
    assert not [k for k in keys(grid.job(job_id)) if "tdsp-" in k]
    assert (
        grid.balances()[f"stake:{grid.ids['verifier']}:cpu"]
        == before[f"stake:{grid.ids['verifier']}:cpu"]
    )
    grid.check_books()


def test_a_cross_class_failure_cannot_be_disputed(grid: Grid) -> None:
    # Exact mode only: the verifier computes in another class (two threads).
    grid.agent("cheat", trainer=True, train_executor=TorchExecutor(1, trainer_cls=cheats.ChangedLR))
    grid.agent("verifier", train_verifier=True, train_threads=2)
    job_id = grid.submit()
    audit = grid.failed_audit(job_id)
    assert audit["verdict"]["exact"] is False
    r = grid.signed("cheat", DISPUTES, opening(audit))
    assert r.status_code == 409 and "exact-mode only" in r.json()["error"]["message"]
    grid.check_books()
