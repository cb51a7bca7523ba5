"""Which OpenAI request fields the gateway honours, accepts without effect, or refuses.

One table per endpoint, consulted by the routes before anything is escrowed: a field the
gateway cannot honour is refused with a 400 naming it, so nobody pays for an answer that
quietly ignored what they asked for. The rule for a field in no table is the same: a 400
naming it (idlegrid's own extensions are in the tables; clients send them through the
official client's `extra_body`). `tests/unit/test_openai_fields.py` fails when the
installed openai package documents a field these tables do not classify.

To honour a refused field: declare it on the request body (openai_schema.py), make the
sampler apply it, and move its row here to HONOURED.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from idlegrid.errors import InvalidRequest


class Policy(Enum):
    """What the gateway does with a request field."""

    HONOURED = "honoured"  # it shapes the answer as OpenAI documents
    NO_EFFECT = "no effect"  # accepted; it changes nothing OpenAI would return as output
    REFUSED = "refused"  # not honoured (yet): a 400 naming it unless its value is neutral


Neutral = Callable[[Any, Mapping[str, Any]], bool]


def _unset(value: Any, _: Mapping[str, Any]) -> bool:
    return value is None


def _one_of(*values: Any) -> Neutral:
    return lambda value, _: (
        value is None or any(value == v and type(value) is type(v) for v in values)
    )


def _empty(value: Any, _: Mapping[str, Any]) -> bool:
    return value is None or value == [] or value == {}


def _best_of(value: Any, body: Mapping[str, Any]) -> bool:
    # best_of == n generates n and returns all n: the same as not asking.
    return value is None or value == (body.get("n") or 1)


@dataclass(frozen=True)
class Rule:
    """A field's policy; `neutral` says which values of a refused field change nothing."""

    policy: Policy
    note: str = ""
    neutral: Neutral = _unset


H, X, R = Policy.HONOURED, Policy.NO_EFFECT, Policy.REFUSED

_SHARED: dict[str, Rule] = {
    "model": Rule(H),
    "n": Rule(H, "each choice is its own grid task with its own seed"),
    "seed": Rule(H, "choice j>0 gets a seed derived from it (choices.choice_seed)"),
    "stop": Rule(H),
    "stream": Rule(H),
    "stream_options": Rule(H, "include_usage"),
    "temperature": Rule(H),
    "top_p": Rule(H),
    "max_tokens": Rule(H),
    "user": Rule(X),
    "presence_penalty": Rule(H, "-2 to 2, in the sampler, committed and replayed"),
    "frequency_penalty": Rule(H, "-2 to 2, in the sampler, committed and replayed"),
    "logit_bias": Rule(H, "token id -> -100 to 100; ids outside the vocabulary are a 400"),
    # idlegrid's extension: the most the consumer pays per 1M tokens.
    "max_price": Rule(H, "idlegrid extension: price cap per 1M tokens"),
}

CHAT: dict[str, Rule] = {
    **_SHARED,
    "messages": Rule(H, "text content parts only; tool_calls, tool messages and name rendered"),
    "max_completion_tokens": Rule(H),
    "metadata": Rule(X),
    "store": Rule(X, "nothing is stored for later retrieval"),
    "service_tier": Rule(X),
    "prompt_cache_key": Rule(X),
    "prompt_cache_options": Rule(X),
    "prompt_cache_retention": Rule(X),
    "safety_identifier": Rule(X),
    "response_format": Rule(H, "enforced token by token by grammar masks, committed and audited"),
    "tools": Rule(H, "function tools; arguments enforced by grammar masks, committed, audited"),
    "tool_choice": Rule(H, "auto, none, required or a named function"),
    "parallel_tool_calls": Rule(H, "false: at most one call per answer"),
    "functions": Rule(R, "the deprecated functions API is not supported: send tools", _empty),
    "function_call": Rule(R, "deprecated: send tool_choice", _one_of("none")),
    "logprobs": Rule(H, "committed and audited; see docs/openai.md for the distribution"),
    "top_logprobs": Rule(H, "0 to 20, with logprobs: true"),
    "audio": Rule(R, "text output only"),
    "modalities": Rule(R, "text output only", _one_of(["text"])),
    "prediction": Rule(R, "predicted outputs are not supported"),
    "web_search_options": Rule(R, "no web search"),
    "reasoning_effort": Rule(R, "the served models do not reason"),
    "verbosity": Rule(R, "not supported"),
    "moderation": Rule(R, "no moderation is run"),
}

COMPLETIONS: dict[str, Rule] = {
    **_SHARED,
    "prompt": Rule(H, "a string or a list of strings; token ids are refused"),
    "best_of": Rule(R, "only best_of = n", _best_of),
    "echo": Rule(
        H, "the prompt before each choice's text; with logprobs, the prompt's too (audited)"
    ),
    "suffix": Rule(R, "insertion is not supported", _one_of("")),
    "logprobs": Rule(H, "0 to 5 alternatives; committed and audited"),
}

EMBEDDINGS: dict[str, Rule] = {
    "model": Rule(H, "a model advertised as an embedding model"),
    "input": Rule(H, "a string, a list of strings, token ids or a list of token-id lists"),
    "encoding_format": Rule(H, "float or base64 (float32 little-endian)"),
    "dimensions": Rule(H, "only the model's own size: no served model shortens its vectors"),
    "user": Rule(X),
    "max_price": Rule(H, "idlegrid extension: price cap per 1M tokens"),
}

STREAM_OPTIONS: dict[str, Rule] = {
    "include_usage": Rule(H),
    "include_obfuscation": Rule(X, "no obfuscation padding is sent"),
}


def check(table: Mapping[str, Rule], body: Mapping[str, Any]) -> None:
    """Refuse the first field of `body` that `table` does not classify or cannot honour."""
    for name, value in body.items():
        rule = table.get(name)
        if rule is None:
            raise InvalidRequest(
                f"unknown parameter '{name}': idlegrid refuses fields it does not know "
                "rather than ignore them",
                param=name,
            )
        if rule.policy is Policy.REFUSED and not rule.neutral(value, body):
            raise InvalidRequest(f"'{name}' is not supported: {rule.note}", param=name)
    options = body.get("stream_options")
    if isinstance(options, Mapping):
        for name in options:
            if name not in STREAM_OPTIONS:
                raise InvalidRequest(
                    f"unknown stream option '{name}'", param=f"stream_options.{name}"
                )


def table_rows(table: Mapping[str, Rule]) -> list[tuple[str, str, str]]:
    """(field, policy, note) rows, sorted by field: the table docs/openai.md shows."""
    return sorted((name, rule.policy.value, rule.note) for name, rule in table.items())
