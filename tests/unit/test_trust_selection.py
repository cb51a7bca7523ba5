"""Verifier selection, audit ids and canary construction (core/trust/selection.py)."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from idlegrid.core.ledger import FEES
from idlegrid.core.trust import beacon, entries, selection
from idlegrid.core.trust.selection import Candidate

SECRET = b"s" * 32
FAM = "llama.cpp/cpu-x86-64-v3"


def _digest(i: int) -> bytes:
    return hashlib.sha256(f"answer {i}".encode()).digest()


def _pool() -> list[Candidate]:
    return [
        Candidate("honest", FAM, "203.0.113.7", stake=200),
        Candidate("col-a", FAM, "198.51.100.4", stake=50),
        Candidate("col-b", FAM, "198.51.100.9", stake=50),
    ]


def test_draw_honours_stake_weights() -> None:
    pool = [c for c in _pool() if c.node_id != "col-b"]  # col-b serves here
    n = 4000
    got = Counter(selection.pick(SECRET, _digest(i), pool, "audit") for i in range(n))
    assert set(got) == {"honest", "col-a"}
    # honest 200 vs col-a 50: 80 % / 20 %, within 4 standard deviations
    sd = (n * 0.8 * 0.2) ** 0.5
    assert abs(got["honest"] - 0.8 * n) < 4 * sd, got


def test_unstaked_verifiers_are_drawn_only_when_nobody_has_stake() -> None:
    pool = [Candidate("staked", FAM, stake=10**7), *(Candidate(f"z{i}", FAM) for i in range(50))]
    picks = {selection.pick(SECRET, _digest(i), pool, "audit") for i in range(500)}
    assert picks == {"staked"}
    unstaked = [Candidate(f"z{i}", FAM) for i in range(4)]
    assert len({selection.pick(SECRET, _digest(i), unstaked, "audit") for i in range(200)}) == 4


def test_eligibility_excludes_provider_family_network_held_and_excluded() -> None:
    pool = [
        *_pool(),
        Candidate("other-build", "llama.cpp/cpu-x86-64-v4", "192.0.2.1", 100),
        Candidate("held", FAM, "192.0.2.2", 100, held=True),
        Candidate("lapsed", FAM, "192.0.2.3", 100),
    ]
    got = selection.eligible(pool, "col-b", FAM, "198.51.100.200", exclude=["lapsed"])
    # col-a shares col-b's /24: never its verifier
    assert [c.node_id for c in got] == ["honest"]
    # loopback (the coordinator's own host) is the operator's: exempt unless told otherwise
    loop = [Candidate("v", FAM, "127.0.0.1", 1)]
    assert selection.eligible(loop, "p", FAM, "127.0.0.1") == loop
    assert selection.eligible(loop, "p", FAM, "127.0.0.1", exempt_loopback=False) == []


def test_network_of() -> None:
    assert selection.network_of("198.51.100.4") == "198.51.100.0/24"
    assert selection.network_of("::ffff:198.51.100.4") == "198.51.100.0/24"
    assert selection.network_of("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert selection.network_of("") is None and selection.network_of("testclient") is None
    assert selection.network_of("127.0.0.1") is None
    assert selection.network_of("::1", exempt_loopback=False) == "::/64"


def test_draw_is_unpredictable_without_the_secret() -> None:
    """Who audits an answer is not a function of the answer: another secret, another pick;
    and a fixed pick rule over the digest alone agrees with the real draw only by chance."""
    pool = [Candidate(f"v{i}", FAM, stake=100) for i in range(4)]
    n = 2000
    real = [selection.pick(SECRET, _digest(i), pool, "audit") for i in range(n)]
    guess = [selection.pick(b"g" * 32, _digest(i), pool, "audit") for i in range(n)]
    agree = sum(a == b for a, b in zip(real, guess, strict=True)) / n
    assert abs(agree - 0.25) < 0.05
    # each redraw round, and real vs canary, are independent draws of the same answer
    rounds = [selection.pick(SECRET, _digest(0), pool, "audit", r) for r in range(40)]
    assert len(set(rounds)) == 4
    assert selection.pick(SECRET, _digest(1), [], "audit") is None


def test_audit_ids_have_one_shape_and_hide_the_kind() -> None:
    d = _digest(3)
    real, canary = (selection.audit_id(SECRET, d, k, "t-1", 0) for k in ("audit", "canary"))
    assert real.startswith("aud-") and canary.startswith("aud-")
    assert len(real) == len(canary) == 28 and real != canary
    assert d.hex()[:24] not in (real[4:], canary[4:])  # not derivable from the commitment
    # One digest (identical seeded requests), other answers: other ids, same shape.
    others = {selection.audit_id(SECRET, d, "audit", t, a) for t in ("t-1", "t-2") for a in (0, 1)}
    assert len(others) == 4 and all(len(i) == 28 and i.startswith("aud-") for i in others)
    assert selection.audit_id(b"\x01" * 32, d, "audit", "t-1", 0) != real  # needs the secret


def test_answers_with_one_digest_are_drawn_independently() -> None:
    d = _digest(5)
    scopes = [selection.scope(f"t-{i}", 0) for i in range(2000)]
    hits = sum(beacon.selected(SECRET, d, 0.25, scope=s) for s in scopes)
    assert 400 < hits < 600  # one digest, not all-or-nothing
    assert beacon.selected(SECRET, d, 0.25) == beacon.selected(SECRET, d, 0.25, scope=b"")


def test_task_canary_changes_the_prompt_and_keeps_its_look() -> None:
    task = {"prompt": "Request 4: tell me", "messages": None, "commitment": "blob"}
    got = selection.perturb_task(task, SECRET, _digest(4))
    assert got["commitment"] == "blob" and got.keys() == task.keys()
    assert got["prompt"] != task["prompt"] and got["prompt"].lower() == task["prompt"].lower()
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi!"}]}
    out = selection.perturb_task(chat, SECRET, _digest(4))
    assert out["messages"][0] == chat["messages"][0]
    assert out["messages"][1]["content"] in ("hI!", "HI!", "hi!")
    assert selection.perturb_text("123", SECRET, _digest(4)) != "123"
    assert selection.perturb_text("", SECRET, _digest(4)) == "."


def test_canary_kinds_split_by_the_beacon() -> None:
    kinds = Counter(selection.canary_kind(SECRET, _digest(i), {"prompt": "x"}) for i in range(400))
    assert 150 < kinds["task"] < 250
    assert selection.canary_kind(SECRET, _digest(0), {"prompt": ""}) == "values"


@pytest.mark.parametrize("audit_rate", [1.0, 0.2, 0.01])
def test_canaries_are_a_share_of_the_audits_whatever_the_providers_rate(audit_rate) -> None:
    """A verifier sees the same share of canaries from a provider on probation and one at a
    steady 1 %; at 1 % an answer is a canary 0.1 % of the time, not a flat 2 %."""
    share = 0.1
    p = selection.canary_probability(share, audit_rate)
    assert p == pytest.approx(share * audit_rate)
    answers = [(_digest(i), selection.scope(f"t-{i}", 0)) for i in range(40_000)]
    audits = sum(beacon.selected(SECRET, d, audit_rate, scope=s) for d, s in answers)
    canaries = sum(beacon.selected(SECRET, d, p, b"canary", s) for d, s in answers)
    assert audits > 300
    assert canaries / audits == pytest.approx(share, rel=0.35)
    assert selection.canary_probability(2.0, 0.9) == 1.0
    assert selection.canary_probability(0.1, -1.0) == 0.0


def test_lapse_slash_takes_a_slice_to_fees() -> None:
    assert selection.hold_slash(1_000_000, 500) == 50_000
    e = entries.lapse_slash("aud-x", "v1", "stake:v1:cpu", 1_000_000, 50_000)
    assert e is not None and e.key == "lapse-slash:aud-x:v1:stake:v1:cpu"
    assert {p.account: p.amount for p in e.postings} == {"stake:v1:cpu": -50_000, FEES: 50_000}
    assert entries.lapse_slash("aud-x", "v1", "stake:v1:cpu", 0, 50_000) is None


@pytest.mark.parametrize("n", [1, 2, 7])
def test_pick_always_returns_a_candidate(n: int) -> None:
    pool = [Candidate(f"v{i}", FAM, stake=i) for i in range(n)]
    for i in range(50):
        assert selection.pick(SECRET, _digest(i), pool, "canary", i) in {c.node_id for c in pool}
