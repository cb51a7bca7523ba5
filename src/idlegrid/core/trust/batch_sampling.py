"""`sampling.choose` for every row of a batched decode step at once, with the same tokens.

A batched step has N rows of logits over a large vocabulary. Row by row, `choose` scales
the whole row to float64, hashes the whole vocabulary for the pruned Gumbel draw, and
merges candidate sets, each a pass over 262k entries in its own numpy calls. Here the
rows share the passes: one max and one threshold over the (N, vocab) array find each
row's likely tokens, their exact float64 scores are computed only for those, and the
vocabulary hash runs in cache-sized column blocks for all rows together, compared against
each row's bound before the last shift. Tokens are bit-identical to `choose` (what the
verifier replays): every score is the reference's own float64 expression on the same
element, the scaled maximum is the reference's (rounding is monotone, so max(l)/T is the
maximum of l/T), and ties go to the lowest id as `np.argmax` over ascending ids does.
Rows with temperature 0, top_p < 1, a small vocabulary or a near-zero temperature take
`choose` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from idlegrid.core.trust import sampling as s

CUT = -8.0  # the reference's first pruning cut; the row's best token is always above it
BLOCK = 1 << 15  # hash elements per block (256 KiB of uint64): stays in a core's L2
MIN_T = 1e-3  # below this the float32 pre-filter's margin is too thin to trust


def choose_rows(
    logits: np.ndarray,
    seeds: Sequence[int],
    positions: Sequence[int],
    temperatures: Sequence[float],
    top_ps: Sequence[float],
) -> list[int]:
    """`[sampling.choose(logits[i], seeds[i], positions[i], temperatures[i], top_ps[i])]`."""
    n, v = logits.shape
    fast = [
        i for i in range(n) if v >= s.FAST_FROM and temperatures[i] >= MIN_T and top_ps[i] >= 1.0
    ]
    out = [-1] * n
    for i in sorted(set(range(n)) - set(fast)):
        out[i] = s.choose(logits[i], seeds[i], positions[i], temperatures[i], top_ps[i])
    if fast:
        keys = [s.position_key(seeds[i], positions[i]) for i in fast]
        rows = logits if len(fast) == n else logits[fast]
        temps = np.array([temperatures[i] for i in fast], dtype=np.float64)
        for i, tok in zip(fast, _choose_fast(rows, keys, temps)[0], strict=True):
            out[i] = tok if tok >= 0 else s.choose(logits[i], seeds[i], positions[i],
                                                   temperatures[i], top_ps[i])  # fmt: skip
    return out


def _choose_fast(lg: np.ndarray, keys: list[int], t: np.ndarray) -> tuple[list[int], list[float]]:
    """Pruned Gumbel-max of every row (top_p = 1): its token (-1 where the row needs the
    reference) and winning score (`sampling._best_of`'s)."""
    n, v = lg.shape
    lmax = lg.max(axis=1)
    m = lmax.astype(np.float64) / t  # = max(l / T) of the reference's `_scaled`
    # A float32 pre-filter with a margin of T logits, then the exact test on the survivors.
    thr = (lmax.astype(np.float64) - (-CUT + 1.0) * t - 1e-3 * (1.0 + np.abs(lmax))).astype(
        lg.dtype
    )
    r, c = np.divmod(np.flatnonzero(lg >= thr[:, None]), v)
    z = _z(lg, r, c, t, m)
    keep = z >= CUT
    r, c, z = r[keep], c[keep], z[keep]
    key = np.array(keys, dtype=np.uint64)
    sc = z + _gumbel(c, key[r])
    best = np.full(n, -np.inf)
    np.maximum.at(best, r, sc)
    bound = np.full(n, np.iinfo(np.uint64).max, dtype=np.uint64)  # a bad row hits ~nothing
    bad = ~np.isfinite(m)
    for i in range(n):
        if bad[i] or not math.isfinite(best[i]):
            bad[i] = True
            continue
        # The reference's bound on the hash of a token below the cut that could still win.
        u_min = math.exp(-math.exp(-(float(best[i]) - CUT - 1e-6)))
        h_min = int(u_min * 2.0**53) - 1024
        if h_min <= 0:
            bad[i] = True
        else:
            bound[i] = h_min << 11  # h >= h_min  <=>  the hash before its final >> 11 >= this
    er, ec = _hash_above(key, bound, v)
    ez = _z(lg, er, ec, t, m)
    keep = ez >= -s.NOISE_RANGE
    er, ec, ez = er[keep], ec[keep], ez[keep]
    rows = np.concatenate([r, er])
    cols = np.concatenate([c, ec])
    scores = np.concatenate([sc, ez + _gumbel(ec, key[er])])
    order = np.lexsort((cols, -scores, rows))  # per row: best score, then the lowest id
    rows, cols, scores = rows[order], cols[order], scores[order]
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    out, won = [-1] * n, [math.nan] * n
    for j in first:
        if not bad[rows[j]]:
            out[int(rows[j])], won[int(rows[j])] = int(cols[j]), float(scores[j])
    return out, won


def _z(lg: np.ndarray, r: np.ndarray, c: np.ndarray, t: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The reference's scaled logits (`sampling._scaled`) at (r, c), element by element."""
    z: np.ndarray = lg[r, c].astype(np.float64)
    z /= t[r]
    z -= m[r]
    return z


def _gumbel(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`sampling.gumbel` for token `ids[k]` under step key `keys[k]`."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) * np.uint64(s._MIX) ^ keys
    u = (s._finish(x).astype(np.float64) + 0.5) * 2.0**-53
    g: np.ndarray = -np.log(-np.log(u))
    return g


def _pre(v: int) -> np.ndarray:
    pre = s._ALL.get(v)
    if pre is None:
        if len(s._ALL) >= 4:
            s._ALL.clear()
        with np.errstate(over="ignore"):
            pre = s._ALL[v] = np.arange(v, dtype=np.uint64) * np.uint64(s._MIX)
    return pre


def _hash_above(key: np.ndarray, bound: np.ndarray, v: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, id) of every token whose unshifted hash under row's key is >= bound[row]."""
    n = len(key)
    pre = _pre(v)
    width = max(1, BLOCK // n)
    x = np.empty((n, width), dtype=np.uint64)
    tmp = np.empty_like(x)
    hit = np.empty((n, width), dtype=bool)
    rs, cs = [], []
    kcol = key[:, None]
    pcol = ((bound >> np.uint64(33)) << np.uint64(33))[:, None]
    with np.errstate(over="ignore"):
        for lo in range(0, v, width):
            w = min(width, v - lo)
            xb, tb, hb = x[:, :w], tmp[:, :w], hit[:, :w]
            np.bitwise_xor(pre[None, lo : lo + w], kcol, out=xb)
            # splitmix64's finaliser, as sampling._finish, without the final shift
            xb += np.uint64(s._GOLDEN)
            np.right_shift(xb, np.uint64(30), out=tb)
            xb ^= tb
            xb *= np.uint64(0xBF58476D1CE4E5B9)
            np.right_shift(xb, np.uint64(27), out=tb)
            xb ^= tb
            xb *= np.uint64(0x94D049BB133111EB)
            # The last step, y ^ (y >> 31), keeps y's top 31 bits: a hash at or above the
            # bound has y at or above the bound's top bits, and the few such y finish below.
            np.greater_equal(xb, pcol, out=hb)
            at = np.flatnonzero(hb)
            if len(at):
                r, c = np.divmod(at, w)
                y = xb[r, c]
                ok = (y ^ (y >> np.uint64(31))) >= bound[r]
                rs.append(r[ok])
                cs.append(c[ok] + lo)
    if not rs:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)
    return np.concatenate(rs), np.concatenate(cs)
