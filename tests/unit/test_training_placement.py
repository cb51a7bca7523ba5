"""A training job as a market order (core/training/placement.py and the job fields of
core/market/orders.py and auction.py): pure, no server."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.ledger import MICRO
from idlegrid.core.market.auction import Book, Placement, Unmatched
from idlegrid.core.market.hardware import Device, Hardware
from idlegrid.core.market.offers import Offer
from idlegrid.core.market.orders import OrderKind, parse_order
from idlegrid.core.planner.gang import step_seconds
from idlegrid.core.training.placement import job_order, memory_gb, work_pflop
from idlegrid.core.training.spec import JobSpec
from idlegrid.errors import InvalidRequest

SHA = "ab" * 32


def job(**over: Any) -> JobSpec:
    raw: dict[str, Any] = {"dataset": {"sha256": SHA}, "steps": 100, **over}
    return JobSpec.parse(raw)


def cpu(
    provider: str, price_cr: float, vram_gb: float = 8.0, staked: bool = True, count: int = 1
) -> Offer:
    dev = Device("CPU", count, vram_gb)
    hw = Hardware(provider, "local", (dev,), cpus=4, ram_gb=16, reliability=0.95)
    return Offer(f"{provider}/CPU", hw, dev, round(price_cr * MICRO), {}, None, staked)


def test_memory_grows_with_the_model_and_adamw_costs_more_than_sgd() -> None:
    small = job()
    wide = job(model={"dim": 512, "heads": 8})
    assert 0 < memory_gb(small) < memory_gb(wide)
    assert memory_gb(job(optimizer={"name": "sgd"})) < memory_gb(small)
    # Weights, gradients and AdamW's two moments: 16 bytes a parameter at least.
    huge = job(model={"layers": 48, "dim": 2048, "heads": 16})
    assert memory_gb(huge) >= huge.model.params * 16 / 1e9 > 30


@given(st.integers(1, 4), st.sampled_from([1, 2, 4]))
def test_data_parallel_ranks_hold_a_share_of_the_batch_not_of_the_model(
    layers: int, parallel: int
) -> None:
    one = job(model={"layers": layers}, batch_size=8)
    split = job(model={"layers": layers}, batch_size=8, parallel=parallel)
    assert memory_gb(split) <= memory_gb(one)
    assert memory_gb(split) >= split.model.params * 16 / 1e9


def test_work_is_six_flop_per_parameter_and_token() -> None:
    s = job(steps=10, batch_size=4)
    assert work_pflop(s) == pytest.approx(6 * s.model.params * 4 * 64 * 10 / 1e15)


def test_the_order_asks_for_the_jobs_devices_memory_and_ceiling_and_costs_nothing() -> None:
    s = job(parallel=2, batch_size=16)
    o = job_order("job-1", 3, s, {"reliability": ">=0.9"}, 7.5, frozenset({"bad"}))
    assert (o.id, o.kind, o.job, o.avoid) == ("job-1:3", OrderKind.TRAINING, "job-1", {"bad"})
    assert o.devices == 2 and o.max_price == 7.5 * MICRO
    assert o.vram_need_gb >= memory_gb(s) * 0.999
    assert o.budget() == 0  # billed per verified step by the training domain
    assert o.work_pflop == pytest.approx(work_pflop(s))
    # The stored body reads back as the same order (the market's tick re-parses it).
    again = parse_order(o.to_dict(), internal=True)
    assert (again.job, again.avoid, again.devices, again.max_price) == (
        o.job,
        o.avoid,
        o.devices,
        o.max_price,
    )
    # A consumer's own lower bound wins when it is above the job's need.
    assert job_order("j", 0, s, {"vram_gb": ">=24"}, 1.0).vram_need_gb == 24


@pytest.mark.parametrize(
    ("resources", "param"),
    [
        ({"max_price": 0}, "resources.max_price"),
        ({"max_price": "x"}, "resources.max_price"),
        ({"count": 3}, "resources.count"),
        ({"vram_gb": "<16"}, "resources.vram_gb"),
        ({"vram_gb": "lots"}, "resources.vram_gb"),
        ({"speed": 1}, "resources.speed"),
        ([1], "resources"),
    ],
)
def test_bad_resources_name_their_field(resources: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        job_order("j", 0, job(), resources, 1.0)
    assert err.value.param == param


def test_job_fields_are_refused_from_public_orders() -> None:
    body = {"id": "o", "kind": "training", "hours": 1, "resources": {"max_price": 1}}
    for extra in ({"job": "job-x"}, {"avoid": ["n"]}):
        with pytest.raises(InvalidRequest) as err:
            parse_order({**body, **extra})
        assert err.value.param == next(iter(extra))
    with pytest.raises(InvalidRequest) as err:
        parse_order({**body, "kind": "lease", "job": "job-x"}, internal=True)
    assert err.value.param == "job"
    assert parse_order(body).budget() == MICRO  # an ordinary training order still prepays


def test_the_book_places_a_job_on_the_cheapest_fitting_offer_and_says_why_not() -> None:
    s = job()
    book = Book([cpu("dear", 3), cpu("small", 0.5, vram_gb=1e-5), cpu("cheap", 1)])
    placed = book.match(job_order("j", 0, s, {}, 10.0))
    assert isinstance(placed, Placement) and placed.providers == ["cheap"]
    # Avoided providers are filtered with a reason of their own.
    avoided = book.match(job_order("j", 1, s, {}, 10.0, frozenset({"cheap", "dear"})))
    assert isinstance(avoided, Unmatched) and avoided.decisive == "excluded from the job"
    low = book.match(job_order("j", 2, s, {"max_price": 0.9}, 10.0))
    assert isinstance(low, Unmatched) and low.decisive == "max_price"
    huge = job(model={"layers": 48, "dim": 2048, "heads": 16})
    big = book.match(job_order("j", 3, huge, {}, 10.0))
    assert isinstance(big, Unmatched) and big.decisive == "vram_gb"
    unstaked = Book([cpu("a", 1, staked=False)]).match(job_order("j", 4, s, {}, 10.0))
    assert isinstance(unstaked, Unmatched) and unstaked.decisive == "stake"


def test_a_data_parallel_job_is_a_gang_of_linked_providers_one_rank_each() -> None:
    s = job(parallel=2, batch_size=16)
    offers = [cpu("two", 0.1, count=2), cpu("b", 2), cpu("c", 1), cpu("d", 1.5)]
    # Only b-c and c-d are linked well enough; "two" is cheapest but one node is one rank.
    links = {frozenset(("b", "c")): 10.0, frozenset(("c", "d")): 0.5}
    placed = Book(offers, links).match(job_order("j", 0, s, {}, 10.0))
    assert isinstance(placed, Placement), placed
    assert placed.providers == ["b", "c"] and [leg.devices for leg in placed.legs] == [1, 1]
    # Accepting slower links adds c-d as a candidate, but the planner's cost model sees
    # its gradient exchange take longer than it saves: b-c still wins.
    slow = Book(offers, links).match(job_order("j", 1, s, {"min_link_gbps": 0.5}, 10.0))
    assert isinstance(slow, Placement) and slow.providers == ["b", "c"]
    # Links nobody reported are no links: no gang, and the reason says so.
    none = Book(offers).match(job_order("j", 2, s, {}, 10.0))
    assert isinstance(none, Unmatched) and none.decisive.startswith("gang: links unknown")
    # An ordinary two-device order still takes both devices of one provider.
    lease = parse_order(
        {"id": "l", "kind": "lease", "hours": 1, "resources": {"count": 2, "max_price": 9}}
    )
    whole = Book(offers).match(lease)
    assert isinstance(whole, Placement) and whole.providers == ["two"]


def test_the_planner_prices_gangs_so_fast_links_beat_a_cheaper_slow_pair() -> None:
    offers = [cpu("a", 1), cpu("b", 1), cpu("c", 2), cpu("d", 2)]
    links = {frozenset(("a", "b")): 1.5, frozenset(("c", "d")): 100.0}
    # 13M parameters: 50 MB of gradients a step, little compute per byte exchanged.
    wide = job(model={"layers": 4, "dim": 512, "heads": 8}, parallel=2, batch_size=16)
    placed = Book(offers, links).match(job_order("j", 0, wide, {}, 10.0))
    assert isinstance(placed, Placement) and placed.providers == ["c", "d"], placed
    slow = step_seconds(
        dict(job_order("j", 0, wide, {}, 10.0).gang_shape), [0.8, 0.8], [[1e6, 1.5], [1.5, 1e6]]
    )
    assert placed.runtime_h == pytest.approx(
        step_seconds(
            dict(job_order("j", 0, wide, {}, 10.0).gang_shape),
            [0.8, 0.8],
            [[1e6, 100.0], [100.0, 1e6]],
        )
        * wide.steps
        / 3600
    )
    assert slow > 2 * placed.runtime_h * 3600 / wide.steps  # why the dearer pair won
    # A small model exchanges little: the cheaper pair wins on price.
    small = job(model={"layers": 1, "dim": 32, "heads": 2, "seq": 256}, parallel=2, batch_size=64)
    cheap = Book(offers, links).match(job_order("j", 1, small, {}, 10.0))
    assert isinstance(cheap, Placement) and cheap.providers == ["a", "b"], cheap


def test_a_steps_time_falls_with_bandwidth_towards_the_compute_alone() -> None:
    shape = dict(job_order("j", 0, job(parallel=2, batch_size=16), {}, 1.0).gang_shape)
    times = [step_seconds(shape, [1.0, 1.0], [[1e9, g], [g, 1e9]]) for g in (0.1, 1, 10, 1e6)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1] > 0
    # A slower rank paces the step.
    assert step_seconds(shape, [1.0, 0.5], [[1e9, 1e6], [1e6, 1e9]]) > times[-1]
