"""The lease lifecycle by cause: every cause from every state moves as the table says or
raises with its data; billing counts `running` only, floored once, within one second."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.lease.lifecycle import (
    LEASE,
    LeaseCause,
    LeaseState,
    Transition,
    advance,
    billable_seconds,
    replay,
    running_seconds,
)
from idlegrid.errors import IllegalTransition

# Every (state, cause) that is allowed, and where it leads, written out by hand once more.
EXPECTED = {
    ("pending", "placed"): "provisioning",
    ("pending", "no-provider"): "failed",
    ("pending", "hw-unproven"): "failed",
    ("pending", "cancel"): "ended",
    ("pending", "provider-lost"): "failed",
    ("provisioning", "hw-unproven"): "ending",
    ("running", "hw-unproven"): "ending",
    ("provisioning", "provisioned"): "running",
    ("provisioning", "provisioning-failed"): "failed",
    ("provisioning", "provider-lost"): "failed",
    ("provisioning", "cancel"): "ending",
    ("running", "end"): "ending",
    ("running", "expired"): "ending",
    ("running", "provider-lost"): "failed",
    ("ending", "wiped"): "ended",
    ("ending", "provider-lost"): "failed",
}


@pytest.mark.parametrize("state", list(LeaseState))
@pytest.mark.parametrize("cause", list(LeaseCause))
def test_every_cause_from_every_state_moves_as_listed_or_raises(
    state: LeaseState, cause: LeaseCause
) -> None:
    want = EXPECTED.get((state.value, cause.value))
    if want is not None:
        got = advance(state, cause, key="L1")
        assert got == want and type(got) is str
        assert LEASE.allowed(state, got)
        return
    with pytest.raises(IllegalTransition) as err:
        advance(state, cause, key="L1", story=("placed",))
    e = err.value
    assert (e.kind, e.key, e.src, e.dst) == ("lease", "L1", state.value, f"({cause.value})")
    assert e.story == ("placed", cause.value)


def test_an_unknown_cause_or_state_is_an_illegal_move_not_a_crash() -> None:
    with pytest.raises(IllegalTransition):
        advance("running", "teleported")
    with pytest.raises(IllegalTransition):
        advance("paused", "end")


def _history(*steps: tuple[float, str, str]) -> list[Transition]:
    return [Transition(at, state, cause) for at, state, cause in steps]


HAPPY = _history(
    (0.0, "pending", "created"),
    (2.0, "provisioning", "placed"),
    (9.5, "running", "provisioned"),
    (3609.5, "ending", "end"),
    (3612.0, "ended", "wiped"),
)


def test_provisioning_and_ending_are_not_billed() -> None:
    assert replay(HAPPY, key="L") == "ended"
    assert running_seconds(HAPPY) == 3600.0
    assert billable_seconds(HAPPY) == 3600


def test_a_lease_still_running_is_billed_up_to_now_and_needs_now() -> None:
    live = HAPPY[:3]
    assert billable_seconds(live, now=19.4) == 9  # 9.9 s floored
    assert billable_seconds(live, now=5.0) == 0  # a clock behind the move bills nothing
    with pytest.raises(ValueError, match="now"):
        billable_seconds(live)


def test_a_lost_provider_stops_the_bill_at_the_moment_it_was_lost() -> None:
    lost = [*HAPPY[:3], Transition(100.25, "failed", "provider-lost")]
    assert replay(lost) == "failed"
    assert billable_seconds(lost, now=1e9) == 90


def test_a_lease_that_never_ran_bills_nothing() -> None:
    failed = [*HAPPY[:2], Transition(60.0, "failed", "provisioning-failed")]
    canceled = [HAPPY[0], Transition(1.0, "ended", "cancel")]
    assert billable_seconds(failed) == 0 and billable_seconds(canceled) == 0


def test_a_history_that_breaks_the_table_or_time_is_refused() -> None:
    with pytest.raises(IllegalTransition):  # skips provisioning
        replay(_history((0, "pending", "created"), (1, "running", "provisioned")))
    with pytest.raises(IllegalTransition):  # the cause leads elsewhere than recorded
        replay(_history((0, "pending", "created"), (1, "ended", "placed")))
    with pytest.raises(IllegalTransition):  # does not start pending
        replay(_history((0, "running", "created")))
    with pytest.raises(ValueError, match="precedes"):
        replay(_history((5, "pending", "created"), (1, "provisioning", "placed")))
    with pytest.raises(ValueError):
        replay([])


@given(
    st.lists(st.floats(min_value=0.0, max_value=1e5, allow_nan=False), min_size=4, max_size=4),
)
def test_billing_is_within_one_second_of_the_time_running_and_never_above(
    gaps: list[float],
) -> None:
    t0, t1, t2, t3 = (sum(gaps[: i + 1]) for i in range(4))
    history = _history(
        (t0, "pending", "created"),
        (t1, "provisioning", "placed"),
        (t2, "running", "provisioned"),
        (t3, "ending", "expired"),
        (t3 + 1.0, "ended", "wiped"),
    )
    exact = t3 - t2
    billed = billable_seconds(history)
    assert billed <= exact + 1e-6 and exact - billed < 1.0
    assert billed == math.floor(running_seconds(history))
