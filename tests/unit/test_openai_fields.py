"""The gateway's field policy and choice planning, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from idlegrid.coordinator.inference import fields
from idlegrid.coordinator.inference.choices import choice_seed, derive_seed, plan
from idlegrid.errors import InvalidRequest


def _documented(module: object) -> set[str]:
    # `stream` lives on the streaming/non-streaming subclasses, not the base.
    return set(module.CompletionCreateParamsBase.__annotations__) | {"stream"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("table", "module"), [(fields.CHAT, chat_params), (fields.COMPLETIONS, completion_params)]
)
def test_every_field_of_the_installed_openai_package_is_classified(
    table: dict[str, fields.Rule], module: object
) -> None:
    missing = _documented(module) - set(table)
    assert missing == set(), f"classify these in coordinator/inference/fields.py: {missing}"
    extensions = set(table) - _documented(module)
    assert extensions == {"max_price"}  # idlegrid's own; anything else would be a typo


def test_stream_options_fields_are_classified() -> None:
    from openai.types.chat import ChatCompletionStreamOptionsParam

    assert set(ChatCompletionStreamOptionsParam.__annotations__) <= set(fields.STREAM_OPTIONS)


def _param(table: dict[str, fields.Rule], body: dict[str, object]) -> str | None:
    try:
        fields.check(table, body)
    except InvalidRequest as exc:
        return exc.param
    return None


def test_unknown_fields_are_refused_by_name() -> None:
    assert _param(fields.COMPLETIONS, {"model": "m", "prompt": "p", "top_k": 5}) == "top_k"
    assert _param(fields.CHAT, {"model": "m", "max_price": None, "keep_alive": 1}) == "keep_alive"
    assert _param(fields.CHAT, {"stream_options": {"include_usage": True, "x": 1}}) == (
        "stream_options.x"
    )


@pytest.mark.parametrize(
    ("table", "name", "neutral", "refused"),
    [
        (fields.CHAT, "functions", [], [{"name": "f"}]),
        (fields.CHAT, "function_call", "none", "auto"),
        (fields.CHAT, "modalities", ["text"], ["text", "audio"]),
        (fields.COMPLETIONS, "suffix", "", "tail"),
    ],
)
def test_refused_fields_pass_only_with_a_neutral_value(
    table: dict[str, fields.Rule], name: str, neutral: object, refused: object
) -> None:
    assert _param(table, {"model": "m", name: neutral}) is None
    assert _param(table, {"model": "m", name: None}) is None
    assert _param(table, {"model": "m", name: refused}) == name


def test_neutral_values_that_depend_on_the_rest_of_the_body() -> None:
    assert _param(fields.COMPLETIONS, {"n": 3, "best_of": 3}) is None
    assert _param(fields.COMPLETIONS, {"best_of": 1}) is None
    assert _param(fields.COMPLETIONS, {"n": 2, "best_of": 3}) == "best_of"
    assert _param(fields.CHAT, {"parallel_tool_calls": False}) is None
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert _param(fields.CHAT, {"tools": tools, "parallel_tool_calls": False}) is None  # honoured


def test_booleans_are_not_taken_for_numbers() -> None:
    from pydantic import ValidationError

    from idlegrid.coordinator.inference.openai_schema import ChatRequest, CompletionRequest

    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for bad in ({"logprobs": 0}, {"logprobs": True, "top_logprobs": False}):
        with pytest.raises(ValidationError) as info:
            ChatRequest.model_validate({**base, **bad})
        assert info.value.errors()[0]["loc"][0] in bad
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": True})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_penalty_and_bias_ranges_are_a_400_naming_them(body: dict, param: str) -> None:
    from idlegrid.coordinator.inference.openai_schema import CompletionRequest

    req = CompletionRequest.model_validate({"model": "m", "prompt": "p", **body})
    with pytest.raises(InvalidRequest) as info:
        req.sampler_fields(None)
    assert info.value.param == param


def test_top_logprobs_needs_logprobs_and_neutral_values_leave_the_payload_alone() -> None:
    from idlegrid.coordinator.inference.openai_schema import ChatRequest

    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(InvalidRequest) as info:
        ChatRequest.model_validate({**base, "top_logprobs": 3}).logprobs_k()
    assert info.value.param == "top_logprobs"
    req = ChatRequest.model_validate({**base, "logprobs": True, "top_logprobs": 3})
    assert req.logprobs_k() == 3
    plain = ChatRequest.model_validate({**base, "presence_penalty": 0, "logit_bias": {}})
    assert plain.sampler_fields(plain.logprobs_k()) == {}


def test_choice_zero_keeps_the_seed_and_the_others_are_derived_apart() -> None:
    assert choice_seed(7, 0) == 7
    seeds = [choice_seed(7, j) for j in range(16)]
    assert len(set(seeds)) == 16
    assert all(s is not None and 0 <= s <= 0x7FFFFFFF for s in seeds)
    assert seeds == [choice_seed(7, j) for j in range(16)]  # fixed by the request alone
    assert choice_seed(8, 1) != choice_seed(7, 1)
    assert choice_seed(None, 3) is None  # left to derive_seed of each choice's own task
    assert derive_seed("cmpl-a") != derive_seed("cmpl-b")


def test_plan_indexes_prompt_times_n_plus_j_and_seeds_by_j() -> None:
    choices = plan(prompts=2, n=3, seed=11)
    assert [c.index for c in choices] == list(range(6))
    assert [c.prompt for c in choices] == [0, 0, 0, 1, 1, 1]
    assert [c.seed for c in choices[:3]] == [c.seed for c in choices[3:]]
    assert choices[0].seed == 11
    assert plan(1, 1, None)[0].seed is None


def test_table_rows_cover_the_table() -> None:
    rows = fields.table_rows(fields.CHAT)
    assert [r[0] for r in rows] == sorted(fields.CHAT)
    assert {r[1] for r in rows} == {"honoured", "no effect", "refused"}


def test_the_docs_table_shows_the_policy() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "openai.md").read_text()
    shown = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            shown[cells[0].strip("`")] = (cells[1], cells[2])
    policy = {
        name: tuple(
            table[name].policy.value if name in table else "—"
            for table in (fields.CHAT, fields.COMPLETIONS)
        )
        for name in set(fields.CHAT) | set(fields.COMPLETIONS)
    }
    assert shown == policy


def test_every_embeddings_field_of_the_installed_openai_package_is_classified() -> None:
    from openai.types import embedding_create_params

    documented = set(embedding_create_params.EmbeddingCreateParams.__annotations__)
    assert documented - set(fields.EMBEDDINGS) == set()
    assert set(fields.EMBEDDINGS) - documented == {"max_price"}
    assert _param(fields.EMBEDDINGS, {"model": "m", "input": "x", "truncate": True}) == "truncate"
    assert _param(fields.EMBEDDINGS, {"model": "m", "input": "x", "user": "u"}) is None


def test_the_docs_show_the_embeddings_table() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "openai.md").read_text()
    for name, rule in fields.EMBEDDINGS.items():
        assert f"| `{name}` | {rule.policy.value} |" in doc, name
