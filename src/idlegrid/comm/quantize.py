"""Low-bit quantization with real bit packing, so bytes on the wire are counted, not assumed.

Symmetric round-to-nearest with a zero level: b bits give codes -L..L, L = 2^(b-1) - 1,
step Δ = scale / L, so |x - Q(x)| ≤ Δ/2 = scale / (2L) for every element (2 bits: three
levels {-s, 0, s}; the fourth code is unused, as in AQ-SGD's fixpoint.py, which instead
keeps -2^(b-1) and clips the top). Scales go on the wire as fp16, rounded up so that the
bound still holds after the receiver reads them back.

Scale groups: `channel` (one scale per last-dim channel, reduced over batch and sequence:
AQ-SGD's choice for activations) or `bucket=n` (flattened runs of n elements: the
by-bucket mode AQ-SGD uses for gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_FP16_UP = 1 + 2.0**-10  # fp16 keeps 11 significant bits; this lifts any rounding back up


@dataclass(frozen=True)
class Quantized:
    """A packed b-bit tensor with its fp16 scales."""

    packed: torch.Tensor  # uint8, ceil(n·bits/8) bytes
    scale: torch.Tensor  # fp16, one per channel or bucket
    shape: tuple[int, ...]
    bits: int
    bucket: int | None

    @property
    def nbytes(self) -> int:
        """Bytes this message puts on the wire (codes + scales)."""
        return int(self.packed.numel() + 2 * self.scale.numel())


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) into a dense little-endian uint8 bit stream."""
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    planes = (flat.unsqueeze(1) >> torch.arange(bits)) & 1  # (n, bits), low bit first
    stream = planes.reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` codes as int64."""
    if bits == 8:
        return packed[:count].to(torch.int64)
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
    planes = stream.reshape(-1)[: count * bits].view(count, bits)
    return (planes << torch.arange(bits)).sum(dim=1)


def _levels(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return (1 << (bits - 1)) - 1


def _grouped(x: torch.Tensor, bucket: int | None) -> torch.Tensor:
    """x as (groups, members) for bucket mode, or (members, channels) for channel mode."""
    if bucket is None:
        return x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % bucket
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, bucket)


def quantize(
    x: torch.Tensor,
    bits: int,
    *,
    bucket: int | None = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Quantized:
    """Quantize x to `bits` per element (RTN, or unbiased stochastic rounding)."""
    levels = _levels(bits)
    g = _grouped(x.detach().to(torch.float32), bucket)
    reduce_dim = 0 if bucket is None else 1
    amax = g.abs().amax(dim=reduce_dim, keepdim=True)
    scale16 = (amax * _FP16_UP).to(torch.float16)
    scale = scale16.to(torch.float32)
    step = torch.where(scale > 0, scale / levels, torch.ones_like(scale))
    y = g / step
    if stochastic:
        noise = torch.rand(y.shape, generator=generator, dtype=y.dtype)
        y = torch.floor(y + noise)
    else:
        y = torch.round(y)
    codes = (y.clamp(-levels, levels) + levels).to(torch.int64).reshape(-1)[: x.numel()]
    return Quantized(pack_bits(codes, bits), scale16.reshape(-1), tuple(x.shape), bits, bucket)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 tensor the receiver reconstructs."""
    levels = _levels(q.bits)
    n = 1
    for s in q.shape:
        n *= s
    scale = q.scale.to(torch.float32)
    step = torch.where(scale > 0, scale / levels, torch.ones_like(scale))
    if q.bucket is None:
        channels = q.shape[-1] if q.shape else 1
        codes = unpack_bits(q.packed, q.bits, n).view(-1, channels)
        values = (codes - levels).to(torch.float32) * step.view(1, -1)
        return values.reshape(q.shape)
    groups = scale.numel()
    codes = unpack_bits(q.packed, q.bits, n)
    codes = torch.cat([codes, codes.new_full((groups * q.bucket - n,), levels)])  # padding: 0
    codes = codes.view(groups, q.bucket)
    values = (codes - levels).to(torch.float32) * step.view(-1, 1)
    return values.reshape(-1)[:n].reshape(q.shape)


def error_bound(q: Quantized) -> torch.Tensor:
    """Per-element bound on |x - dequantize(q)| under round-to-nearest, shaped like x."""
    levels = _levels(q.bits)
    half_step = q.scale.to(torch.float32) / (2 * levels)
    n = 1
    for s in q.shape:
        n *= s
    if q.bucket is None:
        channels = q.shape[-1] if q.shape else 1
        return half_step.view(1, -1).expand(n // channels, channels).reshape(q.shape)
    return half_step.view(-1, 1).expand(-1, q.bucket).reshape(-1)[:n].reshape(q.shape)
