"""Multi-provider training jobs placed by the market as gangs (issue 17, part 6), on a real
loopback grid with real agents.

A 2-rank job goes to the pair of providers whose link keeps its gradient exchange short,
not to a cheaper pair over a slow link (the planner's cost model prices both); the
placement names every member's rank, the gang forms in that order, trains, and each
segment's pay is split between exactly those members. A job no gang can hold says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_training_grid as tg
from typer.testing import CliRunner

from idlegrid.client.cli import app
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO
from idlegrid.core.market.auction import UNVERIFIED_SPEED
from idlegrid.core.market.hardware import BY_NAME
from idlegrid.core.planner.gang import GangPlan, plan_gang, step_seconds
from idlegrid.core.training.placement import job_order
from idlegrid.core.training.spec import JobSpec
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed.inprocess import device_offer, wait_until

pytest.importorskip("torch")

CHEAP, DEAR = 1 * MICRO, 3 * MICRO  # µcr per device-hour
SLOW, FAST = 0.001, 100.0  # Gbit/s
LATENCY_MS = 20.0  # the fast pair's one-way latency
GANG = {"trainer": True, "train_gang_host": "127.0.0.1", "train_gang_timeout_s": 10.0}


@pytest.fixture
def grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tg.Grid]:
    monkeypatch.setenv("IDLEGRID_TRAIN_CHALLENGE_S", "0.5")
    monkeypatch.setenv("IDLEGRID_TRAIN_PROBE_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRAIN_CLAIM_TIMEOUT_S", "5")
    g = tg.Grid(tmp_path)
    yield g
    g.stop()


def gang_agents(
    grid: tg.Grid,
    prices: dict[str, int],
    links: dict[frozenset[str], float],
    latency: dict[frozenset[str], float] | None = None,
) -> dict[str, str]:
    """Gang-capable trainers, each reporting its links (Gbit/s, ms) to the others (keys
    made ahead so they can name each other): node id by name."""
    keys = grid.settings.data_dir / "keys"
    keys.mkdir(exist_ok=True)
    ids = {n: NodeKey.load_or_create(keys / f"{n}.key").node_id for n in prices}

    def of(name: str, table: dict[frozenset[str], float]) -> dict[str, float]:
        return {ids[m]: v for pair, v in table.items() if name in pair for m in pair - {name}}

    for name, price in prices.items():
        grid.agent(
            name,
            key_dir=keys,
            links=of(name, links),
            link_latency_ms=of(name, latency or {}),
            **GANG,
            **device_offer(price),
        )
    return ids


def pair_cost(spec: dict[str, Any], price: int, gbps: float) -> float:
    """µcr of a 2-rank job on a pair at `price` each linked at `gbps`, by the planner's
    model with the book's speed of an unverified CPU."""
    order = job_order("j", 0, JobSpec.parse(spec), {}, 10.0)
    tflops = BY_NAME["CPU"].fp16_tflops * UNVERIFIED_SPEED
    step = step_seconds(dict(order.gang_shape), [tflops] * 2, [[1e6, gbps], [gbps, 1e6]])
    return 2 * price * step * spec["steps"] / 3600


@pytest.mark.slow
def test_a_gang_lands_on_the_fast_pair_not_the_cheaper_slow_one_and_each_member_is_paid(
    grid: tg.Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tg.spec(parallel=2)
    # The premise, by the same cost model: the cheap pair costs a third an hour, but its
    # gradient exchange over the slow link makes the whole job dearer.
    assert pair_cost(spec, CHEAP, SLOW) > pair_cost(spec, DEAR, FAST)
    fast_pair = frozenset(("fast-c", "fast-d"))
    ids = gang_agents(
        grid,
        {"cheap-a": CHEAP, "cheap-b": CHEAP, "fast-c": DEAR, "fast-d": DEAR},
        {frozenset(("cheap-a", "cheap-b")): SLOW, fast_pair: FAST},
        {fast_pair: LATENCY_MS},
    )
    grid.agent("verifier", train_verifier=True)
    # The slow link is acceptable to this consumer: both pairs are candidates.
    r = grid.submit({"spec": spec, "resources": {"min_link_gbps": SLOW}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = grid.wait_state(job_id, "done", 120)
    market = job["market"]
    fast = sorted([ids["fast-c"], ids["fast-d"]])
    assert market["providers"] == fast, market
    gang = market["placement"]["gang"]
    assert gang["layout"] == "data-parallel" and gang["data_parallel"] == 2
    assert [(m["rank"], m["stage"], m["shard"]) for m in gang["members"]] == [
        (0, 0, 0),
        (1, 0, 1),
    ]
    assert sorted(m["provider"] for m in gang["members"]) == fast
    assert all(m["unit_price"] == DEAR for m in gang["members"])
    # The planned step is the planner's, over the pair's reported bandwidth and latency.
    order = job_order("j", 0, JobSpec.parse(spec), {"min_link_gbps": SLOW}, 10.0)
    tflops = [BY_NAME["CPU"].fp16_tflops * UNVERIFIED_SPEED] * 2
    planned = plan_gang(
        dict(order.gang_shape),
        tflops,
        [[1e6, FAST], [FAST, 1e6]],
        [[0, LATENCY_MS], [LATENCY_MS, 0]],
    )
    assert isinstance(planned, GangPlan) and gang["step_s"] == pytest.approx(planned.step_s)
    assert gang["step_s"] > step_seconds(dict(order.gang_shape), tflops, [[1e6, FAST], [FAST, 1e6]])
    assert market["runs"].startswith("data-parallel over 2 providers")
    # The gang formed in the placement's rank order: rank 0 holds the job and commits.
    assigned = next(e for e in job["events"] if e["kind"] == "assigned")
    assert assigned["gang"] == [m["provider"] for m in gang["members"]]
    assert {s["provider"] for s in job["segments"]} == {gang["members"][0]["provider"]}
    # `idlegrid job` shows the gang by rank and what runs.
    monkeypatch.setenv("IDLEGRID_API_KEY", grid.auth["Authorization"][7:])
    cli = ["--coordinator", grid.coord.url, "--data-dir", str(tmp_path / "cli")]
    res = CliRunner().invoke(app, ["job", job_id, *cli], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    first, second = (m["provider"][:10] for m in gang["members"])
    assert f"placed as a gang (rank 0 {first}, rank 1 {second};" in res.stdout
    assert "runs: data-parallel over 2 providers" in res.stdout
    # Billing: per verified step, each segment split between the two members only; the
    # market order adds nothing (budget 0) and the cheap pair earned nothing.
    assert tg.seg_pays(job) == [8 * tg.PRICE] * 3
    assert job["bill"]["charged"] == 24 * tg.PRICE
    paid: dict[str, int] = {}
    for e in job["ledger"]:
        for p in e["postings"]:
            if p["account"].startswith("provider:") and e["key"].startswith("train-seg:"):
                paid[p["account"]] = paid.get(p["account"], 0) + p["amount"]
    assert set(paid) == {ledger.provider_account(n) for n in fast}
    a, b = paid.values()
    assert abs(a - b) <= 3  # the division's remainder goes to the committer
    bal = grid.balances()
    for name in ("cheap-a", "cheap-b"):
        assert bal.get(ledger.provider_account(ids[name]), 0) <= MICRO  # its mint, nothing more
    grid.check_books()


def test_gangs_that_cannot_form_say_why(grid: tg.Grid) -> None:
    ids = gang_agents(grid, {"a": CHEAP, "b": CHEAP}, {frozenset(("a", "b")): 0.5})
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balances()[consumer]

    # Links too slow: the only pair is linked at 0.5 Gbit/s, the job asks for 1 (default).
    r = grid.submit({"spec": tg.spec(parallel=2), "ref": "slow"})
    assert r.status_code == 201, r.text
    slow = r.json()
    assert slow["state"] == "queued" and slow["market"]["waiting"], slow["market"]
    assert slow["market"]["decisive"] == (
        "gang: links too slow: no 2 fitting providers all linked at >= 1 Gbit/s "
        "(fastest reported 0.5 Gbit/s, 0 of 1 pairs unreported)"
    )
    why = grid.http.get(f"/api/v1/orders/{slow['id']}:0/explain", headers=grid.auth).json()
    assert why["matches_now"] is False
    assert why["now"]["decisive"].startswith("gang: links too slow"), why

    # Over the ceiling: both fit, both above the consumer's price per device-hour.
    r = grid.submit({"spec": tg.spec(parallel=2), "ref": "dear", "resources": {"max_price": 0.5}})
    dear = r.json()
    assert dear["market"]["decisive"] == "max_price"
    reasons = [x["constraint"] for x in dear["market"]["reasons"]]
    assert "gang: over the ceiling: 2 providers needed, 0 of 2 fitting ones within max_price" in (
        reasons
    )

    # Not enough fitting offers: four ranks, two providers.
    r = grid.submit({"spec": tg.spec(parallel=4), "ref": "wide"})
    wide = r.json()
    assert wide["market"]["decisive"] == (
        "gang: not enough fitting offers: 4 providers needed, 2 fit"
    ), wide["market"]

    # Too big for every device: not split into pipeline stages, and it says so.
    big = {"arch": "gpt", "vocab": 256, "seq": 64, "layers": 48, "dim": 2048, "heads": 16}
    r = grid.submit({"spec": tg.spec(parallel=2, model=big), "ref": "big"})
    huge = r.json()
    assert huge["market"]["decisive"] == "vram_gb", huge["market"]
    assert any(
        x["constraint"].startswith(
            "vram_gb: no device holds the whole model, and a job is not split"
        )
        for x in huge["market"]["reasons"]
    )

    # Nothing runs and nothing is held: no gang member was assigned, only the escrow of
    # the three jobs left the consumer, and cancelling gives it all back.
    for job in (slow, dear, wide, huge):
        got = grid.job(job["id"])
        assert got["state"] == "queued" and not any(e["kind"] == "assigned" for e in got["events"])
    assert grid.balances()[consumer] == before - 4 * 24 * tg.PRICE
    assert all(grid.balances().get(f"stake:{n}:job-{slow['id']}", 0) == 0 for n in ids.values())
    for job in (slow, dear, wide, huge):
        assert grid.http.post(f"/api/v1/jobs/{job['id']}/cancel", headers=grid.auth).is_success
    assert grid.balances()[consumer] == before
    grid.check_books()


def test_a_gang_that_never_forms_holds_no_stake(grid: tg.Grid) -> None:
    keys = grid.settings.data_dir / "keys"
    keys.mkdir(exist_ok=True)
    ids = {n: NodeKey.load_or_create(keys / f"{n}.key").node_id for n in ("joins", "stays")}
    # "joins" can serve a gang; "stays" sells a device-hour and trains, but has no
    # rendezvous address, so it never joins: the market places both, the gang never forms.
    grid.agent("joins", key_dir=keys, links={ids["stays"]: 10.0}, **GANG, **device_offer(CHEAP))
    grid.agent(
        "stays", key_dir=keys, trainer=True, links={ids["joins"]: 10.0}, **device_offer(CHEAP)
    )
    job_id = grid.submit({"spec": tg.spec(parallel=2)}).json()["id"]
    # Placed once both offers are in the book (a market tick, if the second came late).
    wait_until(lambda: grid.job(job_id)["market"]["providers"] == sorted(ids.values()), 30)
    # The no-show names only the member that never came: the other was gathering.
    wait_until(lambda: any(e["kind"] == "no-show" for e in grid.job(job_id)["events"]), 30)
    job = grid.job(job_id)
    shows = [e for e in job["events"] if e["kind"] == "no-show"]
    assert [e["nodes"] for e in shows] == [[ids["stays"]]], shows
    assert job["state"] == "queued" and not any(e["kind"] == "assigned" for e in job["events"])
    bal = grid.balances()
    assert all(bal.get(f"stake:{n}:job-{job_id}", 0) == 0 for n in ids.values()), bal
    assert grid.http.post(f"/api/v1/jobs/{job_id}/cancel", headers=grid.auth).is_success
    grid.check_books()
