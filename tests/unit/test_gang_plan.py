"""Gangs of a multi-provider training job (core/planner/gang.plan_gang, core/market/gangs.py
and the auction's gang path): the layout, who runs what, all-or-nothing and why no gang
formed. Pure, no server."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core.ledger import MICRO
from idlegrid.core.market.auction import Book, Placement, Unmatched
from idlegrid.core.market.hardware import Device, Hardware
from idlegrid.core.market.offers import Offer
from idlegrid.core.market.orders import Order, parse_order
from idlegrid.core.planner.gang import GangPlan, NoLayout, layouts, plan_gang, step_seconds
from idlegrid.core.training.placement import job_order
from idlegrid.core.training.spec import JobSpec

SHA = "ab" * 32
WIDE = {"layers": 4, "hidden": 512, "seq": 64, "batch": 16, "params": 13e6, "steps": 100}


def cpu(provider: str, price_cr: float, vram_gb: float = 8.0) -> Offer:
    dev = Device("CPU", 1, vram_gb)
    hw = Hardware(provider, "local", (dev,), cpus=4, ram_gb=16, reliability=0.95)
    return Offer(f"{provider}/CPU", hw, dev, round(price_cr * MICRO), {}, None, True)


def gang_job(parallel: int = 2, **resources: Any) -> Order:
    spec = JobSpec.parse(
        {
            "dataset": {"sha256": SHA},
            "steps": 100,
            "model": {"layers": 4, "dim": 512, "heads": 8},
            "parallel": parallel,
            "batch_size": 16,
        }
    )
    return job_order("j", 0, spec, resources, 10.0)


def full(n: int, gbps: float) -> list[list[float]]:
    return [[1e6 if i == j else gbps for j in range(n)] for i in range(n)]


def test_one_stage_is_the_data_parallel_step_and_the_layouts_cover_the_members() -> None:
    plan = plan_gang(WIDE, [1.0, 1.0], full(2, 10.0))
    assert isinstance(plan, GangPlan) and (plan.stages, plan.data_parallel) == (1, 2)
    assert plan.layout == "data-parallel"
    assert plan.step_s == step_seconds(WIDE, [1.0, 1.0], full(2, 10.0))
    assert [(m.index, m.stage, m.shard) for m in plan.members] == [(0, 0, 0), (1, 0, 1)]
    assert layouts(4, layers=4, max_stages=4) == [(1, 4), (2, 2), (4, 1)]
    assert layouts(4, layers=1, max_stages=4) == [(1, 4)]  # a stage holds whole layers
    assert layouts(6, layers=8, max_stages=2) == [(1, 6), (2, 3)]


def test_latency_slows_a_step() -> None:
    fast = plan_gang(WIDE, [1.0, 1.0], full(2, 10.0), [[0, 0], [0, 0]])
    slow = plan_gang(WIDE, [1.0, 1.0], full(2, 10.0), [[0, 80], [80, 0]])
    assert isinstance(fast, GangPlan) and isinstance(slow, GangPlan)
    assert slow.step_s > fast.step_s


def test_memory_decides_between_replicas_and_pipeline_stages() -> None:
    # A pipeline moves activations, data parallelism whole gradients: with memory to hold
    # the model on each member the planner still may prefer either; when it does not fit,
    # only stages are left.
    big = {**WIDE, "params": 1e9, "layers": 8}
    tight = plan_gang(big, [1.0, 1.0], full(2, 10.0), None, [9.0, 9.0], max_stages=2)
    assert isinstance(tight, GangPlan) and (tight.stages, tight.data_parallel) == (2, 1)
    assert tight.layout == "pipeline"
    assert sorted(m.stage for m in tight.members) == [0, 1]
    # Without stages allowed it cannot run, and says what a member would need.
    flat = plan_gang(big, [1.0, 1.0], full(2, 10.0), None, [9.0, 9.0], max_stages=1)
    assert isinstance(flat, NoLayout) and "1-stage layout needs" in flat.reason
    # Too small even split in two.
    tiny = plan_gang(big, [1.0, 1.0], full(2, 10.0), None, [1.0, 1.0], max_stages=2)
    assert isinstance(tiny, NoLayout) and "2-stage layout needs" in tiny.reason


def test_stages_are_arranged_over_the_fast_links() -> None:
    # Four members, two stages of two replicas. 0-1 and 2-3 are fast, the rest slow: a
    # stage's replicas exchange whole gradients, so each stage's group should be a fast pair.
    big = {**WIDE, "params": 2e8, "layers": 8, "batch": 4}
    bw = full(4, 0.05)
    for a, b in ((0, 1), (2, 3)):
        bw[a][b] = bw[b][a] = 100.0
    plan = plan_gang(big, [1.0] * 4, bw, None, [4.0] * 4, max_stages=2)
    assert isinstance(plan, GangPlan) and (plan.stages, plan.data_parallel) == (2, 2), plan
    groups = {frozenset(m.index for m in plan.members if m.stage == j) for j in (0, 1)}
    assert groups == {frozenset({0, 1}), frozenset({2, 3})}
    # ... and that arrangement beats the others by the cost model's own numbers.
    worse = plan_gang(big, [1.0] * 4, full(4, 0.05), None, [4.0] * 4, max_stages=2)
    assert isinstance(worse, GangPlan) and worse.step_s > plan.step_s


def test_the_placement_records_every_member_and_its_part() -> None:
    offers = [cpu("a", 1), cpu("b", 1), cpu("c", 2), cpu("d", 2)]
    links = {frozenset(("a", "b")): 1.5, frozenset(("c", "d")): 100.0}
    placed = Book(offers, links).match(gang_job())
    assert isinstance(placed, Placement) and placed.providers == ["c", "d"], placed
    gang = placed.gang
    assert gang is not None and gang["layout"] == "data-parallel"
    assert (gang["stages"], gang["data_parallel"]) == (1, 2)
    members = gang["members"]
    assert [m["rank"] for m in members] == [0, 1] and [m["shard"] for m in members] == [0, 1]
    assert sorted(m["provider"] for m in members) == ["c", "d"]
    assert all(m["stage"] == 0 and m["unit_price"] == 2 * MICRO for m in members)
    assert placed.runtime_h * 3600 / 100 == pytest.approx(gang["step_s"])
    assert placed.to_dict()["gang"] == gang
    # A single-provider placement carries no gang.
    one = Book(offers).match(
        job_order("k", 0, JobSpec.parse({"dataset": {"sha256": SHA}, "steps": 10}), {}, 9)
    )
    assert isinstance(one, Placement) and one.gang is None and "gang" not in one.to_dict()


def test_explain_says_why_no_gang_formed() -> None:
    linked = {frozenset(("a", "b")): 10.0, frozenset(("a", "c")): 10.0}

    def why(offers: list[Offer], order: Order, links: Any = None) -> str:
        r = Book(offers, links if links is not None else linked).match(order)
        assert isinstance(r, Unmatched), r
        return r.decisive

    # Not enough fitting offers: one provider fits a 2-provider job.
    assert why([cpu("a", 1), cpu("b", 1, vram_gb=0.0001)], gang_job()) == (
        "gang: not enough fitting offers: 2 providers needed, 1 fit"
    )
    # Over the ceiling: two fit, one of them above max_price.
    assert why([cpu("a", 1), cpu("b", 5)], gang_job(max_price=2)) == (
        "gang: over the ceiling: 2 providers needed, 1 of 2 fitting ones within max_price"
    )
    # Both over: max_price removed every offer, and the gang reason says so too.
    r = Book([cpu("a", 5), cpu("b", 5)], linked).match(gang_job(max_price=2))
    assert isinstance(r, Unmatched) and r.decisive == "max_price"
    assert any(x.constraint.startswith("gang: over the ceiling") for x in r.reasons)
    # Links unknown: nobody reported any.
    assert why([cpu("a", 1), cpu("b", 1)], gang_job(), {}).startswith("gang: links unknown")
    # Links too slow: reported, below min_link_gbps.
    slow = why([cpu("a", 1), cpu("b", 1)], gang_job(min_link_gbps=20), linked)
    assert slow == (
        "gang: links too slow: no 2 fitting providers all linked at >= 20 Gbit/s "
        "(fastest reported 10 Gbit/s, 0 of 1 pairs unreported)"
    )
    # Three providers, but b and c are not linked: no gang of three.
    three = why([cpu("a", 1), cpu("b", 1), cpu("c", 1)], gang_job(parallel=4), linked)
    assert three == "gang: not enough fitting offers: 4 providers needed, 3 fit"


OFFERS = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 6), st.sampled_from([True, True, False])),
    min_size=0,
    max_size=8,
    unique_by=lambda t: t[0],
)
PAIRS = list(itertools.combinations("abcdefgh", 2))
# Every pair of providers: unreported (None) or a reported link.
LINKS = st.lists(
    st.sampled_from([None, 0.1, 0.5, 1.0, 10.0, 100.0]), min_size=len(PAIRS), max_size=len(PAIRS)
).map(lambda bws: {p: bw for p, bw in zip(PAIRS, bws, strict=True) if bw is not None})


@settings(max_examples=200, deadline=None)
@given(OFFERS, LINKS, st.sampled_from([2, 4]), st.integers(1, 6), st.sampled_from([0.5, 1.0]))
def test_a_gang_is_all_or_nothing_within_the_ceiling_and_never_larger_than_the_offers(
    raw: list[tuple[str, int, bool]],
    raw_links: dict[tuple[str, str], float],
    parallel: int,
    ceiling: int,
    min_link: float,
) -> None:
    offers = [cpu(p, price, vram_gb=8.0 if fits else 0.0001) for p, price, fits in raw]
    links = {frozenset(k): v for k, v in raw_links.items()}
    order = gang_job(parallel, max_price=ceiling, min_link_gbps=min_link)
    book = Book(offers, links)
    free = book.free.copy()
    (r,) = book.clear([order])
    if isinstance(r, Unmatched):
        assert r.decisive and (book.free == free).all()  # nothing held
        return
    providers = [leg.provider for leg in r.legs]
    assert len(r.legs) == parallel == len(set(providers)) <= len(offers)
    assert all(leg.devices == 1 and leg.unit_price <= ceiling * MICRO for leg in r.legs)
    assert all(
        links.get(frozenset(p), 0.0) >= min_link for p in itertools.combinations(providers, 2)
    )
    assert r.gang is not None and len(r.gang["members"]) == parallel
    assert sorted(m["provider"] for m in r.gang["members"]) == sorted(providers)
    assert int((free - book.free).sum()) == parallel  # exactly the gang's devices taken
    # No cheaper-planned complete gang was missed among the fitting, linked offers of
    # this size (the greedy search is exact for 2 members).
    if parallel == 2:
        fit = {p: price for p, price, ok in raw if ok and price <= ceiling}
        for a, b in itertools.combinations(sorted(fit), 2):
            if links.get(frozenset((a, b)), 0.0) >= min_link:
                bw = full(2, links[frozenset((a, b))])
                t = step_seconds(dict(order.gang_shape), [0.8, 0.8], bw)
                assert (fit[a] + fit[b]) * t >= sum(
                    m["unit_price"] for m in r.gang["members"]
                ) / MICRO * r.gang["step_s"] * (1 - 1e-9)


def test_a_book_with_latency_plans_slower_steps_and_agents_report_it_in_bounds() -> None:
    from pydantic import ValidationError

    from idlegrid.protocol.messages import RegisterMsg

    offers = [cpu("c", 2), cpu("d", 2)]
    links = {frozenset(("c", "d")): 100.0}
    near = Book(offers, links).match(gang_job())
    far = Book(offers, links, {frozenset(("c", "d")): 50.0}).match(gang_job())
    assert isinstance(near, Placement) and isinstance(far, Placement)
    assert near.gang is not None and far.gang is not None
    assert far.gang["step_s"] > near.gang["step_s"] and far.cost > near.cost
    base: dict[str, Any] = {
        "protocol_version": 1,
        "name": "n",
        "hardware": {},
        "engine": {},
        "slots": 1,
        "prefill_tps": 1.0,
        "decode_tps": 1.0,
        "offers": [{"model": "m", "prompt_price": 0, "output_price": 0}],
    }
    assert RegisterMsg(**base, link_latency_ms={"peer": 12.5}).link_latency_ms == {"peer": 12.5}
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ValidationError):
            RegisterMsg(**base, link_latency_ms={"peer": bad})
    assert RegisterMsg(**base, links={"peer": 10.0}).links == {"peer": 10.0}
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e9):  # a link is some real bandwidth
        with pytest.raises(ValidationError):
            RegisterMsg(**base, links={"peer": bad})


def test_a_job_too_big_for_every_device_says_it_is_not_split_into_stages() -> None:
    huge = JobSpec.parse(
        {
            "dataset": {"sha256": SHA},
            "steps": 10,
            "model": {"layers": 48, "dim": 2048, "heads": 16},
            "parallel": 2,
            "batch_size": 16,
        }
    )
    r = Book([cpu("a", 1), cpu("b", 1)], {frozenset(("a", "b")): 10.0}).match(
        job_order("j", 0, huge, {}, 10.0)
    )
    assert isinstance(r, Unmatched) and r.decisive == "vram_gb"
    assert r.reasons[-1].constraint.startswith("vram_gb: no device holds the whole model")
    # An ordinary order short of memory gets no such note.
    lease = parse_order(
        {"id": "l", "kind": "lease", "hours": 1, "resources": {"vram_gb": ">=80", "max_price": 9}}
    )
    plain = Book([cpu("a", 1)]).match(lease)
    assert isinstance(plain, Unmatched) and plain.reasons[-1].constraint == "vram_gb"
