"""Pure rules of a lease whose provider stops proving the leased class, or vanishes before
it starts: the moves, the seconds billed, the proof lapse, the money taken back."""

from __future__ import annotations

from typing import Any

import pytest

from idlegrid.core.lease.lifecycle import Transition, advance, billable_until, replay
from idlegrid.core.lease.proofs import ProofSeen, lapse
from idlegrid.core.ledger import FEES, accrual_account, order_escrow_account, provider_account
from idlegrid.core.market import settlement
from idlegrid.errors import IllegalTransition, LedgerError


def test_an_unproven_class_ends_a_live_lease_through_the_wipe_and_fails_a_pending_one() -> None:
    assert advance("running", "hw-unproven") == "ending"
    assert advance("provisioning", "hw-unproven") == "ending"
    assert advance("pending", "hw-unproven") == "failed"
    with pytest.raises(IllegalTransition):
        advance("ending", "hw-unproven")  # being wiped already: nothing more to stop
    story = [
        Transition(0, "pending", "created"),
        Transition(1, "provisioning", "placed"),
        Transition(2, "running", "provisioned"),
        Transition(9, "ending", "hw-unproven"),
        Transition(10, "ended", "wiped"),
    ]
    assert replay(story) == "ended"


def test_a_pending_lease_fails_at_once_when_its_provider_is_lost() -> None:
    assert advance("pending", "provider-lost") == "failed"
    assert replay([Transition(0, "pending", "created"), Transition(3, "failed", "provider-lost")])


def test_billable_until_counts_running_time_before_the_cut_only() -> None:
    story = [
        Transition(0, "pending", "created"),
        Transition(1, "provisioning", "placed"),
        Transition(2, "running", "provisioned"),
        Transition(30.5, "ending", "hw-unproven"),
    ]
    assert billable_until(story, 12.9) == 10  # 2 → 12.9, floored
    assert billable_until(story, 1.5) == 0  # last proven before it ran: nothing is owed
    assert billable_until(story, 100) == 28  # never past the end of running


def _p(pid: str, kind: str, state: str, at: float) -> ProofSeen:
    return ProofSeen(pid, kind, state, at)


def test_lapse_finds_the_first_failure_after_placement_and_the_last_pass_of_its_kind() -> None:
    proofs = [
        _p("m1", "matmul", "passed", 5),
        _p("x1", "memory", "passed", 6),
        _p("m0", "matmul", "failed", 1),  # before the lease was placed: superseded by m1
    ]
    assert lapse(proofs, since=10) is None
    proofs += [_p("m2", "matmul", "passed", 40), _p("x2", "memory", "passed", 70)]
    assert lapse(proofs, since=10) is None
    proofs += [_p("m3", "matmul", "failed", 80), _p("m4", "matmul", "issued", 0)]
    found = lapse(proofs, since=10)
    assert found is not None and found[0].id == "m3" and found[1] == 40  # matmul's last pass
    expired = lapse([*proofs[:5], _p("x3", "memory", "expired", 75)], since=10)
    assert expired is not None and expired[0].id == "x3" and expired[1] == 70
    never = lapse([_p("m9", "matmul", "failed", 20)], since=10)
    assert never is not None and never[1] == 0.0  # never proven: nothing is owed


def test_unaccrue_takes_back_into_the_escrow_from_the_named_accounts() -> None:
    sources = {accrual_account("n"): 600, provider_account("n"): 300, FEES: 100}
    entry = settlement.unaccrue("L", "n", 3, sources)
    got = {p.account: p.amount for p in entry.postings}
    assert got == {
        order_escrow_account("L"): 1000,
        accrual_account("n"): -600,
        provider_account("n"): -300,
        FEES: -100,
    }
    assert (entry.key, entry.cause.id, entry.memo) == ("unaccrue:L:n:3", "L", "lease-unproven")
    with pytest.raises(LedgerError):
        settlement.unaccrue("L", "n", 4, {})
    with pytest.raises(LedgerError):
        settlement.unaccrue("L", "n", 4, {FEES: 5, accrual_account("n"): -1})


def test_a_registration_reports_swept_leases_bounded_and_validated() -> None:
    from pydantic import ValidationError

    from idlegrid.protocol.messages import MAX_SWEPT, RegisterMsg

    base: dict[str, Any] = {
        "protocol_version": 1,
        "name": "p",
        "hardware": {},
        "engine": {},
        "slots": 1,
        "prefill_tps": 1.0,
        "decode_tps": 1.0,
        "offers": [{"model": "m", "prompt_price": 0, "output_price": 0}],
    }
    assert RegisterMsg(**base).swept == []  # an older agent says nothing
    assert RegisterMsg(**base, swept=["W1", "lease_ab12"]).swept == ["W1", "lease_ab12"]
    for bad in (["../x"], [""], ["a" * 65], ["W"] * (MAX_SWEPT + 1), "W1"):
        with pytest.raises(ValidationError):
            RegisterMsg(**base, swept=bad)
