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
