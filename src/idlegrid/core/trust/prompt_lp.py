"""Prompt logprobs (completions with `echo` and `logprobs`): each prompt token's
log-probability given the tokens before it, and the k likeliest tokens there.

Which distribution: the model's own, log-softmax of the raw logits (temperature 1, no
penalties, no bias). Sampling settings shape what is drawn and prompt text was not drawn;
scoring text under the model is what evaluation harnesses use echo for (vLLM's
`prompt_logprobs` are the same). The first token has none (OpenAI's null).

The provider computes them in one scoring pass and commits them after the answer's chunks;
the header binds their SHA-256 (`commitment.Header.prompt_digest`). A verifier recomputes
them by the same pass and reports its values at the committed ids: the audit judges them
with the logprob tolerance, and at the prompt's own token ids, so a provider cannot
relabel positions.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust.extras import decode_logprobs, encode_logprobs
from idlegrid.core.trust.logprobs import TokenLogprobs

MAX_K = 5  # completions' logprobs: 0 to 5 alternatives
MAX_ROWS = 1 << 17


@dataclass(frozen=True)
class PromptLogprobs:
    """Positions 1..n-1 of an n-token prompt, each with `k` alternatives."""

    k: int
    rows: tuple[TokenLogprobs, ...]

    def encode(self) -> bytes:
        """`<IH` rows and k, uint32 token ids, then the values as a chunk's logprobs."""
        n = len(self.rows)
        ids = struct.pack(f"<{n}I", *(r.token for r in self.rows))
        return struct.pack("<IH", n, self.k) + ids + encode_logprobs(self.rows)

    def digest(self) -> bytes:
        """What the commitment's header binds."""
        return hashlib.sha256(b"idlegrid-prompt-logprobs" + self.encode()).digest()


def decode(take: Callable[[int], bytes]) -> PromptLogprobs:
    """The section `encode` wrote (ValueError if malformed)."""
    n, k = struct.unpack("<IH", take(6))
    if n > MAX_ROWS or k > MAX_K:
        raise ValueError("prompt logprobs out of range")
    ids = struct.unpack(f"<{n}I", take(4 * n))
    rows = decode_logprobs(take, ids, k)
    if not all(r.logprob <= 0 and all(v <= 0 for _, v in r.top) for r in rows):
        raise ValueError("a prompt log-probability above 0 or not a number")
    return PromptLogprobs(k, rows)


def faults(
    committed: PromptLogprobs | None, rechecks: Sequence[lpm.Recheck], tol: float
) -> list[str]:
    """Why committed prompt logprobs disagree with a verifier's recomputation."""
    if committed is None:
        return ["report has prompt logprobs the commitment lacks"] if rechecks else []
    if len(rechecks) != len(committed.rows):
        return ["report covers other prompt positions than the commitment"]
    found = {f for lp, rc in zip(committed.rows, rechecks, strict=True)
             for f in lpm.faults(lp, rc, tol)}  # fmt: skip
    return [f"prompt: {f}" for f in sorted(found)]


def score(logits_row: np.ndarray, next_token: int, k: int) -> TokenLogprobs:
    """One position's entry: `next_token`'s log-probability under these logits."""
    return lpm.token_logprobs(logits_row, next_token, 1.0, k)


def recheck_at(logits_row: np.ndarray, lp: TokenLogprobs, prompt_token: int) -> lpm.Recheck:
    """The verifier's values for one committed position, read at the prompt's own token
    there (a relabelled position then disagrees), at temperature 1."""
    return lpm.recheck(logits_row, TokenLogprobs(prompt_token, lp.logprob, lp.top), 1.0)
