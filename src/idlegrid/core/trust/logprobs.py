"""Log-probabilities reported to the consumer, and the audit's check of them.

Which distribution: log-softmax over the whole vocabulary of (logits + penalties + bias) /
T, at the request's temperature T (T = 0, greedy: T = 1, the adjusted model distribution,
so that greedy answers still say how sure the model was). top_p is NOT applied: the
nucleus renormalisation would give -inf to every alternative outside it and move with the
verifier's slack at the boundary, while these values are continuous in the logits, so a
verifier recomputes them within a tolerance. The sampled token's draw is still exactly the
seeded nucleus draw (`sampling.py`).

Constrained answers (structured outputs): the adjusted logits are masked by the grammar
first (`engines/steps`), so the distribution is over the tokens the grammar allows there. A
token it forbids has probability 0; its log-probability is reported as `FLOOR` (OpenAI's
-9999.0 for "impossible"), never -inf, so values stay finite in JSON, on the wire and in the
commitment, and a verifier's recomputation agrees exactly. It appears only when fewer than k
tokens are allowed.

Values are float32 (what is committed and sent); the top alternatives are the k most likely
tokens, ties to the lower id.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_TOP = 20  # chat top_logprobs 0..20; completions logprobs 0..5
FLOOR = -9999.0  # the log-probability of a token that cannot be drawn (masked out)


@dataclass(frozen=True)
class TokenLogprobs:
    """One position: the sampled token's log-probability and the k best alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _log_norm(z: np.ndarray) -> float:
    m = float(z.max())
    return m + float(np.log(np.exp(z - m, dtype=np.float64).sum()))


def scaled(adjusted: np.ndarray, temperature: float) -> np.ndarray:
    """The logits the reported distribution is the softmax of (float64)."""
    z = adjusted.astype(np.float64, copy=True)
    if temperature > 0 and temperature != 1.0:
        z /= temperature
    return z


def top_ids(z: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries' ids, by value descending then id (no full sort of z)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    m = float(z.max())
    for width in (4.0, 16.0, 64.0):
        cand = np.flatnonzero(z >= m - width)
        if len(cand) >= k:
            break
    else:
        cand = np.arange(len(z))
    order = np.lexsort((cand, -z[cand]))
    out: np.ndarray = cand[order[:k]]
    return out


def _f32(x: float) -> float:
    return float(np.float32(max(x, FLOOR)))  # max: -inf (a masked token) is FLOOR


def token_logprobs(adjusted: np.ndarray, token: int, temperature: float, k: int) -> TokenLogprobs:
    """What a provider reports for `token` sampled from `adjusted` logits."""
    z = scaled(adjusted, temperature)
    norm = _log_norm(z)
    top = top_ids(z, k)
    return TokenLogprobs(
        int(token),
        _f32(z[token] - norm),
        tuple((int(t), _f32(z[t] - norm)) for t in top),
    )


@dataclass(frozen=True)
class Recheck:
    """A verifier's own numbers for one committed position."""

    values: tuple[float, ...]  # log-probabilities of the committed token, then each top id
    kth: float  # the verifier's own k-th best log-probability (-inf when k = 0)


def recheck(adjusted: np.ndarray, lp: TokenLogprobs, temperature: float) -> Recheck:
    """The verifier's log-probabilities at the ids a provider committed for one position."""
    z = scaled(adjusted, temperature)
    norm = _log_norm(z)
    ids = [lp.token, *(t for t, _ in lp.top)]
    # float32, as the provider's are: the same class then agrees exactly
    vals = tuple(_f32(z[t] - norm) if 0 <= t < len(z) else float("nan") for t in ids)
    k = len(lp.top)
    kth = _f32(z[top_ids(z, k)[-1]] - norm) if k else float("-inf")
    return Recheck(vals, kth)


def faults(committed: TokenLogprobs, rc: Recheck, tol: float) -> list[str]:
    """Why committed log-probabilities disagree with a recomputation (empty: they agree)."""
    want = [committed.logprob, *(v for _, v in committed.top)]
    if len(rc.values) != len(want):
        return ["logprobs report has the wrong shape"]
    out = []
    if any(not abs(a - b) <= tol for a, b in zip(want, rc.values, strict=True)):
        out.append("reported logprobs are not the model's")
    ids = [t for t, _ in committed.top]
    if len(set(ids)) != len(ids) or any(v < rc.kth - tol for v in rc.values[1:]):
        out.append("reported top_logprobs are not the most likely tokens")
    return out


def encode_rechecks(chunks: Sequence[Sequence[Recheck]]) -> bytes:
    """An audit report's logprob section: the chunk count, then per chunk its token count
    and per token `<H` m, m float32 values, the float32 k-th best."""
    out = [struct.pack("<I", len(chunks))]
    for rows in chunks:
        out.append(struct.pack("<H", len(rows)))
        for rc in rows:
            m = len(rc.values)
            out.append(struct.pack(f"<H{m}ff", m, *rc.values, rc.kth))
    return b"".join(out)


def decode_rechecks(blob: bytes, pos: int, n_chunks: int) -> tuple[list[tuple[Recheck, ...]], int]:
    """The logprob section at `pos` for a report of `n_chunks` chunks, and the end position."""
    (n_section,) = struct.unpack_from("<I", blob, pos)
    pos += 4
    if n_section != n_chunks:
        raise ValueError("logprob section covers other chunks")
    out = []
    for _ in range(n_chunks):
        (n,) = struct.unpack_from("<H", blob, pos)
        pos += 2
        rows = []
        for _ in range(n):
            (m,) = struct.unpack_from("<H", blob, pos)
            vals = struct.unpack_from(f"<{m}ff", blob, pos + 2)
            pos += 2 + 4 * (m + 1)
            rows.append(Recheck(tuple(vals[:m]), vals[m]))
        out.append(tuple(rows))
    return out, pos
