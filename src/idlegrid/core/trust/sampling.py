"""Seeded Gumbel-max sampling that a verifier can replay from its own logits.

The noise for token t at absolute position i is a pure function of (seed, i, t): a
counter-based hash (splitmix64), not a stateful generator, so the verifier needs no
provider state and the order in which an engine visits tokens does not matter. The chosen
token is argmax over the nucleus of logits/T + g. A small error in the logits moves each
score a little, so the verifier accepts the committed token when its score trails the
best competitor by no more than a calibrated margin (near-ties), and the nucleus boundary
gets a slack of its own. Temperature 0 is plain argmax (g = 0).

The seed comes from the request (coordinator), never from the provider.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# A token whose scaled logit is this far below the best cannot win: Gumbel noise from a
# 53-bit uniform lies in [-3.62, 37.43], a range of 41.05.
NOISE_RANGE = 42.0


def _splitmix(x: int) -> int:
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The 64-bit key of one sampling step."""
    return _splitmix(_splitmix(seed & _M64) ^ (position & _M64))


def gumbel(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """Gumbel noise for `token_ids` at `position` (float64), a pure function of its inputs."""
    key = np.uint64(position_key(seed, position))
    with np.errstate(over="ignore"):
        x = token_ids.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03) ^ key
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    out: np.ndarray = -np.log(-np.log(u))
    return out


def _nucleus_before(probs: np.ndarray) -> np.ndarray:
    """For each token, the probability mass of tokens ranked strictly before it."""
    order = np.lexsort((np.arange(len(probs)), -probs))  # by prob desc, then id
    before = np.empty_like(probs)
    before[order] = np.cumsum(probs[order]) - probs[order]
    return before


def _scaled(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    return z - z.max()


def choose(logits: np.ndarray, seed: int, position: int, temperature: float,
           top_p: float = 1.0) -> int:
    """The token a provider must emit at `position` given its logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = _scaled(logits, temperature)
    cand = np.flatnonzero(z >= -NOISE_RANGE)
    if top_p < 1.0:
        p = np.exp(z)
        p /= p.sum()
        before = _nucleus_before(p)
        # The most likely token is always in the nucleus (top_p = 0 means greedy).
        cand = cand[(before[cand] < top_p) | (before[cand] == 0)]
    scores = z[cand] + gumbel(seed, position, cand)
    return int(cand[int(np.argmax(scores))])


@dataclass(frozen=True)
class Replay:
    """What a verifier recomputes about one committed token."""

    margin: float  # committed token's score minus the best other eligible score (≥ 0: it won)
    allowed: bool  # the token lies inside the nucleus (with slack)


def replay(logits: np.ndarray, token: int, seed: int, position: int, temperature: float,
           top_p: float = 1.0, top_p_slack: float = 1e-4) -> Replay:
    """How clearly `token` wins the seeded draw under the verifier's own logits."""
    if not 0 <= token < len(logits):
        return Replay(float("-inf"), False)
    if temperature <= 0:
        z = logits.astype(np.float64)
        others = np.delete(z, token)
        best = others.max() if len(others) else -np.inf
        return Replay(float(z[token] - best), True)
    z = _scaled(logits, temperature)
    allowed = True
    cand = np.flatnonzero(z >= -NOISE_RANGE)
    if top_p < 1.0:
        p = np.exp(z)
        p /= p.sum()
        before = _nucleus_before(p)
        allowed = bool(before[token] < top_p + top_p_slack or before[token] == 0)
        # Competitors are only tokens surely inside the nucleus, whichever side of the
        # boundary a rounding error puts them on.
        cand = cand[(before[cand] < top_p - top_p_slack) | (before[cand] == 0)]
    cand = cand[cand != token]
    g_tok = float(gumbel(seed, position, np.array([token]))[0])
    mine = z[token] + g_tok
    if len(cand) == 0:
        return Replay(float("inf"), allowed)
    best = float(np.max(z[cand] + gumbel(seed, position, cand)))
    return Replay(float(mine - best), allowed)
