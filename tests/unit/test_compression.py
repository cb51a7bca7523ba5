"""Quantizers, AQ-SGD caches and error feedback: error bounds, bytes on the wire, sync."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from idlegrid.comm.aqsgd import (  # noqa: E402
    AqSgdReceiver,
    AqSgdSender,
    DirectReceiver,
    DirectSender,
)
from idlegrid.comm.gradients import ErrorFeedback, GradientExchange  # noqa: E402
from idlegrid.comm.quantize import (  # noqa: E402
    SUPPORTED_BITS,
    dequantize,
    error_bound,
    pack_bits,
    quantize,
    unpack_bits,
)


def _rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1001,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_channel_quantizer_error_bound_and_bytes(bits: int) -> None:
    x = _rand(6, 20, 32, seed=bits)
    x[:, :, 3] *= 50  # one loud channel must not hurt the others (per-channel scales)
    x[:, :, 7] = 0  # and a silent channel must survive
    q = quantize(x, bits)
    y = dequantize(q)
    assert y.shape == x.shape
    err = (x - y).abs()
    assert torch.all(err <= error_bound(q) + 1e-6)
    assert torch.all(y[:, :, 7] == 0)
    levels = (1 << (bits - 1)) - 1
    assert torch.all(error_bound(q)[0, 0] <= x.abs().amax(dim=(0, 1)) * 1.002 / (2 * levels))
    assert q.nbytes == math.ceil(x.numel() * bits / 8) + 2 * 32  # codes + fp16 scales


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bucket_quantizer_pads_and_bounds(bits: int) -> None:
    x = _rand(1000, seed=1)
    q = quantize(x, bits, bucket=128)
    assert q.scale.numel() == 8
    assert torch.all((x - dequantize(q)).abs() <= error_bound(q) + 1e-6)


def test_more_bits_less_error() -> None:
    x = _rand(8, 16, 64, seed=3)
    errs = [float((x - dequantize(quantize(x, b))).norm()) for b in SUPPORTED_BITS]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((200, 1), 0.3)
    x[0, 0] = 1.0  # fixes the scale at 1: 2-bit levels are -1, 0, 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [dequantize(quantize(x, 2, stochastic=True, generator=g)) for _ in range(300)]
    )
    assert abs(float(draws[:, 1:].mean()) - 0.3) < 0.01
    assert abs(float(dequantize(quantize(x, 2))[1:].mean()) - 0.0) < 1e-9  # RTN biases to 0


def test_unsupported_bits() -> None:
    with pytest.raises(ValueError):
        quantize(torch.zeros(4), 5)


def test_aqsgd_caches_stay_bitwise_in_sync_and_error_shrinks() -> None:
    n, shape = 12, (5, 8)
    sender, receiver = AqSgdSender(n, shape, bits=2), AqSgdReceiver(n, shape)
    target = _rand(n, *shape, seed=9)
    errors, sizes = [], []
    for epoch in range(12):
        # activations drift toward a fixed point, as they do when training settles
        act_all = target + _rand(n, *shape, seed=100 + epoch) * 0.5**epoch
        for batch in (torch.tensor([3, 0, 7, 11]), torch.tensor([1, 2, 4, 5, 6, 8, 9, 10])):
            msg = sender.encode(batch, act_all[batch])
            got = receiver.decode(batch, msg)
            assert torch.equal(sender.cache.values, receiver.cache.values)
            assert torch.equal(got, sender.cache.values[batch])
            sizes.append(msg.nbytes)
            if epoch:
                errors.append(float((got - act_all[batch]).norm() / act_all[batch].norm()))
    # first visits are full fp32, later ones 2-bit deltas + one fp16 scale per channel
    assert sizes[0] == 4 * 5 * 8 * 4
    assert sizes[-1] == math.ceil(8 * 5 * 8 * 2 / 8) + 8 * 2
    assert errors[-1] < errors[0] / 10  # the "self-enforcing" shrinkage of AQ-SGD
    direct_err = float((dequantize(quantize(act_all, 2)) - act_all).norm() / act_all.norm())
    assert errors[-1] < direct_err / 10


def test_aqsgd_mixed_fresh_and_seen_rows() -> None:
    sender, receiver = AqSgdSender(6, (3,), bits=4), AqSgdReceiver(6, (3,))
    a = _rand(6, 3, seed=1)
    receiver.decode(torch.tensor([0, 1]), sender.encode(torch.tensor([0, 1]), a[:2]))
    ids = torch.tensor([1, 4, 0])
    msg = sender.encode(ids, a[ids] + 0.01)
    assert msg.fresh.tolist() == [False, True, False]
    got = receiver.decode(ids, msg)
    assert torch.equal(got[1], a[4] + 0.01)  # the fresh row went through unquantized
    assert torch.allclose(got, a[ids] + 0.01, atol=0.02)
    assert torch.equal(sender.cache.values, receiver.cache.values)


def test_direct_quantization_round_trip() -> None:
    x = _rand(4, 6, 8, seed=2)
    msg = DirectSender(8).encode(torch.arange(4), x)
    y = DirectReceiver().decode(torch.arange(4), msg)
    assert torch.all((x - y).abs() <= error_bound(msg.delta) + 1e-6)
    assert msg.nbytes == 4 * 6 * 8 + 2 * 8


def test_error_feedback_carries_what_quantization_drops() -> None:
    ef = ErrorFeedback(bits=2, bucket=64)
    g = _rand(256, seed=4)
    sent = torch.zeros(256)
    for _ in range(50):
        sent += dequantize(ef.compress("w", g))
    # Σ sent = Σ g − final residual, so the running mean converges to g
    assert torch.allclose(sent + ef.residual["w"], 50 * g, atol=1e-4)
    assert float((sent / 50 - g).norm()) < 0.05 * float(g.norm())
    one_shot = float((dequantize(quantize(g, 2, bucket=64)) - g).norm())
    assert float((sent / 50 - g).norm()) < one_shot / 10


def test_gradient_exchange_averages_and_counts_bytes() -> None:
    grads = [{"w": _rand(300, seed=s), "b": _rand(7, seed=10 + s)} for s in range(3)]
    exact = GradientExchange(3, None).exchange(grads)
    assert torch.allclose(exact["w"], (grads[0]["w"] + grads[1]["w"] + grads[2]["w"]) / 3)
    ex = GradientExchange(3, 8, bucket=100)
    out = ex.exchange(grads)
    assert torch.allclose(out["w"], exact["w"], atol=0.05)
    # one flat message per worker: 307 values at 1 byte + an fp16 scale per bucket of 100
    assert ex.bytes_up == 3 * (307 + 2 * 4)
    assert ex.bytes_down == ex.bytes_up
    with pytest.raises(ValueError):
        ex.exchange(grads[:2])
