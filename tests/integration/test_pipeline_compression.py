"""A small GPT trained from scratch in a 4-stage × 2-replica pipeline, with and without
compression: AQ-SGD keeps the loss curve, cuts the bytes; DirectQ at 2 bits does not.

Seeds and data are fixed, so every number here is reproducible on one interpreter.
Stated tolerance: final loss (uncompressed evaluation of the trained model on the
training windows and on held-out windows) within 1 % of the uncompressed run, and every
25-step mean of the training loss within 3 % of the uncompressed run's after epoch one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from idlegrid.training.data import load_corpus, make_windows  # noqa: E402
from idlegrid.training.gpt import GPTConfig  # noqa: E402
from idlegrid.training.pipeline import RunConfig, RunResult, train  # noqa: E402

MODEL = GPTConfig(seq=32, layers=4, dim=48, heads=4)
STEPS, BATCH, SAMPLES, LR = 300, 16, 512, 2e-3  # 32 steps per epoch, ~9 epochs
FINAL_TOL, CURVE_TOL, WINDOW = 0.01, 0.03, 25

RUNS = {
    "fp32": RunConfig(steps=STEPS),
    "aqsgd4+grad8": RunConfig(method="aqsgd", fwd_bits=4, bwd_bits=8, grad_bits=8, steps=STEPS),
    # the 2-bit contrast is clear well before the end: half the steps keep the test short
    "aqsgd2": RunConfig(method="aqsgd", fwd_bits=2, bwd_bits=8, steps=STEPS // 2),
    "direct2": RunConfig(method="direct", fwd_bits=2, bwd_bits=8, steps=STEPS // 2),
}


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, RunResult]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead, and fix the numerics
    try:
        data = make_windows(load_corpus(), MODEL.seq, SAMPLES, 128)
        out = {}
        for name, cfg in RUNS.items():
            run = dataclasses.replace(cfg, batch=BATCH, lr=LR)
            out[name] = train(run, data, MODEL)
        _report(out)
        yield out
    finally:
        torch.set_num_threads(threads)


def _report(res: dict[str, RunResult]) -> None:
    base = res["fp32"]
    print(
        f"\n{'run':14} {'train':>7} {'held-out':>8} {'act MB':>7} {'act ×':>6} "
        f"{'bwd MB':>7} {'grad MB':>8} {'s':>5}"
    )
    for name, r in res.items():
        b = r.bytes
        print(
            f"{name:14} {r.train_loss:7.4f} {r.eval_loss:8.4f} {b['activations'] / 1e6:7.2f} "
            f"{b['activations_fp32'] / b['activations']:6.2f} {b['activation_grads'] / 1e6:7.2f} "
            f"{(b['gradients_up'] + b['gradients_down']) / 1e6:8.2f} {r.seconds:5.1f}"
        )
    grads = base.bytes["gradients_up"] + base.bytes["gradients_down"]
    print(f"(fp32 gradients up+down: {grads / 1e6:.2f} MB)")


def _windowed(losses: list[float]) -> list[float]:
    return [
        sum(losses[i : i + WINDOW]) / WINDOW for i in range(0, len(losses) - WINDOW + 1, WINDOW)
    ]


def test_training_learns(results: dict[str, RunResult]) -> None:
    base = results["fp32"]
    assert base.losses[0] > 5.0  # ln 256 ≈ 5.55: a fresh byte model
    assert base.train_loss < 2.2 and base.eval_loss < 3.0


def test_aqsgd_keeps_the_loss_within_tolerance(results: dict[str, RunResult]) -> None:
    base, aq = results["fp32"], results["aqsgd4+grad8"]
    assert abs(aq.train_loss / base.train_loss - 1) <= FINAL_TOL
    assert abs(aq.eval_loss / base.eval_loss - 1) <= FINAL_TOL
    epoch = SAMPLES // BATCH
    for i, (a, b) in enumerate(zip(_windowed(aq.losses), _windowed(base.losses), strict=True)):
        if i * WINDOW >= epoch:
            assert abs(a / b - 1) <= CURVE_TOL, f"window {i}: {a:.4f} vs {b:.4f}"


def test_aqsgd_cuts_the_bytes(results: dict[str, RunResult]) -> None:
    base, aq = results["fp32"], results["aqsgd4+grad8"]
    assert base.bytes["activations"] == base.bytes["activations_fp32"]
    assert aq.bytes["activations_fp32"] == base.bytes["activations_fp32"]
    # first visits travel in fp32, so the cut grows with epochs (32 / 4.33 bits at most)
    assert base.bytes["activations"] / aq.bytes["activations"] >= 4.0
    assert base.bytes["activation_grads"] / aq.bytes["activation_grads"] >= 3.5
    assert base.bytes["gradients_up"] / aq.bytes["gradients_up"] >= 3.9
    assert base.bytes["gradients_down"] / aq.bytes["gradients_down"] >= 3.9


def test_deltas_beat_direct_quantization_at_two_bits(results: dict[str, RunResult]) -> None:
    aq, direct = results["aqsgd2"], results["direct2"]
    assert aq.train_loss < direct.train_loss
    assert aq.eval_loss < direct.eval_loss
