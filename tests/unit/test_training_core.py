"""Pure verified-training core: job spec, commitments, verdicts, canaries, settlement."""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core import ledger
from idlegrid.core.training import proof, settlement
from idlegrid.core.training.spec import JobSpec, batch_indices, job_id, segments
from idlegrid.errors import InvalidRequest, LedgerError

SHA = "ab" * 32


def spec_dict(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "dataset": {"ref": "stdlib:v1", "sha256": SHA, "windows": 512},
        "model": {"seq": 32, "layers": 2, "dim": 32, "heads": 4},
        "steps": 40,
        "checkpoint_interval": 8,
    }
    d.update(over)
    return d


def leaves(start: int, n: int, salt: bytes = b"") -> list[proof.StepLeaf]:
    return [
        proof.StepLeaf(s, hashlib.sha256(salt + s.to_bytes(8, "little")).digest(), 5.0 - 0.01 * s)
        for s in range(start, start + n)
    ]


def commit(start: int = 0, n: int = 8, salt: bytes = b"") -> proof.TrainingCommitment:
    return proof.TrainingCommitment("job-x", start, leaves(start, n, salt), b"\x11" * 32)


# ---- spec -----------------------------------------------------------------------------------


def test_spec_round_trips_and_its_digest_covers_every_field() -> None:
    spec = JobSpec.parse(spec_dict())
    assert JobSpec.parse(spec.to_dict()) == spec
    assert spec.model.seq == 32 and spec.escrow_total == spec.price_per_step * 40
    digests = {spec.digest()}
    for change in (
        {"steps": 41},
        {"job_seed": 1},
        {"init_seed": 1},
        {"optimizer": {"lr": 0.002}},
        {"determinism_class": "x"},
        {"dataset": {"sha256": "cd" * 32, "windows": 512}},
    ):
        digests.add(JobSpec.parse(spec_dict(**change)).digest())
    assert len(digests) == 7
    assert job_id(spec, "key_a") != job_id(spec, "key_b")
    assert job_id(spec, "key_a") == job_id(JobSpec.parse(spec.to_dict()), "key_a")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"bogus": 1}, "spec.bogus"),
        ({"steps": 0}, "spec.steps"),
        ({"steps": True}, "spec.steps"),
        ({"steps": 10, "checkpoint_interval": 11}, "spec.checkpoint_interval"),
        ({"model": {"dim": 30, "heads": 4}}, "spec.model.heads"),
        ({"model": {"vocab": 512}}, "spec.model.vocab"),
        ({"model": {"arch": "llama"}}, "spec.model.arch"),
        ({"model": {"depth": 2}}, "spec.model.depth"),
        ({"dataset": {"ref": "stdlib:v1"}}, "spec.dataset.sha256"),
        ({"dataset": {"sha256": "XYZ"}}, "spec.dataset.sha256"),
        ({"dataset": {"sha256": SHA, "ref": "../etc"}}, "spec.dataset.ref"),
        ({"optimizer": {"lr": 0}}, "spec.optimizer.lr"),
        ({"optimizer": {"lr": float("nan")}}, "spec.optimizer.lr"),
        ({"optimizer": {"name": "lion"}}, "spec.optimizer.name"),
        ({"optimizer": {"betas": [0.9]}}, "spec.optimizer.betas"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "spec.optimizer.betas.b1"),
        ({"init_seed": -1}, "spec.init_seed"),
        ({"price_per_step": 1.5}, "spec.price_per_step"),
        ({"determinism_class": 3}, "spec.determinism_class"),
    ],
)
def test_bad_spec_fields_raise_with_the_param_named(change: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        JobSpec.parse(spec_dict(**change))
    assert err.value.param == param


def test_spec_needs_an_object_and_a_dataset() -> None:
    with pytest.raises(InvalidRequest):
        JobSpec.parse([1, 2])
    d = spec_dict()
    del d["dataset"]
    with pytest.raises(InvalidRequest) as err:
        JobSpec.parse(d)
    assert err.value.param == "spec.dataset"


def test_param_count_formula_matches_a_hand_count() -> None:
    m = JobSpec.parse(spec_dict()).model
    d, v, s = m.dim, m.vocab, m.seq
    assert m.params == v * d + s * d + m.layers * (12 * d * d + 13 * d) + 2 * d + d * v + v


def test_batch_indices_are_a_pure_function_of_seed_and_step() -> None:
    a = batch_indices(7, 3, 100, 16)
    assert a == batch_indices(7, 3, 100, 16)
    assert a != batch_indices(7, 4, 100, 16)
    assert a != batch_indices(8, 3, 100, 16)
    assert all(0 <= i < 100 for i in a)
    counts = [0] * 10
    for step in range(2000):
        for i in batch_indices(1, step, 10, 5):
            counts[i] += 1
    # 10,000 draws over 10 windows: 1,000 each, sd ~30; 6 sd either side.
    assert all(820 < c < 1180 for c in counts)


def test_segments_cover_the_steps_half_open() -> None:
    assert segments(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert segments(10, 10) == [(0, 10)]
    with pytest.raises(ValueError):
        segments(0, 3)


# ---- commitments ----------------------------------------------------------------------------


def test_commitment_round_trips_and_every_leaf_proves_into_the_root() -> None:
    c = commit(16, 8)
    back = proof.TrainingCommitment.from_bytes(c.to_bytes())
    assert back == c and back.root == c.root and back.digest() == c.digest()
    assert len(c.to_bytes()) == 4 + 1 + 2 + len("job-x") + 8 + 32 + 4 + 48 * 8
    for s in range(16, 24):
        assert proof.verify_leaf(c.root, c.leaf(s), c.proof(s))
    forged = proof.StepLeaf(18, b"\x00" * 32, c.leaf(18).loss)
    assert not proof.verify_leaf(c.root, forged, c.proof(18))
    with pytest.raises(IndexError):
        c.proof(24)


@given(st.integers(0, 7), st.integers(0, 31))
@settings(max_examples=50)
def test_changing_any_leaf_byte_changes_root_and_digest(i: int, byte: int) -> None:
    c = commit()
    ls = list(c.leaves)
    h = bytearray(ls[i].state_hash)
    h[byte] ^= 1
    ls[i] = proof.StepLeaf(ls[i].step, bytes(h), ls[i].loss)
    other = proof.TrainingCommitment(c.job_id, c.start_step, ls, c.start_hash)
    assert other.root != c.root and other.digest() != c.digest()


def test_strict_parse_rejects_bad_lengths_nan_and_non_consecutive_steps() -> None:
    good = commit().to_bytes()
    for bad in (good[:-1], good + b"\x00", good[:3], b"XXXX" + good[4:]):
        with pytest.raises(InvalidRequest):
            proof.TrainingCommitment.from_bytes(bad)
    nan = bytearray(good)
    nan[-8:] = struct.pack("<d", float("nan"))
    with pytest.raises(InvalidRequest, match="finite"):
        proof.TrainingCommitment.from_bytes(bytes(nan))
    ls = leaves(0, 4)
    ls[2] = proof.StepLeaf(9, ls[2].state_hash, 1.0)
    with pytest.raises(InvalidRequest, match="step 9"):
        proof.TrainingCommitment("job-x", 0, ls, b"\x11" * 32)
    with pytest.raises(InvalidRequest):
        proof.TrainingCommitment("job-x", 0, [], b"\x11" * 32)
    with pytest.raises(InvalidRequest):
        proof.TrainingCommitment("job-x", 0, leaves(0, 2), b"short")


def test_segments_chain_only_when_start_equals_the_previous_end() -> None:
    a = commit(0, 8)
    b = proof.TrainingCommitment("job-x", 8, leaves(8, 8), a.end_hash)
    assert b.follows(a)
    assert not proof.TrainingCommitment("job-x", 8, leaves(8, 8), b"\x00" * 32).follows(a)
    assert not proof.TrainingCommitment("job-x", 9, leaves(9, 8), a.end_hash).follows(a)


def test_audit_selection_is_fixed_by_beacon_and_digest_at_rate_p() -> None:
    digests = [commit(0, 2, salt=i.to_bytes(4, "little")).digest() for i in range(4000)]
    hits = sum(proof.select_segment(b"s", d, 0.1) for d in digests)
    assert 310 < hits < 490  # Binomial(4000, 0.1): mean 400, sd 19
    assert [proof.select_segment(b"s", d, 0.1) for d in digests[:50]] == [
        proof.select_segment(b"s", d, 0.1) for d in digests[:50]
    ]
    assert all(proof.select_segment(b"s", d, 1.0) for d in digests[:20])


# ---- verdicts -------------------------------------------------------------------------------


def test_exact_judging_finds_the_first_differing_step() -> None:
    c = leaves(10, 8)
    assert proof.judge_segment(c, list(c), exact=True).ok
    r = list(c)
    r[3] = proof.StepLeaf(13, b"\x01" * 32, r[3].loss)
    r[5] = proof.StepLeaf(15, b"\x02" * 32, r[5].loss)
    v = proof.judge_segment(c, r, exact=True)
    assert not v.ok and v.first_bad_step == 13
    r = list(c)
    r[6] = proof.StepLeaf(16, r[6].state_hash, math.nextafter(r[6].loss, 10))
    v = proof.judge_segment(c, r, exact=True)
    assert not v.ok and v.first_bad_step == 16 and v.reason == "loss differs"
    v = proof.judge_segment(c, r[:-1], exact=True)
    assert not v.ok and "cover" in v.reason


def test_tolerance_judging_uses_losses_then_the_weight_distance() -> None:
    c = leaves(0, 8)
    other = leaves(0, 8, salt=b"other-class")  # another class: hashes never match
    near = [proof.StepLeaf(x.step, x.state_hash, x.loss + 1e-6) for x in other]
    assert proof.judge_segment(c, near, exact=False, weight_dist=1e-4).ok
    assert not proof.judge_segment(c, near, exact=False, weight_dist=0.05).ok
    v = proof.judge_segment(c, near, exact=False, weight_dist=None)
    assert not v.ok and v.first_bad_step == 7
    assert not proof.judge_segment(c, near, exact=False, weight_dist=float("nan")).ok
    far = list(near)
    far[2] = proof.StepLeaf(2, far[2].state_hash, far[2].loss + 0.01)
    v = proof.judge_segment(c, far, exact=False, weight_dist=1e-4)
    assert not v.ok and v.first_bad_step == 2
    assert not proof.judge_segment(c, near, exact=True).ok


def test_a_canary_is_wrong_and_a_lazy_verifier_is_caught_by_it() -> None:
    honest = commit(8, 8)
    for seed in range(20):
        canary = proof.canary_commitment(honest, seed)
        assert canary.start_hash == honest.start_hash and canary.digest() != honest.digest()
        diligent = list(honest.leaves)  # what a real replay recomputes
        assert not proof.judge_segment(canary.leaves, diligent, exact=True).ok
        assert proof.verifier_report_matches(honest.leaves, diligent, exact=True)
        lazy = list(canary.leaves)  # approves by echoing the commitment
        assert proof.judge_segment(canary.leaves, lazy, exact=True).ok
        assert not proof.verifier_report_matches(honest.leaves, lazy, exact=True)


# ---- settlement -----------------------------------------------------------------------------


def post(balances: dict[str, int], seen: set[str], entry: ledger.Entry | None) -> dict[str, int]:
    assert entry is not None
    if entry.key in seen:  # the store skips a key it has seen: idempotent by key
        return balances
    seen.add(entry.key)
    out = ledger.apply(balances, entry)
    ledger.check_invariants(out)
    return out


def test_a_job_pays_each_verified_segment_once_slashes_a_fault_and_refunds_the_rest() -> None:
    spec = JobSpec.parse(spec_dict(price_per_step=100, stake_required=10_000))
    jid = job_id(spec, "key_c")
    seen: set[str] = set()
    b = post(
        {},
        seen,
        ledger.mint("m1", ledger.consumer_account("key_c"), 10_000, ledger.Cause("deposit", "d1")),
    )
    b = post(
        b,
        seen,
        ledger.mint("m2", ledger.provider_account("p1"), 20_000, ledger.Cause("deposit", "d2")),
    )
    b = post(b, seen, settlement.escrow(jid, "key_c", spec.escrow_total))
    b = post(b, seen, settlement.stake(jid, "p1", spec.stake_required))
    segs = spec.segments()
    amt = [settlement.segment_amount(spec.price_per_step, a, e) for a, e in segs]
    b = post(b, seen, settlement.pay_segment(jid, 0, "p1", amt[0], 500))
    b = post(b, seen, settlement.pay_segment(jid, 0, "p2", amt[0], 500))  # re-run: no-op
    b = post(b, seen, settlement.refund_segment(jid, 0, "key_c", amt[0]))  # already paid
    assert b[ledger.provider_account("p1")] == 10_000 + amt[0] - amt[0] * 500 // 10_000
    assert ledger.provider_account("p2") not in b
    # segment 1 fails its audit, a dispute proves it: slash, verifier v1 rewarded
    stake_acct = settlement.job_stake_account(jid, "p1")
    b = post(b, seen, settlement.slash(jid, 1, "p1", b[stake_acct], 5_000, "key_c", amt[1], "v1"))
    assert b[stake_acct] == 5_000
    assert b[ledger.provider_account("v1")] == (5_000 - amt[1]) // 2
    b = post(b, seen, settlement.audit_fee("aud1", "v1", 50, b[ledger.FEES]))
    # segment 1 re-run by p2 and accepted: paid from the same escrow, once
    b = post(b, seen, settlement.pay_segment(jid, 1, "p2", amt[1], 500))
    b = post(b, seen, settlement.refund_segment(jid, 2, "key_c", amt[2]))
    b = post(b, seen, settlement.pay_segment(jid, 2, "p2", amt[2], 500))  # refunded: no-op
    escrow_left = b[settlement.job_escrow_account(jid)]
    assert escrow_left == spec.escrow_total - amt[0] - amt[1] - amt[2]
    b = post(b, seen, settlement.close(jid, "key_c", escrow_left))
    assert b[settlement.job_escrow_account(jid)] == 0
    paid = 10_000 - b[ledger.consumer_account("key_c")]
    assert paid == amt[0] + amt[1] - amt[1]  # two segments paid, compensated for one fault
    assert sum(b.values()) == 0


def test_settlement_refuses_nonsense_amounts() -> None:
    with pytest.raises(LedgerError):
        settlement.escrow("j", "k", 0)
    with pytest.raises(LedgerError):
        settlement.pay_segment("j", 0, "p", -5, 500)
    with pytest.raises(LedgerError):
        settlement.segment_amount(10, 5, 5)
    assert settlement.slash("j", 0, "p", 0, 100, "k", 10, None) is None
    assert settlement.audit_fee("a", "v", 10, 0) is None
    assert settlement.verifier_slash("c1", "stake:v:x", 0, 10, "canary") is None
    e = settlement.verifier_slash("c1", "stake:v:x", 70, 100, "approved a canary")
    assert e is not None and e.key == "train-vslash:c1"


def test_a_segment_rerun_after_a_fault_can_be_slashed_again() -> None:
    first = settlement.slash("j", 3, "p1", 1_000, 1_000, "k", 100, "v")
    second = settlement.slash("j", 3, "p2", 1_000, 1_000, "k", 100, "v")
    assert first is not None and second is not None
    assert first.key != second.key  # one key per segment would make the second a no-op


def test_default_audit_rate_follows_p_star_for_the_job_stake() -> None:
    spec = JobSpec.parse(spec_dict())
    p = proof.audit_rate(spec.price_per_step, spec.checkpoint_interval, spec.stake_required)
    r = spec.price_per_step * spec.checkpoint_interval
    assert p == pytest.approx(2 * r / (0.99 * 0.9 * (spec.stake_required + r)))
    assert 0.005 < p < 0.02  # the default stake buys a ~1 % audit rate
    assert proof.audit_rate(spec.price_per_step, spec.checkpoint_interval, 0) == 1.0
    assert proof.audit_rate(0, 10, 100) == 0.0
