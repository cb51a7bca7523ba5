"""The training cheat matrix on the real executor, offline: every cheat is caught on every
audit of a segment it affects (same class: exact; across thread counts: tolerance), honest
runs are never flagged across thread counts, a lazy verifier is caught by a canary, and a
provider that deleted its checkpoints fails the availability probe."""

from __future__ import annotations

import dataclasses

import pytest

from idlegrid.core.training import proof
from idlegrid.core.training.spec import JobSpec
from idlegrid.testbed import training_cheats as tc
from idlegrid.testbed.training_matrix import audit, cheat_matrix, honest_audits
from idlegrid.training import verified as v


@pytest.fixture(scope="module")
def spec() -> JobSpec:
    return JobSpec.parse(
        {
            "dataset": {"ref": "stdlib:v1", "sha256": v.corpus_sha256(), "windows": 256},
            "model": {"seq": 16, "layers": 1, "dim": 32, "heads": 4},
            "batch_size": 4,
            "steps": 8,
            "checkpoint_interval": 4,
            "init_seed": 3,
            "job_seed": 5,
        }
    )


def test_honest_replays_with_another_thread_count_are_never_flagged(spec: JobSpec) -> None:
    res = honest_audits(spec, jobs=2)
    assert res.audits == 2 * 2 * 2 and res.flagged == 0
    assert max(res.weight_dists) > 0  # the classes really differ: this is tolerance mode
    assert res.max_weight_dist <= proof.WEIGHT_TOL / 5  # with margin
    assert res.max_loss_diff <= proof.LOSS_TOL / 5


def test_a_verifier_that_accumulates_micro_batches_passes_an_honest_provider(spec: JobSpec) -> None:
    prov = tc.run_job(v.Trainer(spec, 1), "job-mb")
    rep = audit(spec, prov, 1, verifier_threads=1, microbatches=2)
    assert rep.verdict.ok and rep.verdict.detail["exact"] is False
    assert rep.weight_dist is not None and 0 < rep.weight_dist <= proof.WEIGHT_TOL / 5


def test_same_class_replay_is_bitwise(spec: JobSpec) -> None:
    prov = tc.run_job(v.Trainer(spec, 1), "job-h")
    for seg in range(2):
        rep = audit(spec, prov, seg, verifier_threads=1)
        assert rep.verdict.ok and rep.verdict.reason == "bitwise identical"
        assert [x.state_hash for x in rep.leaves] == [
            x.state_hash for x in prov.commitments[seg].leaves
        ]
    assert all(prov.commitments[i + 1].follows(prov.commitments[i]) for i in range(1))
    assert prov.commitments[0].start_hash == v.initial_state_hash(spec)


@pytest.mark.parametrize("name", sorted(tc.CHEATS))
def test_every_cheat_is_caught_on_every_audit_of_an_affected_segment(
    spec: JobSpec, name: str
) -> None:
    (res,) = cheat_matrix(spec, jobs=1, names=(name,))
    assert res.affected_audits >= 2
    assert res.caught == res.affected_audits, res
    assert res.clean_passed == res.clean_audits, res


def test_a_lazy_verifier_is_caught_by_a_canary_and_a_diligent_one_is_not(spec: JobSpec) -> None:
    prov = tc.run_job(v.Trainer(spec, 1), "job-canary")
    honest = prov.commitments[1]
    canary = proof.canary_commitment(honest, seed=11)
    cls = prov.trainer.determinism_class()
    lazy = tc.lazy_audit(canary, cls)
    assert lazy.verdict.ok
    assert not proof.verifier_report_matches(honest.leaves, lazy.leaves, exact=True)
    # A diligent verifier replays: the canary's end checkpoint is not the committed one, and
    # even with the honest end checkpoint handed over, its recomputed leaves are the truth.
    rep = v.audit_segment(
        spec, canary, prov.checkpoint(4), prov.checkpoint(8), provider_class=cls, threads=1
    )
    assert not rep.verdict.ok
    full = v.replay(spec, prov.checkpoint(4), 4, 8, threads=1)[0]
    assert not proof.judge_segment(canary.leaves, full, exact=True).ok
    assert proof.verifier_report_matches(honest.leaves, full, exact=True)


def test_a_provider_that_deleted_its_checkpoints_fails_the_availability_probe(
    spec: JobSpec,
) -> None:
    honest = tc.run_job(v.Trainer(spec, 1), "job-p")
    lazy = tc.run_job(tc.DeletesCheckpoints(spec, 1), "job-p")
    for c_h, c_l in zip(honest.commitments, lazy.commitments, strict=True):
        assert proof.probe_ok(c_h.end_hash, honest.checkpoint(c_h.end_step))
        assert not proof.probe_ok(c_l.end_hash, lazy.checkpoint(c_l.end_step))
    # a checkpoint of another step does not pass for the one asked
    c = honest.commitments[1]
    assert not proof.probe_ok(c.end_hash, honest.checkpoint(c.start_step))


def test_checkpoints_are_bound_to_leaves_and_bad_ones_are_refused(spec: JobSpec) -> None:
    tr = v.Trainer(spec, 1)
    st, leaves = tr.run(tr.initial_state(), 3)
    ck = v.checkpoint_bytes(st)
    assert v.checkpoint_hash(ck) == leaves[-1].state_hash
    back = v.load_checkpoint(spec, ck)
    assert back.step == 3 and v.state_hash(back) == leaves[-1].state_hash
    other = dataclasses.replace(spec, model=dataclasses.replace(spec.model, layers=2))
    for bad in (ck[:-4], b"PK\x03\x04" + ck[4:], ck + b"\x00"):
        with pytest.raises(v.CheckpointError):
            v.load_checkpoint(spec, bad)
    with pytest.raises(v.CheckpointError):
        v.load_checkpoint(other, ck)
    nan = bytearray(ck)
    nan[-4:] = b"\x00\x00\xc0\x7f"
    with pytest.raises(v.CheckpointError, match="non-finite"):
        v.load_checkpoint(spec, bytes(nan))


def test_a_dataset_that_does_not_match_the_spec_is_refused(spec: JobSpec) -> None:
    bad = dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, sha256="0" * 64))
    with pytest.raises(v.InvalidRequest) as err:
        v.Trainer(bad, 1)
    assert err.value.param == "spec.dataset.sha256"


def test_overlapped_hashing_commits_the_same_leaves_in_order(spec: JobSpec) -> None:
    seen: list[int] = []
    runs = []
    for overlap in (False, True):
        tr = v.Trainer(spec, 1, overlap_hash=overlap)
        _, leaves = tr.run(
            tr.initial_state(),
            4,
            on_step=lambda leaf, tps: seen.append(leaf.step) if tps > 0 else None,
        )
        runs.append(leaves)
    assert runs[0] == runs[1]
    assert seen == [0, 1, 2, 3, 0, 1, 2, 3]
