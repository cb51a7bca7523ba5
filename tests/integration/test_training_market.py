"""Training jobs placed by the market (issue 17, part 6) on a real loopback grid.

A job lands on the cheapest fitting provider and only that provider may claim it; a job
nobody can take says why (the market's `explain`, and the job's own view); a placed
provider that never claims is a no-show and the job moves on; the consumer pays per
verified step and the market order adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_training_grid import PRICE, Grid, spec
from typer.testing import CliRunner

from idlegrid.client.cli import app
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO
from idlegrid.testbed.inprocess import device_offer

pytest.importorskip("torch")

CHEAP, DEAR = 1 * MICRO, 3 * MICRO  # µcr per device-hour


@pytest.fixture
def grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Grid]:
    monkeypatch.setenv("IDLEGRID_TRAIN_CHALLENGE_S", "0.5")
    monkeypatch.setenv("IDLEGRID_TRAIN_PROBE_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_CLAIM_TIMEOUT_S", "3")
    g = Grid(tmp_path)
    yield g
    g.stop()


def order(grid: Grid, order_id: str) -> dict[str, Any]:
    r = grid.http.get(f"/api/v1/orders/{order_id}", headers=grid.auth)
    r.raise_for_status()
    got: dict[str, Any] = r.json()
    return got


def test_a_job_lands_on_the_cheapest_fitting_provider_and_is_billed_per_step_only(
    grid: Grid,
) -> None:
    dear = grid.agent("dear", trainer=True, **device_offer(DEAR))
    # The cheapest offer of all, but its device is too small for the job: fit comes first.
    grid.agent("tiny", trainer=True, **device_offer(CHEAP // 2, vram_gb=0.0001))
    cheap = grid.agent("cheap", trainer=True, **device_offer(CHEAP))
    grid.agent("verifier", train_verifier=True)
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balances()[consumer]
    r = grid.submit({"spec": spec(), "resources": {"max_price": 2.0}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    placed = r.json()["market"]
    assert placed["order_id"] == f"{job_id}:0" and placed["providers"] == [cheap], placed
    assert placed["placement"]["legs"][0]["unit_price"] == CHEAP
    # The dearer provider polls all along (it is a trainer) and never gets this job.
    assert grid.coord.app.state.services.jobs._claim(dear) is None
    job = grid.wait_state(job_id, "done", 90)
    assert {s["provider"] for s in job["segments"]} == {cheap}
    holders = {e["cause"] for e in job["events"] if e["kind"] in ("assigned", "resumed")}
    assert holders == {f"node:{cheap}"}
    assert grid.balances().get(f"stake:{dear}:job-{job_id}", 0) == 0  # never even staked
    # One rule: the job pays per verified step; its market order costs nothing.
    assert grid.balances()[consumer] == before - 24 * PRICE
    assert job["bill"]["charged"] == 24 * PRICE
    assert not [e for e in job["ledger"] if e["key"].split(":")[0] in ("prepay", "accrue")]
    o = order(grid, f"{job_id}:0")
    assert o["kind"] == "training" and o["budget"] == 0 and o["spent"] == 0
    # Done: the order is over and the provider's device is free for the next job.
    assert o["state"] == "cancelled"
    assert job["market"]["order_state"] == "cancelled"
    grid.check_books()


def test_jobs_that_cannot_be_placed_say_why(
    grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid.agent("a", **device_offer(CHEAP))
    grid.agent("b", **device_offer(DEAR))
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balances()[consumer]

    # Every offer above the ceiling.
    r = grid.submit({"spec": spec(), "resources": {"max_price": 0.5}, "ref": "low"})
    assert r.status_code == 201, r.text
    low = r.json()
    assert low["state"] == "queued"
    assert low["market"]["waiting"] and low["market"]["decisive"] == "max_price", low["market"]
    why = grid.http.get(f"/api/v1/orders/{low['id']}:0/explain", headers=grid.auth).json()
    assert why["matches_now"] is False and why["now"]["decisive"] == "max_price", why
    cut = next(x for x in why["now"]["reasons"] if x["constraint"] == "max_price")
    assert cut == {"constraint": "max_price", "eliminated": 2, "remaining": 0}

    # Too large for every device: 48 layers of width 2048 need far more than 8 GB.
    big = spec(
        model={"arch": "gpt", "vocab": 256, "seq": 64, "layers": 48, "dim": 2048, "heads": 16}
    )
    r = grid.submit({"spec": big, "ref": "big"})
    assert r.status_code == 201, r.text
    large = r.json()
    assert large["market"]["decisive"] == "vram_gb", large["market"]
    why = grid.http.get(f"/api/v1/orders/{large['id']}:0/explain", headers=grid.auth).json()
    assert why["now"]["decisive"] == "vram_gb"

    # The CLI says it too: the job waits for placement, and `explain` tells why.
    monkeypatch.setenv("IDLEGRID_API_KEY", grid.auth["Authorization"][7:])
    cli = ["--coordinator", grid.coord.url, "--data-dir", str(tmp_path / "cli")]
    res = CliRunner().invoke(app, ["job", low["id"], *cli], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"waiting for placement (order {low['id']}:0): max_price" in res.stdout
    res = CliRunner().invoke(app, ["explain", f"{low['id']}:0", "--json", *cli])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["now"]["decisive"] == "max_price"

    # Both wait, with their reasons; nothing is charged but the jobs' escrow.
    again = grid.job(low["id"])
    assert again["state"] == "queued" and again["market"]["decisive"] == "max_price"
    assert grid.balances()[consumer] == before - 2 * 24 * PRICE
    for job_id in (low["id"], large["id"]):
        assert grid.http.post(f"/api/v1/jobs/{job_id}/cancel", headers=grid.auth).is_success
    assert grid.balances()[consumer] == before
    assert order(grid, f"{low['id']}:0")["state"] == "cancelled"
    grid.check_books()


@pytest.mark.parametrize(
    ("resources", "param"),
    [
        ({"max_price": -1}, "resources.max_price"),
        ({"max_price": "cheap"}, "resources.max_price"),
        ({"count": 2}, "resources.count"),
        ({"vram_gb": "<=8"}, "resources.vram_gb"),
        ({"region": 5}, "resources.region"),
        ("fast", "resources"),
    ],
)
def test_bad_resources_are_a_400_naming_the_field_and_nothing_is_posted(
    grid: Grid, resources: Any, param: str
) -> None:
    before = grid.balances()
    r = grid.submit({"spec": spec(), "resources": resources})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert grid.balances() == before
    assert grid.http.get("/api/v1/orders", headers=grid.auth).json()["orders"] == []


def test_a_placed_provider_that_never_claims_is_passed_over(grid: Grid) -> None:
    # Sells device-hours at the best price but does not train: placed first, never claims.
    idle = grid.agent("idle", **device_offer(CHEAP))
    trainer = grid.agent("trainer", trainer=True, **device_offer(DEAR))
    grid.agent("verifier", train_verifier=True)
    job_id = grid.submit({"spec": spec(steps=8)}).json()["id"]
    assert grid.job(job_id)["market"]["providers"] == [idle]
    job = grid.wait_state(job_id, "done", 90)
    kinds = [e["kind"] for e in job["events"]]
    no_show = next(e for e in job["events"] if e["kind"] == "no-show")
    assert no_show["nodes"] == [idle]
    assert kinds.index("no-show") < kinds.index("assigned")
    assert {s["provider"] for s in job["segments"]} == {trainer}
    assert order(grid, f"{job_id}:0")["state"] == "cancelled"  # replaced by one avoiding idle
    assert order(grid, f"{job_id}:1")["body"]["avoid"] == [idle]
    grid.check_books()
