"""Hardware proofs, pure parts: seeded matrices, row openings, timing verdicts, memory chase.

Time is an argument here (the challenger's measurement), so the budgets are tested without
sleeping: an injected elapsed time stands in for the clock.
"""

from __future__ import annotations

import numpy as np
import pytest

from idlegrid.core.market.hardware import BY_NAME
from idlegrid.core.trust import hwproof as hw
from idlegrid.core.trust import memproof as mp
from idlegrid.core.trust import merkle

CATALOG = {name: g.fp16_tflops for name, g in BY_NAME.items()}
MODEL = hw.TimingModel()
SEED = b"s" * 32


def _prove(
    spec: hw.Spec, c: np.ndarray, secret: bytes = b"x"
) -> tuple[bytes, list[int], list[hw.Opening]]:
    root, leaves = hw.commit_rows(c)
    wanted = hw.open_rows(secret, root, spec.n, spec.open_rows)
    return (
        root,
        wanted,
        [hw.Opening(i, c[i].astype(np.float32), merkle.merkle_proof(leaves, i)) for i in wanted],
    )


def _cpu_spec(n: int = 128) -> hw.Spec:
    return hw.spec_for("CPU", CATALOG, MODEL, n_cpu=n)


def test_matrices_are_seeded_unstructured_and_rows_match_the_whole() -> None:
    a = hw.matrix(SEED, "A", 64, 24)
    assert np.array_equal(a, hw.matrix(SEED, "A", 64, 24))
    assert not np.array_equal(a, hw.matrix(b"t" * 32, "A", 64, 24))
    assert not np.array_equal(a, hw.matrix(SEED, "B", 64, 24))
    assert np.array_equal(hw.rows_of(SEED, "A", [3, 17], 64, 24), a[[3, 17]])
    # Not Hankel: entries along an anti-diagonal differ (SN27's O(n²) shortcut is gone).
    assert len({float(a[i, 10 - i]) for i in range(11)}) > 8
    assert a.min() >= -1 and a.max() < 1 and abs(float(a.mean())) < 0.1
    # The fp16 grid is exact in fp16.
    h = hw.matrix(SEED, "A", 32, 11)
    assert np.array_equal(h.astype(np.float16).astype(np.float32), h)


def test_honest_product_passes_and_is_far_inside_the_tolerance() -> None:
    spec = _cpu_spec()
    a, b = hw.matrix(SEED, "A", spec.n, 24), hw.matrix(SEED, "B", spec.n, 24)
    root, wanted, openings = _prove(spec, a @ b)
    v = hw.judge(spec, SEED, root, wanted, openings, elapsed_s=0.01, model=MODEL)
    assert v.passed and v.correct and v.in_time, v.reasons
    assert v.worst_error < hw.ROW_TOLERANCE / 20


@pytest.mark.parametrize("cast", [np.float16, "bf16"])
def test_lower_precision_product_misses_the_tolerance(cast) -> None:
    spec = _cpu_spec()
    a, b = hw.matrix(SEED, "A", spec.n, 24), hw.matrix(SEED, "B", spec.n, 24)
    if cast == "bf16":

        def rnd(x: np.ndarray) -> np.ndarray:
            return ((x.view(np.uint32) + np.uint32(0x8000)) & np.uint32(0xFFFF0000)).view(
                np.float32
            )

        c = rnd(a) @ rnd(b)
    else:
        c = a.astype(cast).astype(np.float32) @ b.astype(cast).astype(np.float32)
    root, wanted, openings = _prove(spec, c)
    v = hw.judge(spec, SEED, root, wanted, openings, elapsed_s=0.01, model=MODEL)
    assert not v.correct and not v.passed
    assert v.worst_error > 5 * hw.ROW_TOLERANCE


def test_partial_work_is_caught_by_row_openings() -> None:
    spec = _cpu_spec()
    a, b = hw.matrix(SEED, "A", spec.n, 24), hw.matrix(SEED, "B", spec.n, 24)
    c = a @ b
    c[spec.n // 2 :] = np.random.default_rng(0).standard_normal(c[spec.n // 2 :].shape)
    caught = 0
    for t in range(200):
        root, wanted, openings = _prove(spec, c, secret=t.to_bytes(2, "little"))
        caught += not hw.judge(spec, SEED, root, wanted, openings, 0.01, MODEL).passed
    assert caught == 200  # P(miss) = 0.5^16 per trial
    assert hw.detection_probability(0.5, 16) > 1 - 2**-15


def test_openings_that_do_not_match_the_root_or_are_missing_fail() -> None:
    spec = _cpu_spec()
    c = hw.matrix(SEED, "A", spec.n, 24) @ hw.matrix(SEED, "B", spec.n, 24)
    root, wanted, openings = _prove(spec, c)
    swapped = [hw.Opening(o.index, c[(o.index + 1) % spec.n], o.proof) for o in openings]
    assert "Merkle" in hw.judge(spec, SEED, root, wanted, swapped, 0.01, MODEL).reasons[0]
    assert not hw.judge(spec, SEED, root, wanted, openings[:-1], 0.01, MODEL).passed


def test_time_budget_separates_a_cpu_from_a_claimed_gpu() -> None:
    spec = hw.spec_for("RTX-4090", CATALOG, MODEL, n_gpu=4096)
    budget = MODEL.budget(spec.n, spec.claimed_tflops, spec.on_device)
    assert spec.dtype == "fp16" and budget.compute_s < 0.01
    assert budget.total_s < 1.5  # a 4096² fp32 product alone takes this box ≥ 3 s
    # This 2-core box multiplies 4096² fp32 in ≥ 3 s: a CPU claiming a 4090 is late.
    slow = MODEL.proven_tflops(spec.n, 3.0, spec.on_device)
    assert hw.proven_class(slow, CATALOG, MODEL) == "CPU"
    fast = MODEL.proven_tflops(spec.n, budget.compute_s * 0.99, spec.on_device)
    assert CATALOG[hw.proven_class(fast, CATALOG, MODEL) or ""] >= CATALOG["RTX-4090"]
    # The CPU class is a floor: 1 GFLOP/s after a generous overhead allowance.
    cpu = _cpu_spec(1024)
    assert MODEL.budget(cpu.n, cpu.claimed_tflops, False).total_s > 2.0


def test_memory_chase_honest_passes_and_missing_memory_is_caught() -> None:
    spec = mp.MemSpec(words=mp.LANES * 64, chases=256, steps=32, samples=64)
    buf = mp.fill(SEED, spec)
    assert np.array_equal(
        mp.words_at(SEED, spec, np.array([5, 70_000, spec.words - 1])),
        buf[[5, 70_000, spec.words - 1]],
    )
    trace = mp.chase(buf, b"c" * 32, spec)
    ok = mp.judge(SEED, b"c" * 32, spec, trace, 0.05, b"pick")
    assert ok.passed, ok.reasons
    # A prover that kept half the buffer and answered the rest with guesses.
    half = buf.copy()
    half[spec.words // 2 :] = 0
    bad = mp.chase(half, b"c" * 32, spec)
    v = mp.judge(SEED, b"c" * 32, spec, bad, 0.05, b"pick")
    assert not v.passed and v.wrong_samples > 0
    # The right words, but too slowly (recomputed instead of stored): the budget fails it.
    late = mp.judge(SEED, b"c" * 32, spec, trace, 100.0, b"pick")
    assert not late.passed and "budget" in late.reasons[0]
    assert not mp.judge(SEED, b"c" * 32, spec, trace[:-1], 0.05, b"pick").passed


def test_late_only_is_a_right_answer_over_its_time_and_nothing_else() -> None:
    late_mm = {"passed": False, "correct": True, "in_time": False}
    assert hw.late_only("matmul", late_mm)
    assert not hw.late_only("matmul", {**late_mm, "correct": False})
    assert not hw.late_only("matmul", {"passed": False, "reasons": ["no commitment"]})
    late_mem = {"passed": False, "wrong_samples": 0, "elapsed_s": 2.0, "budget_s": 1.0,
                "reasons": ["chase took 2.000 s; budget 1.000 s"]}  # fmt: skip
    assert hw.late_only("memory", late_mem)
    assert not hw.late_only("memory", {**late_mem, "wrong_samples": 3})
    assert not hw.late_only("memory", {**late_mem, "elapsed_s": 0.5})
    assert not hw.late_only("memory", {**late_mem, "reasons": ["trace has the wrong shape"] * 2})
    assert not hw.late_only("memory", {**late_mem, "passed": True})
