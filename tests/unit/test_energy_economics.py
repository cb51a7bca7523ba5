"""Energy and provider economics: units, periods, counters, marked estimates. Pure."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core import economics, energy, telemetry
from idlegrid.core.economics import CardSpec, Period, Prices
from idlegrid.core.energy import Attribution, CounterSample, Energy
from idlegrid.errors import InvalidRequest

DAY = 86_400.0


# ---- units ---------------------------------------------------------------------------


def test_one_kwh_is_3_6_megajoules_both_ways() -> None:
    assert energy.kwh(3_600_000) == 1.0
    assert energy.joules_of_kwh(0.5) == 1_800_000
    assert Energy(7_200_000).kwh == 2.0


def test_tokens_per_joule_refuses_to_divide_by_no_energy() -> None:
    assert energy.tokens_per_joule(380, 1000.0) == pytest.approx(0.38)
    assert energy.tokens_per_joule(10, 0.0) is None


def test_adding_an_estimate_marks_the_sum_estimated() -> None:
    measured = Energy(10.0)
    assert (measured + Energy(5.0)).estimated is False
    both = measured + Energy(5.0, estimated=True)
    assert both == Energy(15.0, estimated=True)
    assert energy.total([Energy(1.0), Energy(2.0, True), Energy(3.0)]) == Energy(6.0, True)
    assert energy.total([]) == Energy(0.0, False)


# ---- counters and power --------------------------------------------------------------


def test_counter_delta_handles_wrap_and_reset() -> None:
    assert energy.wrapped_delta(100.0, 250.0, None) == 150.0
    # RAPL wraps at max_energy_range_uj
    assert energy.wrapped_delta(990.0, 10.0, 1000.0) == 20.0
    # no wrap range known: a counter that went down was reset, counts from zero
    assert energy.wrapped_delta(990.0, 10.0, None) == 10.0


def test_trapezoid_integration_of_power_samples() -> None:
    # 100 W for 10 s then a ramp to 200 W over 10 s: 1000 J + 1500 J
    assert energy.integrate_power([(0, 100), (10, 100), (20, 200)]) == 2500.0
    assert energy.integrate_power([(5, 300)]) == 0.0
    with pytest.raises(InvalidRequest):
        energy.integrate_power([(10, 1), (5, 1)])


def test_energy_between_prorates_edges_and_survives_a_reset() -> None:
    samples = [
        CounterSample(0, 0),
        CounterSample(10, 1000),
        CounterSample(20, 1500),
        CounterSample(30, 200),
    ]  # reset between 20 and 30: 200 J since the restart
    assert energy.energy_between(samples, 0, 30) == Energy(1700.0)
    # half of the first interval (500 J) and half of the second (250 J)
    assert energy.energy_between(samples, 5, 15).joules == pytest.approx(750.0)
    assert energy.energy_between(samples, 40, 50) == Energy(0.0)
    est = [CounterSample(0, 0, estimated=True), CounterSample(10, 100, estimated=True)]
    assert energy.energy_between(est, 0, 10) == Energy(100.0, estimated=True)
    with pytest.raises(InvalidRequest):
        energy.energy_between(samples, 10, 5)


def test_attribution_splits_overlapping_requests_and_leaves_idle_energy_out() -> None:
    a = Attribution()
    a.start("x", 0.0)  # x alone from 0 to 100 J
    a.start("y", 100.0)  # x and y share 100..300 J
    assert a.finish("x", 300.0) == pytest.approx(100.0 + 100.0)
    a.advance(400.0)  # y alone: 100 J
    assert a.finish("y", 400.0) == pytest.approx(100.0 + 100.0)
    a.advance(1000.0)  # idle: nobody's
    a.start("z", 1000.0)
    assert a.finish("z", 1010.0) == pytest.approx(10.0)
    assert a.active == frozenset()


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=30), st.integers(1, 4))
def test_attribution_never_hands_out_more_than_the_counter_rose(
    steps: list[float], jobs: int
) -> None:
    readings = [sum(steps[: i + 1]) for i in range(len(steps))]
    a = Attribution()
    for j in range(jobs):
        a.start(f"j{j}", readings[0])
    for r in readings[1:-1]:
        a.advance(r)
    shares = [a.finish(f"j{j}", readings[-1]) for j in range(jobs)]
    assert sum(shares) == pytest.approx(readings[-1] - readings[0], rel=1e-9, abs=1e-6)


# ---- periods and durations -----------------------------------------------------------


def test_period_length_in_days_and_bad_periods_are_refused() -> None:
    assert Period(0, DAY / 2).days == 0.5
    assert Period(100, 160).seconds == 60
    for start, end in ((10, 10), (10, 5), (0, math.inf)):
        with pytest.raises(InvalidRequest):
            Period(start, end)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", DAY), ("7d", 7 * DAY), ("1w", 7 * DAY), ("15", 15)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert economics.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "0d", "abc", "nand"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(InvalidRequest):
        economics.parse_duration(text)


# ---- economics -----------------------------------------------------------------------


def test_report_per_day_from_a_two_day_period() -> None:
    # 10 credits and 2 kWh over two days, electricity 0.30/kWh, credit worth 1.5
    r = economics.report(
        10 * economics.MICRO,
        energy.joules_of_kwh(2.0),
        Period(0, 2 * DAY),
        Prices(kwh_price=0.30, credit_value=1.5, card_price=600.0),
    )
    assert r.earned_credits_per_day == pytest.approx(5.0)
    assert r.earned_per_day == pytest.approx(7.5)
    assert r.kwh_per_day == pytest.approx(1.0)
    assert r.electricity_per_day == pytest.approx(0.30)
    assert r.profit_per_day == pytest.approx(7.2)
    assert r.payback_days == pytest.approx(600 / 7.2)
    assert r.estimated is False


def test_payback_is_none_when_the_card_never_pays_for_itself() -> None:
    r = economics.report(
        1, energy.joules_of_kwh(10), Period(0, DAY), Prices(kwh_price=0.5, card_price=1000.0)
    )
    assert r.profit_per_day < 0
    assert r.payback_days is None
    assert economics.payback_days(None, 5.0) is None
    assert economics.payback_days(100.0, 0.0) is None
    assert economics.payback_days(100.0, 4.0) == 25.0


def test_report_carries_the_estimate_mark_from_its_energy() -> None:
    r = economics.report(0, 1.0, Period(0, DAY), Prices(), energy_estimated=True)
    assert r.estimated is True
    assert r.to_dict()["estimated"] is True


@pytest.mark.parametrize(
    "kwargs", [{"kwh_price": -1}, {"credit_value": math.nan}, {"card_price": -5.0}]
)
def test_prices_refuse_negative_or_nan(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest):
        Prices(**kwargs)


def test_estimate_for_a_card_from_market_price_and_measured_speed() -> None:
    # 100 tok/s busy half the day: 4.32M output tokens at 40 credits/1M = 172.8 credits,
    # minus a 2% fee = 169.344; 300 W busy + 50 W idle = 3.6 + 0.6 kWh at 0.25 = 1.05.
    card = CardSpec(decode_tps=100, serving_watts=300, idle_watts=50, utilisation=0.5)
    r = economics.estimate_card(
        card,
        output_price=40 * economics.MICRO,
        prompt_price=0,
        fee_bps=200,
        prices=Prices(kwh_price=0.25, card_price=1600),
    )
    assert r.estimated is True
    assert r.earned_credits_per_day == pytest.approx(169.344, abs=1e-6)
    assert r.kwh_per_day == pytest.approx(4.2)
    assert r.electricity_per_day == pytest.approx(1.05)
    assert r.payback_days == pytest.approx(1600 / (169.344 - 1.05), rel=1e-6)
    assert any("50%" in a for a in r.assumptions)


def test_estimate_bills_prompt_tokens_when_asked() -> None:
    base = CardSpec(decode_tps=10, serving_watts=0, utilisation=1.0)
    with_prompt = CardSpec(
        decode_tps=10, serving_watts=0, utilisation=1.0, prompt_tokens_per_output=4.0
    )
    a = economics.estimate_card(base, 1_000_000, 1_000_000, 0, Prices())
    b = economics.estimate_card(with_prompt, 1_000_000, 1_000_000, 0, Prices())
    assert b.earned_credits_per_day == pytest.approx(5 * a.earned_credits_per_day)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decode_tps": 0},
        {"decode_tps": -3},
        {"decode_tps": 1, "utilisation": 1.5},
        {"decode_tps": 1, "serving_watts": -1},
    ],
)
def test_card_spec_refuses_impossible_inputs(kwargs: dict[str, float]) -> None:
    kwargs.setdefault("serving_watts", 100)
    with pytest.raises(InvalidRequest):
        CardSpec(**kwargs)


# ---- dashboard summaries -------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert telemetry.percentile(xs, 50) == 2.5
    assert telemetry.percentile(xs, 0) == 1.0
    assert telemetry.percentile(xs, 100) == 4.0
    assert telemetry.percentile([], 50) is None
    with pytest.raises(InvalidRequest):
        telemetry.percentile(xs, 101)


def test_buckets_keep_empty_periods_and_drop_points_outside() -> None:
    starts, sums = telemetry.buckets([(0, 1), (0.5, 2), (2.5, 4), (9, 100), (-1, 7)], 0, 3, 1)
    assert starts == [0, 1, 2]
    assert sums == [3, 0, 4]
    _, means = telemetry.bucket_mean([(0, 10), (0.2, 20), (2.1, 5)], 0, 3, 1)
    assert means == [15, None, 5]


def test_accounts_grouped_by_kind_and_provider_money_split() -> None:
    balances = {
        "consumer:k1": 50,
        "consumer:k2": 5,
        "provider:n1": 7,
        "accrual:n1": 3,
        "system:fees": 1,
        "system:issuer": -66,
    }
    assert telemetry.totals_by_kind(balances) == {
        "consumer": 55,
        "provider": 7,
        "accrual": 3,
        "system": -65,
    }
    assert telemetry.provider_money(balances, "n1") == {"accrued": 3, "paid": 7}
    assert telemetry.account_kind("weird") == "other"
