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

import math
from dataclasses import dataclass

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX = 0xD1B54A32D192ED03
# A token whose scaled logit is this far below the best cannot win: Gumbel noise from a
# 53-bit uniform lies in [-3.62, 37.43], a range of 41.05.
NOISE_RANGE = 42.0
# From this vocabulary size on, choose/replay prune (same answer, see _best_of): a 262k
# vocabulary costs ~16 ms a token exhaustively (~60 ms with top-p), ~1-3 ms pruned.
FAST_FROM = 4096


def _splitmix(x: int) -> int:
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The 64-bit key of one sampling step."""
    return _splitmix(_splitmix(seed & _M64) ^ (position & _M64))


def _finish(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser in place on (id * _MIX ^ key), then the top 53 bits."""
    tmp = np.empty_like(x)
    with np.errstate(over="ignore"):
        x += np.uint64(_GOLDEN)
        np.right_shift(x, np.uint64(30), out=tmp)
        x ^= tmp
        x *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(x, np.uint64(27), out=tmp)
        x ^= tmp
        x *= np.uint64(0x94D049BB133111EB)
        np.right_shift(x, np.uint64(31), out=tmp)
        x ^= tmp
    np.right_shift(x, np.uint64(11), out=x)
    return x


def _hash53(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    key = np.uint64(position_key(seed, position))
    with np.errstate(over="ignore"):
        x = token_ids.astype(np.uint64) * np.uint64(_MIX) ^ key
    return _finish(x)


def gumbel(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """Gumbel noise for `token_ids` at `position` (float64), a pure function of its inputs."""
    u = (_hash53(seed, position, token_ids).astype(np.float64) + 0.5) * 2.0**-53
    out: np.ndarray = -np.log(-np.log(u))
    return out


def _nucleus_before(probs: np.ndarray) -> np.ndarray:
    """For each token, the probability mass of tokens ranked strictly before it."""
    order = np.lexsort((np.arange(len(probs)), -probs))  # by prob desc, then id
    before = np.empty_like(probs)
    before[order] = np.cumsum(probs[order]) - probs[order]
    return before


def _scaled(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64)
    z /= temperature
    z -= z.max()
    return z


def choose(
    logits: np.ndarray, seed: int, position: int, temperature: float, top_p: float = 1.0
) -> int:
    """The token a provider must emit at `position` given its logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    if len(logits) >= FAST_FROM:
        return _choose_pruned(logits, seed, position, temperature, top_p)
    return choose_exhaustive(logits, seed, position, temperature, top_p)


def choose_exhaustive(
    logits: np.ndarray, seed: int, position: int, temperature: float, top_p: float = 1.0
) -> int:
    """`choose` by the definition: noise for every eligible token (the reference)."""
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


def replay(
    logits: np.ndarray,
    token: int,
    seed: int,
    position: int,
    temperature: float,
    top_p: float = 1.0,
    top_p_slack: float = 1e-4,
) -> Replay:
    """How clearly `token` wins the seeded draw under the verifier's own logits."""
    if temperature > 0 and len(logits) >= FAST_FROM and 0 <= token < len(logits):
        return _replay_pruned(logits, token, seed, position, temperature, top_p, top_p_slack)
    return replay_exhaustive(logits, token, seed, position, temperature, top_p, top_p_slack)


def replay_exhaustive(
    logits: np.ndarray,
    token: int,
    seed: int,
    position: int,
    temperature: float,
    top_p: float = 1.0,
    top_p_slack: float = 1e-4,
) -> Replay:
    """`replay` by the definition (the reference)."""
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


# ---- pruned evaluation: the same answers as the exhaustive functions, for large vocabularies
#
# Noise is a function of a 53-bit hash h (u = (h + 0.5)·2⁻⁵³, g = −log(−log u)), so a token
# whose scaled logit is below `cut` can beat a score `best` only if g > best − cut, i.e. only
# if h is above a threshold. Hashing the whole vocabulary is integer work (~1 ms for 262k);
# the logarithms and the float scores are computed only for the few tokens that can win. The
# candidates keep their exact reference scores and ascending order, so the argmax (ties to
# the lower id) is the reference's.

_ALL: dict[int, np.ndarray] = {}


def _hash53_all(seed: int, position: int, n: int) -> np.ndarray:
    pre = _ALL.get(n)
    if pre is None:
        if len(_ALL) >= 4:
            _ALL.clear()
        with np.errstate(over="ignore"):
            pre = _ALL[n] = np.arange(n, dtype=np.uint64) * np.uint64(_MIX)
    return _finish(pre ^ np.uint64(position_key(seed, position)))


def _best_of(z: np.ndarray, seed: int, position: int, exclude: int) -> tuple[int, float]:
    """(token, score) of the best z + g over every token with z ≥ −NOISE_RANGE except `exclude`."""
    for cut in (-8.0, -16.0, -32.0):
        top = np.flatnonzero(z >= cut)
        top = top[top != exclude]
        if len(top):
            break
    else:
        return _best_exhaustive(z, seed, position, exclude)
    best = float(np.max(z[top] + gumbel(seed, position, top)))
    # A pruned token has z < cut, so it needs g > best − cut; 1e-6 and 1024 ulps of u keep
    # the bound on the safe side of every rounding in the reference's float arithmetic.
    u_min = math.exp(-math.exp(-(best - cut - 1e-6)))
    h_min = int(u_min * 2.0**53) - 1024
    if h_min <= 0:
        return _best_exhaustive(z, seed, position, exclude)
    extra = np.flatnonzero(_hash53_all(seed, position, len(z)) >= np.uint64(h_min))
    cand = np.union1d(top, extra)
    cand = cand[(z[cand] >= -NOISE_RANGE) & (cand != exclude)]
    scores = z[cand] + gumbel(seed, position, cand)
    i = int(np.argmax(scores))
    return int(cand[i]), float(scores[i])


def _best_exhaustive(z: np.ndarray, seed: int, position: int, exclude: int) -> tuple[int, float]:
    cand = np.flatnonzero(z >= -NOISE_RANGE)
    cand = cand[cand != exclude]
    if not len(cand):
        return -1, -math.inf
    scores = z[cand] + gumbel(seed, position, cand)
    i = int(np.argmax(scores))
    return int(cand[i]), float(scores[i])


def _nucleus_prefix(z: np.ndarray, need: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The most likely tokens in nucleus order and their `before` masses, bit-equal to
    `_nucleus_before` on that prefix, extended until it holds ≥ `need` of the mass (every
    token after it then has before ≥ need); None where that prefix would be too long."""
    p = np.exp(z)
    p /= p.sum()
    thr = 1e-3
    while True:
        sel = np.flatnonzero(p >= thr)  # all ties at the boundary are in: a true prefix
        order = sel[np.lexsort((sel, -p[sel]))]
        cs = np.cumsum(p[order])  # sequential, so equal to the full cumsum's prefix
        if len(cs) and cs[-1] >= need:
            return order, cs - p[order]
        if len(sel) > 50_000 or thr < 1e-12:
            return None
        thr *= 1e-3


def _choose_pruned(
    logits: np.ndarray, seed: int, position: int, temperature: float, top_p: float
) -> int:
    z = _scaled(logits, temperature)
    if top_p >= 1.0:
        return _best_of(z, seed, position, -1)[0]
    pre = _nucleus_prefix(z, top_p)
    if pre is None:
        return choose_exhaustive(logits, seed, position, temperature, top_p)
    order, before = pre
    cand = np.sort(order[(before < top_p) | (before == 0)])
    cand = cand[z[cand] >= -NOISE_RANGE]
    return int(cand[int(np.argmax(z[cand] + gumbel(seed, position, cand)))])


def _replay_pruned(
    logits: np.ndarray,
    token: int,
    seed: int,
    position: int,
    temperature: float,
    top_p: float,
    top_p_slack: float,
) -> Replay:
    z = _scaled(logits, temperature)
    mine = float(z[token] + gumbel(seed, position, np.array([token]))[0])
    if top_p >= 1.0:
        best = _best_of(z, seed, position, token)[1]
        return Replay(float(mine - best) if best > -math.inf else math.inf, True)
    pre = _nucleus_prefix(z, top_p + top_p_slack)
    if pre is None:
        return replay_exhaustive(logits, token, seed, position, temperature, top_p, top_p_slack)
    order, before = pre
    at = np.flatnonzero(order == token)
    allowed = bool(len(at)) and bool(before[at[0]] < top_p + top_p_slack or before[at[0]] == 0)
    cand = np.sort(order[(before < top_p - top_p_slack) | (before == 0)])
    cand = cand[(z[cand] >= -NOISE_RANGE) & (cand != token)]
    if not len(cand):
        return Replay(math.inf, allowed)
    best = float(np.max(z[cand] + gumbel(seed, position, cand)))
    return Replay(mine - best, allowed)
