"""The logprobs a provider uploads with an answer (protocol LogprobMsg,
PromptLogprobsMsg), and the prompt's, scored by the engine for echo with logprobs."""

from __future__ import annotations

from typing import Any

from idlegrid.engines.base import Engine
from idlegrid.errors import InvalidRequest


def score_prompt(engine: Engine, ids: list[int], k: int) -> Any:
    """The prompt's logprobs (core/trust/prompt_lp.py), by the engine's scoring pass;
    InvalidRequest naming `echo` for an engine that cannot score a prompt."""
    from idlegrid.core.trust import prompt_lp

    if not hasattr(engine, "score_prompt"):
        raise InvalidRequest(
            f"engine {engine.name} cannot score prompts (echo with logprobs)", param="echo"
        )
    rows: list[Any] = []
    engine.score_prompt(ids, lambda p, lg: rows.append(prompt_lp.score(lg, ids[p + 1], k)))
    return prompt_lp.PromptLogprobs(k, tuple(rows))


def prompt_msg(engine: Engine, ids: list[int], scored: Any) -> dict[str, Any]:
    """The prompt's logprobs as uploaded (protocol PromptLogprobsMsg)."""
    return {
        "first": engine.detokenize(ids[:1]).hex(),
        "rows": [logprob_msg(engine, r) for r in scored.rows],
    }


def logprob_msg(engine: Engine, lp: Any) -> dict[str, Any] | None:
    """A piece's logprobs as uploaded (None for text flushed without a token)."""
    if lp is None:
        return None
    return {
        "lp": lp.logprob,
        "bytes": engine.detokenize([lp.token]).hex(),
        "top": [[t, v, engine.detokenize([t]).hex()] for t, v in lp.top],
    }
