"""Reservations in per-request routing (core/reservations.py): owners first, others spare."""

from __future__ import annotations

from idlegrid.core import reservations as rs
from idlegrid.core.reservations import Reservation
from idlegrid.core.routing import Candidate

MODEL = "m"
NOW = 100.0


def cand(node: str, in_flight: int = 0, slots: int = 1, price: int = 10) -> Candidate:
    return Candidate(node, in_flight, slots, price, 100.0, prompt_price=price)


RES_A = Reservation("ord-a", "key-a", MODEL, frozenset({"p"}), until=200.0)


def test_the_owner_goes_to_its_reserved_provider_even_when_it_is_dearer_and_busier() -> None:
    cands = [cand("p", in_flight=1, slots=2, price=90), cand("q"), cand("r")]
    route = rs.route(cands, [RES_A], "key-a", MODEL, NOW)
    assert route.target is not None and route.target.node_id == "p"
    assert route.reservation == RES_A
    assert route.reason.startswith("reserved by order ord-a")


def test_others_get_a_reserved_provider_only_after_every_unreserved_one() -> None:
    idle_p = [cand("p", price=1), cand("q", in_flight=1, slots=2), cand("r", in_flight=1, slots=4)]
    order = rs.order(idle_p, [RES_A], "key-b", MODEL, NOW)
    assert [c.node_id for c in order] == ["r", "q", "p"]
    route = rs.route(idle_p, [RES_A], "key-b", MODEL, NOW)
    assert route.target is not None and route.target.node_id == "r"
    assert route.reservation is None and "spare" not in route.reason


def test_others_use_a_reserved_provider_as_spare_when_everything_else_is_full() -> None:
    cands = [cand("p"), cand("q", in_flight=1), cand("r", in_flight=1)]
    route = rs.route(cands, [RES_A], "key-b", MODEL, NOW)
    assert route.target is not None and route.target.node_id == "p"
    assert route.reservation is None
    assert route.reason.startswith("spare capacity of a reserved provider")


def test_the_owner_falls_back_when_its_provider_is_busy_or_gone_and_is_told() -> None:
    busy = rs.route([cand("p", in_flight=1), cand("q")], [RES_A], "key-a", MODEL, NOW)
    assert busy.target is not None and busy.target.node_id == "q"
    assert busy.reservation is None
    assert busy.reason.startswith("fallback, reserved provider(s) of order ord-a busy")
    assert "charged per token" in busy.reason
    gone = rs.route([cand("q")], [RES_A], "key-a", MODEL, NOW)
    assert gone.target is not None and gone.target.node_id == "q"
    assert gone.reservation is None and "of order ord-a unavailable" in gone.reason


def test_a_reservation_counts_only_for_its_model_and_until_it_ends() -> None:
    cands = [cand("p", price=90), cand("q")]
    other_model = rs.route(cands, [RES_A], "key-a", "other", NOW)
    assert other_model.reservation is None and other_model.target is not None
    assert other_model.target.node_id == "q"
    expired = rs.route(cands, [RES_A], "key-a", MODEL, 200.0)
    assert expired.reservation is None and "fallback" not in expired.reason
    # After the end, p is no longer held: it is ordinary capacity for everyone.
    assert [c.node_id for c in rs.order(cands, [RES_A], "key-b", MODEL, 200.0)][0] == "q"
    assert [c.node_id for c in rs.order([cand("p"), cand("q", 1, 2)], [RES_A], "b", MODEL, 250)][
        0
    ] == "p"


def test_all_busy_queues_without_a_target() -> None:
    route = rs.route([cand("p", 1), cand("q", 1)], [RES_A], "key-b", MODEL, NOW)
    assert route.target is None and route.reason.startswith("queued")


def test_two_owners_of_one_provider_each_get_it_first() -> None:
    res_c = Reservation("ord-c", "key-c", MODEL, frozenset({"p", "s"}), until=300.0)
    cands = [cand("p", 0, 2), cand("q"), cand("s", 1)]
    a = rs.route(cands, [RES_A, res_c], "key-a", MODEL, NOW)
    c = rs.route(cands, [RES_A, res_c], "key-c", MODEL, NOW)
    assert a.reservation == RES_A and c.reservation == res_c
    assert a.target == c.target == cands[0]
    assert [x.node_id for x in rs.order(cands, [RES_A, res_c], "key-b", MODEL, NOW)] == [
        "q",
        "p",
        "s",
    ]


def test_of_order_reads_only_placed_inference_orders_and_covered_reads_the_tag() -> None:
    placement = {"legs": [{"provider": "p"}, {"provider": "q"}]}
    body = {"kind": "inference", "model": MODEL}
    r = rs.of_order("o", "k", body, placement, 50.0)
    assert r == Reservation("o", "k", MODEL, frozenset({"p", "q"}), 50.0)
    assert rs.of_order("o", "k", {**body, "kind": "lease"}, placement, 50.0) is None
    assert rs.of_order("o", "k", body, None, 50.0) is None
    assert rs.of_order("o", "k", body, placement, None) is None
    tag = r.tag()
    assert rs.covered(tag, "p", 49.0) and not rs.covered(tag, "p", 50.0)
    assert not rs.covered(tag, "z", 1.0) and not rs.covered(None, "p", 1.0)


def test_a_provider_its_owner_just_used_is_not_spare_for_others() -> None:
    cands = [cand("p"), cand("q", in_flight=1)]
    last = {"p": NOW - 0.5}
    keep = rs.kept([RES_A], last, NOW, 2.0)
    assert keep == {"p"}
    other = rs.route(cands, [RES_A], "key-b", MODEL, NOW, keep)
    assert other.target is None and other.reason.startswith("queued")
    assert [c.node_id for c in rs.order(cands, [RES_A], "key-b", MODEL, NOW, keep)] == ["q"]
    assert [c.node_id for c in rs.order(cands, [RES_A], "key-a", MODEL, NOW, keep)][0] == "p"
    owner = rs.route(cands, [RES_A], "key-a", MODEL, NOW, keep)
    assert owner.target == cands[0] and owner.reservation == RES_A
    # Once the owner has been away for the grace period, p is spare capacity again.
    assert rs.kept([RES_A], last, NOW + 1.5, 2.0) == frozenset()
    assert rs.kept([RES_A], {"q": NOW}, NOW, 2.0) == frozenset()  # q is reserved by nobody
    assert rs.kept([RES_A], last, 250.0, 1e9) == frozenset()  # the order ended
