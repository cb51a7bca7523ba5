"""Verified training jobs on a real loopback grid: the real executor on a tiny GPT, signed
node routes, beacon audits by a verifier-mode agent, settlement through the ledger.

Every segment of a new provider is audited (probation), so honest jobs must pass every
audit, a cheat must be caught on its first segment, slashed, and the job finished by an
honest provider with the consumer paying once per step.
"""

from __future__ import annotations

import base64
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

PRICE = 1_000  # µcr per step
STAKE = 200_000


def spec(steps: int = 24, interval: int = 8, **over: Any) -> dict[str, Any]:
    """A job small enough to train in seconds on one CPU thread."""
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
        **over,
    }


class Grid:
    """A coordinator, a funded consumer key, and agents started on demand."""

    def __init__(self, tmp: Path) -> None:
        self.settings = CoordinatorSettings(
            data_dir=tmp,
            database_url=f"sqlite:///{tmp}/c.db",
            port=free_port(),
            heartbeat_interval_s=0.3,
            node_timeout_s=3.0,
            long_poll_s=2.0,
            hw_proofs=False,
            # Offers count as staked without a market stake: these tests are about jobs.
            stake_per_device=0,
        )
        self.coord = CoordinatorThread(self.settings)
        self.coord.start()
        self.http = httpx.Client(base_url=self.coord.url, trust_env=False, timeout=30)
        # The operator's client: admin routes, the ledger, every balance.
        self.admin = self.coord.admin(timeout=30)
        key = self.admin.post("/api/v1/admin/keys", json={"name": "t"}).json()
        self.key_id = key["key_id"]
        self.auth = {"Authorization": f"Bearer {key['api_key']}"}
        self.mint(key_id=self.key_id, amount=10 * MICRO)
        self.agents: dict[str, AgentThread] = {}
        self.ids: dict[str, str] = {}

    def mint(self, **body: Any) -> None:
        ref = f"m-{body.get('key_id') or body.get('node_id')}"
        self.admin.post("/api/v1/admin/mint", json={**body, "reference": ref}).raise_for_status()

    def agent(self, name: str, **config: Any) -> str:
        """Start an agent, fund it (stake comes out of its balance) and return its id.
        Trainers sell a device-hour, so that the market can place jobs on them."""
        config.setdefault("train_threads", 1)
        if config.get("trainer"):
            config = {**device_offer(), **config}
        a = make_agent(self.coord.url, [TinyEngine("tiny")], name, **config)
        t = AgentThread(a)
        t.start()
        self.agents[name] = t
        wait_for_live(self.coord.url, len(self.agents))
        nodes = {n["name"]: n["id"] for n in self.http.get("/api/v1/status").json()["nodes"]}
        self.ids[name] = nodes[name]
        self.mint(node_id=nodes[name], amount=1 * MICRO)
        return nodes[name]

    def submit(self, body: dict[str, Any]) -> httpx.Response:
        return self.http.post("/api/v1/jobs", json=body, headers=self.auth)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/jobs/{job_id}", headers=self.auth)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def wait_state(self, job_id: str, state: str, timeout_s: float = 60) -> dict[str, Any]:
        wait_until(lambda: self.job(job_id)["state"] == state, timeout_s)
        return self.job(job_id)

    def balances(self) -> dict[str, int]:
        got: dict[str, int] = self.admin.get("/api/v1/status").json()["balances"]
        return got

    def check_books(self) -> None:
        assert self.admin.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}
        assert sum(self.balances().values()) == 0

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
    # Canaries and probes only where a test asks for them (the beacon secret is random).
    monkeypatch.setenv("IDLEGRID_TRAIN_PROBE_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_CANARY_RATE", "0")
    g = Grid(tmp_path)
    yield g
    g.stop()


def seg_pays(job: dict[str, Any]) -> list[int]:
    """Escrow drawn per segment payment: each segment must be paid exactly once."""
    return [
        -p["amount"]
        for e in job["ledger"]
        if e["key"].startswith("train-seg:")
        for p in e["postings"]
        if p["account"].startswith("escrow:job:")
    ]


def test_honest_job_is_audited_paid_per_step_and_canaries_fail(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs = grid.coord.app.state.services.jobs.settings
    knobs.canary_rate = 1.0  # every segment: a canary too
    knobs.probe_rate = 1.0  # and an availability probe
    provider = grid.agent("provider", trainer=True)
    verifier = grid.agent("verifier", train_verifier=True)
    before = grid.balances()
    r = grid.submit({"spec": spec()})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert (
        grid.balances()[ledger.consumer_account(grid.key_id)]
        == before[ledger.consumer_account(grid.key_id)] - 24 * PRICE
    )  # escrowed in full
    grid.wait_state(job_id, "done")
    # Canaries do not hold the job up; they are judged beside it.
    wait_until(
        lambda: all(a["state"] in ("passed", "failed") for a in grid.job(job_id)["audits"]), 30
    )
    job = grid.job(job_id)
    real = [a for a in job["audits"] if not a["canary"]]
    canaries = [a for a in job["audits"] if a["canary"]]
    assert len(real) == 3 and all(a["state"] == "passed" for a in real), real
    assert all(a["verdict"]["exact"] for a in real)  # same determinism class: bitwise
    # An honest verifier rejects every planted wrong commitment.
    assert len(canaries) == 3 and all(a["state"] == "failed" for a in canaries), canaries
    assert [s["state"] for s in job["segments"]] == ["accepted"] * 3
    assert {s["provider"] for s in job["segments"]} == {provider}
    assert seg_pays(job) == [8 * PRICE] * 3
    bill = job["bill"]
    assert bill["charged"] == 24 * PRICE and bill["refunded"] == 0 and bill["held"] == 0
    assert bill["to_providers"] + bill["fees"] == 24 * PRICE
    assert bill["to_verifiers"] > 0 and bill["slashed"] == 0
    assert [x[0] for x in job["losses"]] == list(range(24))
    assert job["losses"][-1][1] < job["losses"][0][1]  # it learned something
    kinds = [e["kind"] for e in job["events"]]
    assert kinds[0] == "submitted" and kinds[-1] == "done"
    assert kinds.count("paid") == 3 and kinds.count("audit-passed") == 3
    assert all(e["cause"] for e in job["events"])  # every entry names its cause
    assert kinds.count("probe-sent") == 3 and kinds.count("probe-answered") == 3
    bal = grid.balances()
    assert bal.get(f"stake:{provider}:job-{job_id}", 0) == 0  # stake returned at the end
    assert bal[ledger.provider_account(verifier)] > 1 * MICRO  # paid for its audits
    status = grid.http.get("/api/v1/status").json()["trust"]["nodes"]
    assert not status[verifier]["ejected"]
    listed = grid.http.get("/api/v1/jobs", headers=grid.auth).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id] and listed[0]["verified_step"] == 24
    grid.check_books()


def test_cheat_is_caught_slashed_and_the_job_finishes_on_an_honest_provider(grid: Grid) -> None:
    cheats = pytest.importorskip("idlegrid.testbed.training_cheats")
    cheater = grid.agent(
        "cheater", trainer=True, train_executor=TorchExecutor(1, trainer_cls=cheats.ChangedLR)
    )
    grid.agent("verifier", train_verifier=True)
    job_id = grid.submit({"spec": spec()}).json()["id"]
    wait_until(lambda: grid.job(job_id)["provider"] == cheater, 30)
    honest = grid.agent("honest", trainer=True)
    job = grid.wait_state(job_id, "done", 90)
    failed = [a for a in job["audits"] if a["state"] == "failed" and not a["canary"]]
    assert failed and all(a["provider"] == cheater for a in failed)
    assert failed[0]["verdict"]["first_bad_step"] == 0  # caught on its first step
    kinds = [e["kind"] for e in job["events"]]
    assert "slashed" in kinds and "rewound" in kinds
    accepted = [s for s in job["segments"] if s["state"] == "accepted"]
    assert [s["provider"] for s in accepted] == [honest] * 3
    assert all(s["provider"] == cheater for s in job["segments"] if s["state"] != "accepted")
    # Paid once per step (to the honest provider), compensated out of the cheater's stake.
    assert seg_pays(job) == [8 * PRICE] * 3
    bill = job["bill"]
    assert bill["charged"] == 24 * PRICE and bill["compensated"] == 8 * PRICE
    assert bill["slashed"] == STAKE
    assert grid.balances().get(f"stake:{cheater}:job-{job_id}", 0) == 0
    grid.check_books()


def test_lazy_verifier_approves_a_canary_and_is_ejected_and_slashed(grid: Grid) -> None:
    def lazy(ex: Any, msg: Any) -> dict[str, Any]:  # echoes what it was shown
        return {
            "leaves": msg.commitment,
            "weight_distance": 0.0,
            "det_class": "lazy",
            "checkpoints_match": True,
        }

    jobs = grid.coord.app.state.services.jobs
    jobs.settings.canary_rate = 1.0
    grid.agent("provider", trainer=True)
    lazy_id = grid.agent("lazy", train_verifier=True, train_verify=lazy)
    acct = ledger.stake_account(lazy_id, "cpu")
    grid.coord.app.state.services.store.post(
        ledger.make_entry(
            "stake:lazy",
            Cause("test", "lazy"),
            [Posting(ledger.ISSUER, -STAKE), Posting(acct, STAKE)],
        )
    )
    job_id = grid.submit({"spec": spec(steps=8)}).json()["id"]
    wait_until(
        lambda: any(
            a["canary"] and a["state"] in ("passed", "failed") for a in grid.job(job_id)["audits"]
        ),
        60,
    )
    job = grid.job(job_id)
    canary = next(a for a in job["audits"] if a["canary"])
    assert canary["state"] == "passed"  # approved a planted wrong commitment
    assert "canary-failed" in [e["kind"] for e in job["events"]]
    assert any(e["key"].startswith(f"train-vslash:{canary['id']}:") for e in job["ledger"])
    status = grid.http.get("/api/v1/status").json()["trust"]["nodes"][lazy_id]
    assert status["ejected"] and status["verifier_failed"] == 1
    assert grid.balances().get(acct, 0) == 0
    grid.check_books()


def test_provider_killed_mid_job_resumes_elsewhere_and_each_step_is_paid_once(grid: Grid) -> None:
    first = grid.agent("first", trainer=True)
    # One thread everywhere: torch's thread count is per process, and these agents share one.
    grid.agent("verifier", train_verifier=True)
    job_id = grid.submit({"spec": spec(steps=32)}).json()["id"]
    wait_until(lambda: grid.job(job_id)["committed_step"] >= 8, 60)
    grid.agents["first"].kill()
    second = grid.agent("second", trainer=True)
    job = grid.wait_state(job_id, "done", 90)
    kinds = [e["kind"] for e in job["events"]]
    assert "provider-lost" in kinds
    resumed = next(e for e in job["events"] if e["kind"] == "resumed")
    assert resumed["start_step"] >= 8 and resumed["cause"] == f"node:{second}"
    kept = [s for s in job["segments"] if s["state"] == "accepted"]
    assert [s["start_step"] for s in kept] == list(range(0, 32, 8))
    assert {s["provider"] for s in kept} == {first, second}
    # The market re-placed the job's order when its provider was lost: same order, new place.
    assert job["market"]["order_id"] == f"{job_id}:0" and job["market"]["providers"] == [second]
    assert seg_pays(job) == [8 * PRICE] * 4  # once per step, whoever ran it
    audits = [a for a in job["audits"] if a["state"] != "dropped" and not a["canary"]]
    assert audits and all(a["state"] == "passed" for a in audits), audits
    assert job["bill"]["charged"] == 32 * PRICE
    grid.check_books()


def test_bad_specs_get_a_4xx_naming_the_field_and_nothing_is_posted(
    grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    before = grid.balances()
    cases = [
        ({"spec": spec(steps=0)}, 400, "spec.steps"),
        ({"spec": {**spec(), "colour": "red"}}, 400, "spec.colour"),
        ({"spec": spec(price_per_step=-1)}, 400, "spec.price_per_step"),
        ({"spec": {**spec(), "dataset": {"ref": "stdlib:v1"}}}, 400, None),
        ({"spec": spec(), "extra": 1}, 400, "extra"),
        ([1, 2], 400, "spec"),
    ]
    for body, status, param in cases:
        r = grid.submit(body)  # type: ignore[arg-type]
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param, err
    assert grid.balances() == before
    r = grid.submit({"spec": spec(steps=100_000, price_per_step=10**9)})
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"
    ok = grid.submit({"spec": spec(), "ref": "once"})
    assert ok.status_code == 201
    assert grid.submit({"spec": spec(), "ref": "once"}).status_code == 409
    assert grid.http.get("/api/v1/jobs/job-nope", headers=grid.auth).status_code == 404
    assert grid.http.get("/api/v1/jobs").status_code == 401
    monkeypatch.setenv("IDLEGRID_API_KEY", grid.auth["Authorization"][7:])
    cli = ["--coordinator", grid.coord.url, "--data-dir", str(tmp_path / "cli"), "--json"]
    res = CliRunner().invoke(app, ["cancel-job", ok.json()["id"], *cli])
    assert res.exit_code == 0, res.output
    canceled = json.loads(res.stdout)
    assert canceled["state"] == "canceled" and canceled["bill"]["refunded"] == 24 * PRICE
    assert canceled["bill"]["charged"] == 0 and canceled["bill"]["held"] == 0
    listed = json.loads(CliRunner().invoke(app, ["jobs", *cli]).stdout)["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(ok.json()["id"], "canceled")]
    res = CliRunner().invoke(app, ["job", "job-nope", *cli])
    assert res.exit_code == 1
    assert (
        grid.http.post(f"/api/v1/jobs/{ok.json()['id']}/cancel", headers=grid.auth).status_code
        == 409
    )
    assert (
        grid.balances()[ledger.consumer_account(grid.key_id)]
        == before[ledger.consumer_account(grid.key_id)]
    )
    grid.check_books()


def test_a_job_in_another_determinism_class_is_declined_not_run(grid: Grid) -> None:
    provider = grid.agent("provider", trainer=True)
    job_id = grid.submit({"spec": spec(determinism_class="torch-0/tpu/bfloat16/t64")}).json()["id"]
    wait_until(lambda: "declined" in [e["kind"] for e in grid.job(job_id)["events"]], 30)
    job = grid.job(job_id)
    declined = next(e for e in job["events"] if e["kind"] == "declined")
    assert declined["cause"].startswith(f"node:{provider}: this node computes in torch-")
    assert job["state"] == "queued" and job["segments"] == []
    assert job["bill"]["held"] == 24 * PRICE and job["bill"]["charged"] == 0  # still escrowed
    r = grid.http.post(f"/api/v1/jobs/{job_id}/cancel", headers=grid.auth)
    assert r.json()["bill"]["refunded"] == 24 * PRICE
    grid.check_books()


def test_node_routes_refuse_unsigned_stale_and_malformed_commits(grid: Grid) -> None:
    import asyncio

    from idlegrid.agent.node_client import NodeClient
    from idlegrid.errors import AuthError, InvalidRequest, StaleAttempt
    from idlegrid.protocol.signing import NodeKey

    # Sells a device-hour, so the market places the job on it, but its agent takes no
    # training jobs: this test polls in its name.
    provider = grid.agent("provider", **device_offer())
    job_id = grid.submit({"spec": spec(), "ref": "x"}).json()["id"]
    r = grid.http.post("/api/v1/train/poll", json={})
    assert r.status_code == 401
    client = grid.agents["provider"].agent.client
    loop = grid.agents["provider"].loop

    def call(path: str, body: dict[str, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(client.call(path, body), loop).result(30)

    work = call("/api/v1/train/poll", {"wait_s": 1})
    assert work["job_id"] == job_id and work["start_step"] == 0
    base = f"/api/v1/train/jobs/{job_id}/attempts/{work['attempt']}"
    junk = base64.b64encode(b"junk").decode()
    with pytest.raises(InvalidRequest) as bad:
        call(f"{base}/segments/0/commit", {"commitment": junk, "checkpoint": junk})
    assert bad.value.param == "commitment"
    with pytest.raises(InvalidRequest):
        call(f"{base}/segments/0/commit", {"commitment": "%%%", "checkpoint": junk})
    with pytest.raises(StaleAttempt.__mro__[1]):  # 409: an attempt it does not hold
        call(
            f"/api/v1/train/jobs/{job_id}/attempts/99/progress",
            {"step": 1, "loss": 1.0, "tokens_per_s": 1.0},
        )

    async def unknown_node() -> None:
        stranger = NodeClient(grid.coord.url, NodeKey.generate())
        try:
            await stranger.call("/api/v1/train/poll", {"wait_s": 0})
        finally:
            await stranger.close()

    with pytest.raises(AuthError):
        asyncio.run(unknown_node())
    assert grid.job(job_id)["provider"] == provider


class Forgetful(dict):  # type: ignore[type-arg]
    """Checkpoints that are never kept: the provider deletes them after committing."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def test_provider_that_deletes_checkpoints_fails_its_probe_and_is_slashed(grid: Grid) -> None:
    knobs = grid.coord.app.state.services.jobs.settings
    knobs.probe_rate, knobs.probe_timeout_s = 1.0, 2.0
    forgetful = grid.agent("forgetful", trainer=True)
    grid.agents["forgetful"].agent.roles.training.checkpoints = Forgetful()
    grid.agent("verifier", train_verifier=True)
    job_id = grid.submit({"spec": spec()}).json()["id"]
    wait_until(lambda: "probe-failed" in [e["kind"] for e in grid.job(job_id)["events"]], 30)
    honest = grid.agent("honest", trainer=True)
    job = grid.wait_state(job_id, "done", 90)
    failed = next(e for e in job["events"] if e["kind"] == "probe-failed")
    assert failed["provider"] == forgetful and failed["slashed"] == STAKE
    assert job["bill"]["slashed"] == STAKE  # the probe's slash is in the job's ledger
    assert grid.balances().get(f"stake:{forgetful}:job-{job_id}", 0) == 0
    # What it committed was audited and kept; whatever was left, the honest provider did.
    kept = [s for s in job["segments"] if s["state"] == "accepted"]
    assert [s["start_step"] for s in kept] == [0, 8, 16]
    assert {s["provider"] for s in kept} <= {forgetful, honest}
    assert "probe-answered" not in [e["kind"] for e in job["events"]]
    assert seg_pays(job) == [8 * PRICE] * 3
    grid.check_books()
