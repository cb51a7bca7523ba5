"""AQ-SGD (Wang et al., NeurIPS 2022): send the quantized *change* of each sample's activation.

Both ends of a pipeline boundary keep m(ξ), the last activation of sample ξ as the
receiver reconstructed it. The first visit of ξ goes in full precision; afterwards the
sender ships Q(a(ξ) - m(ξ)) and both ends set m(ξ) += deQ(...). The receiver computes on
m(ξ). Since sender and receiver run the same update on the same bytes, their caches are
bitwise equal, which the sender relies on: it never needs to ask what the receiver holds.

Backward activation-gradients have no per-sample history and are quantized directly.
Sample ids are not sent: both stages draw the batch order from the job's data seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlegrid.comm.quantize import Quantized, dequantize, quantize


@dataclass(frozen=True)
class ActivationMessage:
    """What crosses the link for one batch: full rows for fresh samples, a delta for others."""

    fresh: torch.Tensor  # bool, per batch row: first visit of that sample
    full: torch.Tensor | None  # fresh rows, in the first-visit dtype
    delta: Quantized | None  # seen rows, quantized change since last visit

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        n = 0
        if self.full is not None:
            n += self.full.numel() * self.full.element_size()
        if self.delta is not None:
            n += self.delta.nbytes
        return n


class SampleCache:
    """m(ξ) for every training sample, one per boundary end."""

    def __init__(self, num_samples: int, sample_shape: tuple[int, ...]) -> None:
        self.values = torch.zeros((num_samples, *sample_shape), dtype=torch.float32)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)

    def apply(self, ids: torch.Tensor, msg: ActivationMessage) -> torch.Tensor:
        """Fold a message into the cache (identically on both ends); return m for ids."""
        fresh = msg.fresh
        if msg.full is not None:
            self.values[ids[fresh]] = msg.full.to(torch.float32)
            self.seen[ids[fresh]] = True
        if msg.delta is not None:
            old = ids[~fresh]
            self.values[old] = self.values[old] + dequantize(msg.delta)
        return self.values[ids].clone()


class AqSgdSender:
    """The upstream end of a boundary: encodes activations against its cache."""

    def __init__(
        self,
        num_samples: int,
        sample_shape: tuple[int, ...],
        bits: int,
        *,
        first_dtype: torch.dtype = torch.float32,
        stochastic: bool = False,
        bucket: int | None = None,
        seed: int = 0,
    ) -> None:
        self.cache = SampleCache(num_samples, sample_shape)
        self.bits, self.first_dtype, self.stochastic = bits, first_dtype, stochastic
        self.bucket = bucket  # None: a scale per channel (AQ-SGD); hidden size: per token
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, ids: torch.Tensor, act: torch.Tensor) -> ActivationMessage:
        """Encode a batch of activations (rows = samples `ids`) and update the cache."""
        act = act.detach().to(torch.float32)
        fresh = ~self.cache.seen[ids]
        full = act[fresh].to(self.first_dtype) if bool(fresh.any()) else None
        delta = None
        if not bool(fresh.all()):
            old = ids[~fresh]
            delta = quantize(
                act[~fresh] - self.cache.values[old],
                self.bits,
                bucket=self.bucket,
                stochastic=self.stochastic,
                generator=self.generator,
            )
        msg = ActivationMessage(fresh, full, delta)
        self.cache.apply(ids, msg)
        return msg


class AqSgdReceiver:
    """The downstream end: reconstructs m(ξ) from messages."""

    def __init__(self, num_samples: int, sample_shape: tuple[int, ...]) -> None:
        self.cache = SampleCache(num_samples, sample_shape)

    def decode(self, ids: torch.Tensor, msg: ActivationMessage) -> torch.Tensor:
        """The activations the next stage computes on."""
        return self.cache.apply(ids, msg)


class DirectSender:
    """DirectQ baseline: quantize activations themselves, no history (AQ-SGD's foil)."""

    def __init__(self, bits: int, bucket: int | None = None) -> None:
        self.bits, self.bucket = bits, bucket

    def encode(self, ids: torch.Tensor, act: torch.Tensor) -> ActivationMessage:
        """Quantize the whole batch."""
        fresh = torch.zeros(len(ids), dtype=torch.bool)
        return ActivationMessage(fresh, None, quantize(act.detach(), self.bits, bucket=self.bucket))


class DirectReceiver:
    """Decodes DirectSender messages."""

    def decode(self, ids: torch.Tensor, msg: ActivationMessage) -> torch.Tensor:
        """Dequantize."""
        assert msg.delta is not None
        return dequantize(msg.delta)


class RawSender:
    """No compression: fp32 rows every time (the baseline the savings are measured against)."""

    def encode(self, ids: torch.Tensor, act: torch.Tensor) -> ActivationMessage:
        """Ship the activations as they are."""
        fresh = torch.ones(len(ids), dtype=torch.bool)
        return ActivationMessage(fresh, act.detach().to(torch.float32), None)


class RawReceiver:
    """Decodes RawSender messages."""

    def decode(self, ids: torch.Tensor, msg: ActivationMessage) -> torch.Tensor:
        """The activations as sent."""
        assert msg.full is not None
        return msg.full.clone()
