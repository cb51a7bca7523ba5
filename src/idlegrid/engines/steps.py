"""The sampling around every engine's own pick, shared by provider and verifier.

Provider side (`Steps`): each position's logits get the request's penalties (over this
choice's own output so far) and logit_bias (`core/trust/adjust.py`), the engine's pick
samples from the adjusted logits, and the logprobs the request asked for are taken from
the same adjusted logits (`core/trust/logprobs.py`). Verifier side (`Replayer`): the same
adjustment from the committed header and token history, the seeded replay, and the
recomputation of the committed logprobs.

Order per position, the same on both sides: penalties and bias (`adjust_logits`), then the
grammar's mask when the answer is constrained (structured outputs: forbidden tokens at
−inf), then the engine's seeded temperature/top-p draw. Logprobs are taken AFTER the mask:
the distribution the token was actually drawn from, so a constrained answer reports the
probabilities among the tokens the grammar allowed (forbidden alternatives never appear
unless fewer than k tokens are allowed, at `logprobs.FLOOR`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from idlegrid.core import grammar
from idlegrid.core.trust import adjust as adj
from idlegrid.core.trust import batch_sampling, sampling
from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust.extras import Extras
from idlegrid.engines.base import SamplingParams
from idlegrid.errors import InvalidRequest

Pick = Callable[[np.ndarray, int, int, SamplingParams], int]


def adjust_of(params: SamplingParams) -> adj.Adjust:
    """The request's logit adjustments (neutral when it asked for none)."""
    return params.adjust if params.adjust is not None else adj.Adjust()


def extras_of(params: SamplingParams) -> Extras:
    """What a commitment records about these params beyond seed, temperature and top_p."""
    a = adjust_of(params)
    top = -1 if params.logprobs is None else params.logprobs
    return Extras(a, params.n_prior if a.penalised else 0, top)


class SeededPick:
    """The seeded Gumbel-max draw of an engine: one row, or every row of a batched step."""

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        return sampling.choose(logits, seed, position, params.temperature, params.top_p)

    def _pick_rows(
        self,
        logits: np.ndarray,
        seeds: Sequence[int],
        positions: Sequence[int],
        params: Sequence[SamplingParams],
    ) -> list[int]:
        """`_pick` of every row of an (n, vocab) array, in one vectorised pass."""
        if type(self)._pick is not SeededPick._pick:  # a subclass's own draw (cheats)
            return [self._pick(*a) for a in zip(logits, seeds, positions, params, strict=True)]
        temps, top_ps = [q.temperature for q in params], [q.top_p for q in params]
        return batch_sampling.choose_rows(logits, seeds, positions, temps, top_ps)


class Steps:
    """One generation's sampler state: the choice's token counts and the last logprobs."""

    def __init__(
        self, context: Sequence[int], params: SamplingParams, vocab_size: int | None = None
    ) -> None:
        self.params = params
        self.adjust = adjust_of(params)
        if vocab_size is not None:
            try:
                adj.check_vocab(self.adjust, vocab_size)
            except adj.AdjustError as exc:
                raise InvalidRequest(str(exc), param=exc.param) from exc
        self.counts: dict[int, int] = {}
        if self.adjust.penalised and params.n_prior:
            for t in context[len(context) - params.n_prior :]:
                adj.count(self.counts, t)
        self.last: lpm.TokenLogprobs | None = None
        self._temperature = adj.f32(params.temperature)

    def pick(
        self,
        pick: Pick,
        logits: np.ndarray,
        seed: int,
        position: int,
        mask: np.ndarray | None = None,
    ) -> int:
        """The engine's `pick` on the adjusted logits, masked by the grammar's bitmask `mask`
        when constrained; records the token and its logprobs (after the mask)."""
        z = adj.adjust_logits(logits, self.counts, self.adjust)
        if mask is not None:
            z = grammar.apply_mask(z, mask)
        token = pick(z, seed, position, self.params)
        k = self.params.logprobs
        if k is not None:
            # At the committed (float32) temperature: the verifier's, so that one class
            # reproduces the values exactly.
            self.last = lpm.token_logprobs(z, token, self._temperature, k)
        if self.adjust.penalised:
            adj.count(self.counts, token)
        return token


class Replayer:
    """The verifier's replay of one commitment, position by position."""

    def __init__(self, c: Any, context_ids: Sequence[int]) -> None:
        self.h = c.header
        self.tokens: list[int] = c.tokens
        self.logprobs = [lp for ch in c.chunks for lp in ch.logprobs]
        self.base = len(context_ids)
        ex: Extras = self.h.extras
        self.counts: dict[int, int] = {}
        if ex.adjust.penalised and ex.n_prior:
            for t in context_ids[max(0, self.base - ex.n_prior) :]:
                adj.count(self.counts, t)
        self.rechecks: list[lpm.Recheck] = []

    def step(self, r: int, logits: np.ndarray, ok: np.ndarray | None = None) -> sampling.Replay:
        """Replay committed token `r` from this engine's logits at its position (in order),
        with the grammar's allowed tokens `ok` (boolean per id) when constrained."""
        h, tok = self.h, self.tokens[r]
        z = adj.adjust_logits(logits, self.counts, h.extras.adjust)
        if ok is not None:
            z = grammar.masked(z, ok)
        if self.logprobs:
            self.rechecks.append(lpm.recheck(z, self.logprobs[r], h.temperature))
        if h.extras.adjust.penalised:
            adj.count(self.counts, tok)
        return sampling.replay(z, tok, h.seed, self.base + r, h.temperature, h.top_p)
