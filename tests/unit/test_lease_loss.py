"""Pure rules of lost leases: the restart of their unused hours, the order flag, the carry."""

from __future__ import annotations

import pytest

from idlegrid.core.lease.loss import MAX_RESTARTS, hours_to_restart
from idlegrid.core.ledger import order_escrow_account
from idlegrid.core.market import settlement
from idlegrid.core.market.orders import parse_order
from idlegrid.errors import InvalidRequest, LedgerError

LEASE = {"id": "L", "kind": "lease", "hours": 2, "resources": {"max_price": 1.0}}


def test_a_restart_buys_the_hours_paid_and_not_billed() -> None:
    assert hours_to_restart(2.0, 1800, 0) == pytest.approx(1.5)
    assert hours_to_restart(2.0, 0, MAX_RESTARTS - 1) == 2.0
    assert hours_to_restart(2.0, 0, MAX_RESTARTS) is None  # a chain stops
    assert hours_to_restart(1.0, 3600, 0) is None  # nothing left
    assert hours_to_restart(1.0, 3599, 0) == pytest.approx(1 / 3600)


def test_restart_on_loss_is_a_lease_order_flag_that_round_trips() -> None:
    order = parse_order({**LEASE, "restart_on_loss": True})
    assert order.restart_on_loss and order.to_dict()["restart_on_loss"] is True
    assert parse_order(order.to_dict()) == order
    assert "restart_on_loss" not in parse_order(LEASE).to_dict()
    with pytest.raises(InvalidRequest) as bad:
        parse_order({**LEASE, "restart_on_loss": "yes"})
    assert bad.value.param == "restart_on_loss"
    with pytest.raises(InvalidRequest) as bad:
        parse_order({**LEASE, "kind": "training", "restart_on_loss": True})
    assert bad.value.param == "restart_on_loss"


def test_a_restarted_lease_avoids_the_lost_provider_and_consumers_cannot_ask_it() -> None:
    order = parse_order({**LEASE, "avoid": ["n1"]}, internal=True)
    assert order.avoid == frozenset({"n1"})
    assert order.to_dict()["avoid"] == ["n1"]
    with pytest.raises(InvalidRequest) as bad:
        parse_order({**LEASE, "avoid": ["n1"]})
    assert bad.value.param == "avoid"


def test_carry_moves_escrow_from_the_lost_order_to_its_restart() -> None:
    entry = settlement.carry("L", "L2", 700)
    assert {p.account: p.amount for p in entry.postings} == {
        order_escrow_account("L"): -700,
        order_escrow_account("L2"): 700,
    }
    assert (entry.cause.kind, entry.cause.id, entry.memo) == ("order", "L", "lease-restart")
    with pytest.raises(LedgerError):
        settlement.carry("L", "L2", 0)


def test_a_lost_lease_weighs_on_reliability_and_hours_leased_well_lift_it() -> None:
    from idlegrid.core.lease.loss import LOSS_WEIGHT, lease_trials

    assert lease_trials(2.5 * 3600, lost=False) == (2, 2)
    assert lease_trials(2.5 * 3600, lost=True) == (2, 2 + LOSS_WEIGHT)
    assert lease_trials(10, lost=True) == (0, LOSS_WEIGHT)
    # A newcomer (prior 19 of 20) losing its first lease drops below a 0.95 filter.
    good, total = lease_trials(10, lost=True)
    assert (19 + good) / (20 + total) == pytest.approx(0.76)


def test_the_stake_slo_forgives_one_loss_plus_one_per_hundred_leased_hours() -> None:
    from idlegrid.core.lease.loss import PENALTY_HOURS, allowed_losses, loss_penalty

    assert allowed_losses(0) == 1 and allowed_losses(250) == 3.5
    assert loss_penalty(1, 0, 1000, 10**9) == 0  # the first loss in a window is free
    assert loss_penalty(2, 0, 1000, 10**9) == PENALTY_HOURS * 1000
    assert loss_penalty(2, 100, 1000, 10**9) == 0  # 100 leased hours earn a second
    assert loss_penalty(3, 100, 1000, 10**9) == PENALTY_HOURS * 1000
    assert loss_penalty(5, 0, 1000, 500) == 500  # never more than is staked
    assert loss_penalty(5, 0, 1000, 0) == 0


def test_a_lease_starts_on_passed_proofs_waits_on_open_ones_and_fails_on_failed_ones() -> None:
    from idlegrid.core.lease.proofs import Gate, ProofSeen, proof_gate

    mm, mem = ProofSeen("m1", "matmul", "passed", 5), ProofSeen("r1", "memory", "passed", 6)
    assert proof_gate([]) == (Gate.GO, (), "")  # proofs off: nothing to rest on
    assert proof_gate([mm, mem]) == (Gate.GO, ("m1", "r1"), "")
    gate, ids, why = proof_gate([mm, ProofSeen("r2", "memory", "started", 0)])
    assert (gate, ids) == (Gate.WAIT, ()) and "memory" in why
    gate, _, why = proof_gate([ProofSeen("m2", "matmul", "failed", 7), mem])
    assert gate is Gate.FAIL and "m2 failed" in why
    gate, _, why = proof_gate([ProofSeen("m3", "matmul", "expired", 7), mem])
    assert gate is Gate.FAIL and "never answered" in why
    # The latest judged proof of a kind decides: a re-check that passed after a failure.
    later = ProofSeen("m4", "matmul", "passed", 9)
    assert proof_gate([ProofSeen("m2", "matmul", "failed", 7), later, mem])[0] is Gate.GO
    # An older pass with a fresh proof in flight starts on the pass (a re-registration).
    assert proof_gate([mm, mem, ProofSeen("m5", "matmul", "issued", 0)])[1] == ("m1", "r1")
    gate, _, why = proof_gate([mm])
    assert gate is Gate.FAIL and "no memory proof" in why


def test_hw_unproven_fails_a_pending_lease_and_wipes_a_running_one() -> None:
    from idlegrid.core.lease.lifecycle import advance
    from idlegrid.errors import IllegalTransition

    assert advance("pending", "hw-unproven") == "failed"
    assert advance("running", "hw-unproven") == "ending"  # wiped as any end (docs/leases.md)
    with pytest.raises(IllegalTransition):
        advance("ended", "hw-unproven")
