"""Commitments for tests that speak the wire protocol by hand (no engine behind them).

The coordinator checks a commitment's shape, tokens, seed and finish reason before it
settles; only an audit looks at the hidden states. These are well-formed commitments with
placeholder states: they settle, and would fail any audit.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from idlegrid.core.trust import commitment as cm


def commitment_b64(
    tokens: Sequence[int],
    context_len: int,
    seed: int,
    finish_reason: str = "length",
    *,
    model: str = "fake",
    det_class: str = "fake/1/bytes/cpu/t1",
    ended_by_end_token: bool = False,
) -> str:
    """Base64 of a commitment to `tokens` after a context of `context_len` token ids."""
    hidden = 8
    entries = []
    for lo in range(0, len(tokens), cm.CHUNK_SIZE):
        n = len(tokens[lo : lo + cm.CHUNK_SIZE])
        k = cm.k_for(n)
        entries.append((list(range(k)), [1.0] * k))
    c = cm.build(
        model,
        det_class,
        list(range(3, 3 + context_len)),
        seed,
        0.0,
        1.0,
        list(tokens),
        entries,
        finish_reason,
        ended_by_end_token,
        hidden,
    )
    return base64.b64encode(c.encode()).decode()
