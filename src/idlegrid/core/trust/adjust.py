"""Logit adjustments a request asks for: presence/frequency penalties and logit_bias.

OpenAI's definition, applied to the raw logits before temperature and top-p (greedy too):

    logit[t] += bias[t] - presence * [count[t] > 0] - frequency * count[t]

where count[t] is how often t occurs among the tokens generated so far in this choice
(earlier attempts' tokens included after a failover; the prompt never counts). Pure, so
the provider's sampler and the verifier's replay apply the very same function to the same
committed history. Values are rounded to float32 once, where they enter (`make`): the
commitment header stores float32, and provider and verifier then add the same numbers.

Independent of masks (structured outputs): a mask applies to the adjusted logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

PENALTY_RANGE = 2.0  # OpenAI: presence_penalty and frequency_penalty in [-2, 2]
BIAS_RANGE = 100.0  # OpenAI: logit_bias values in [-100, 100]; -100 effectively bans
MAX_BIAS_TOKENS = 300


class AdjustError(ValueError):
    """A penalty or bias outside OpenAI's ranges; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def f32(x: float) -> float:
    """`x` rounded to float32 (what a commitment header stores)."""
    return float(np.float32(x))


@dataclass(frozen=True)
class Adjust:
    """What one request adds to the logits; the default changes nothing."""

    presence: float = 0.0
    frequency: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, value), ascending ids

    @property
    def neutral(self) -> bool:
        """True when logits pass through unchanged (the fast path)."""
        return self.presence == 0 and self.frequency == 0 and not self.bias

    @property
    def penalised(self) -> bool:
        """True when the choice's own history matters."""
        return self.presence != 0 or self.frequency != 0


def make(
    presence: float | None = 0.0,
    frequency: float | None = 0.0,
    bias: Mapping[int, float] | Mapping[str, float] | None = None,
) -> Adjust:
    """Validate a request's penalties and bias (AdjustError naming the field) and round them."""
    for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if v is not None and not (-PENALTY_RANGE <= v <= PENALTY_RANGE):
            raise AdjustError(f"{name} must be between -2 and 2", name)
    entries: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise AdjustError(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if token < 0 or str(token) != str(key).strip():
            raise AdjustError(f"logit_bias key {key!r} is not a token id", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AdjustError(f"logit_bias value for {token} is not a number", "logit_bias")
        if not -BIAS_RANGE <= value <= BIAS_RANGE:
            raise AdjustError(
                f"logit_bias value for {token} must be between -100 and 100", "logit_bias"
            )
        entries[token] = f32(value)
    if len(entries) > MAX_BIAS_TOKENS:
        raise AdjustError(f"logit_bias holds at most {MAX_BIAS_TOKENS} tokens", "logit_bias")
    return Adjust(f32(presence or 0.0), f32(frequency or 0.0), tuple(sorted(entries.items())))


def check_vocab(adj: Adjust, vocab_size: int) -> None:
    """AdjustError (param logit_bias) if a biased token is not in the model's vocabulary."""
    bad = [t for t, _ in adj.bias if t >= vocab_size]
    if bad:
        raise AdjustError(
            f"logit_bias token {bad[0]} is not in this model's vocabulary ({vocab_size} ids)",
            "logit_bias",
        )


def count(counts: dict[int, int], token: int) -> None:
    """Add one generated token to a choice's counts (in place)."""
    counts[token] = counts.get(token, 0) + 1


def adjust_logits(logits: np.ndarray, counts: Mapping[int, int], adj: Adjust) -> np.ndarray:
    """The logits with penalties over `counts` (token -> times generated) and bias applied.

    Neutral: `logits` itself, no copy. Otherwise a float64 copy: the sampler works in
    float64 anyway, and both sides of an audit then add in the same precision.
    """
    if adj.neutral:
        return logits
    z = logits.astype(np.float64)
    if adj.penalised and counts:
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        keep = ids < len(z)
        z[ids[keep]] -= adj.frequency * n[keep] + adj.presence * (n[keep] > 0)
    if adj.bias:
        ids = np.fromiter((t for t, _ in adj.bias), dtype=np.int64, count=len(adj.bias))
        vals = np.fromiter((b for _, b in adj.bias), dtype=np.float64, count=len(adj.bias))
        keep = ids < len(z)
        z[ids[keep]] += vals[keep]
    return z


def header_faults(
    presence: float,
    frequency: float,
    bias: tuple[tuple[int, float], ...],
    expected: Adjust,
) -> list[str]:
    """Why a commitment's committed adjustments are not the request's (empty: they are)."""
    got = Adjust(presence, frequency, tuple(bias))
    if got == expected:
        return []
    return ["commitment's penalties or logit_bias differ from the request"]
