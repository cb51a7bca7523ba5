"""A real dispute end to end on the executor, offline: the game lands on the faulty step
and operator, the referee recomputes one op, and it all takes well under a minute."""

from __future__ import annotations

import pytest

from idlegrid.core.training import dispute
from idlegrid.core.training.spec import JobSpec
from idlegrid.testbed import training_cheats as tc
from idlegrid.testbed.training_matrix import run_dispute
from idlegrid.training import verified as v


@pytest.fixture(scope="module")
def spec() -> JobSpec:
    return JobSpec.parse(
        {
            "dataset": {"ref": "stdlib:v1", "sha256": v.corpus_sha256(), "windows": 256},
            "model": {"seq": 16, "layers": 1, "dim": 32, "heads": 4},
            "batch_size": 4,
            "steps": 16,
            "checkpoint_interval": 8,
        }
    )


def float_op_near(spec: JobSpec, step: int, target: int) -> int:
    """Index of an op with a non-empty float output at or after `target` in an honest trace."""
    tr = v.Trainer(spec, 1)
    st, _ = tr.run(tr.initial_state(), step)
    recs = tr.trace_step(st).records
    return next(r.index for r in recs[target:] if r.output_summary)


@pytest.mark.parametrize(("t0", "target"), [(11, 150), (8, 20)])
def test_a_faulty_operator_is_found_and_ruled_against(spec: JobSpec, t0: int, target: int) -> None:
    j0 = float_op_near(spec, t0, target)
    cheat = tc.FaultyOp(spec, 1, step=t0, op_index=j0)
    prov = tc.run_job(cheat, "job-f")
    c = prov.commitments[1]
    out, secs, n_ops = run_dispute(spec, cheat, v.Trainer(spec, 1), c, prov.checkpoint(8))
    assert out.winner == dispute.CHALLENGER and out.provider_at_fault
    assert (out.step, out.op_index) == (t0, j0)
    assert out.rounds <= dispute.rounds_bound(len(c.leaves), n_ops)
    assert secs < 60


def test_an_honest_provider_wins_against_a_faulty_challenger(spec: JobSpec) -> None:
    honest = v.Trainer(spec, 1)
    prov = tc.run_job(honest, "job-h")
    j0 = float_op_near(spec, 3, 300)
    liar = tc.FaultyOp(spec, 1, step=3, op_index=j0)
    out, _, _ = run_dispute(spec, honest, liar, prov.commitments[0], None)
    assert out.winner == dispute.PROVIDER and (out.step, out.op_index) == (3, j0)


@pytest.mark.parametrize("cheat", [tc.NoisyUpdates, tc.ChangedLR, tc.WrongData])
def test_a_cheat_loses_the_dispute_at_the_first_step_it_changed(spec: JobSpec, cheat) -> None:
    tr = cheat(spec, 1)
    prov = tc.run_job(tr, "job-c")
    c = prov.commitments[1]
    out, secs, n_ops = run_dispute(spec, tr, v.Trainer(spec, 1), c, prov.checkpoint(8))
    assert out.winner == dispute.CHALLENGER and out.step == 8 and out.op_index is not None
    assert out.rounds <= dispute.rounds_bound(len(c.leaves), n_ops)
