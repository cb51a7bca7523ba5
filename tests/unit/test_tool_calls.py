"""Tool calling, without a model: the request's tool fields to a plan and its grammar (each
tool_choice, checked with llguidance over a byte tokenizer), reading the constrained output
back into calls (whole and streamed), and rendering tool turns into the prompt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from idlegrid.coordinator.inference import tools as gw
from idlegrid.core import grammar as g
from idlegrid.core import tools as t
from idlegrid.core.tool_prompt import preamble, render_messages
from idlegrid.errors import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "now"}}
CALL = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo","days":2}}]}'
TWO = (
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"a\\"}{","days":1}},'
    '{"name":"now","arguments":{}}]}'
)


def _plan(choice: Any = None, parallel: Any = None, tools: Any = None) -> t.ToolPlan:
    plan = t.from_request(tools or [WEATHER, TIME], choice, parallel)
    assert plan is not None
    return plan


# ---- the plan ----------------------------------------------------------------------------


def test_tool_choice_forms_and_defaults() -> None:
    assert _plan().choice == "auto" and _plan().parallel is True
    assert _plan("required", False).choice == "required"
    named = _plan({"type": "function", "function": {"name": "now"}})
    assert (named.choice, named.function) == ("function", "now")
    assert t.from_request(None, None, None) is None
    assert t.from_request([], "none", None) is None
    # A function without parameters takes an (any) object, as OpenAI.
    assert _plan().tools[1].parameters == {"type": "object"}


@pytest.mark.parametrize(
    ("tools", "choice", "parallel", "param"),
    [
        (None, "required", None, "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
        ([WEATHER], "sometimes", None, "tool_choice"),
        ([{"type": "custom", "custom": {}}], None, None, "tools[0].type"),
        (
            [{"type": "function", "function": {"name": "bad name"}}],
            None,
            None,
            "tools[0].function.name",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            None,
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
            None,
            None,
            "tools[0].function.parameters",
        ),
        ([WEATHER, WEATHER], None, None, "tools"),
        ([WEATHER], None, "yes", "parallel_tool_calls"),
        ("x", None, None, "tools"),
    ],
)
def test_bad_tool_fields_are_400s_naming_them(
    tools: Any, choice: Any, parallel: Any, param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        t.from_request(tools, choice, parallel)
    assert err.value.param == param


def test_the_grammar_hash_binds_tools_choice_and_parallel() -> None:
    specs = [
        _plan("required").grammar(),
        _plan("auto").grammar(),
        _plan("required", False).grammar(),
        _plan({"type": "function", "function": {"name": "now"}}).grammar(),
        _plan("required", tools=[WEATHER]).grammar(),
    ]
    assert all(s is not None and s.kind == "tools" for s in specs)
    assert len({s.digest() for s in specs if s is not None}) == len(specs)
    assert _plan("none").grammar() is None  # text: no grammar, tools only in the prompt
    text = g.from_response_format({"type": "json_object"})
    assert _plan("none").grammar(text) == text
    spec = _plan("required").grammar()
    assert spec is not None and g.GrammarSpec.from_wire(spec.to_wire()) == spec
    assert spec.param == "tools"
    with pytest.raises(InvalidRequest):
        g.GrammarSpec.from_wire({"kind": "tools", "schema": '{"tools":[]}'})


# ---- the grammar, enforced ----------------------------------------------------------------

llg = pytest.importorskip("llguidance")


class _Bytes:
    eos_token_id, bos_token_id = 256, None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
    special_token_ids = [256]

    def __call__(self, s: Any) -> list[int]:
        return list(s if isinstance(s, bytes) else s.encode())


TOKENIZER = llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()))


def _accepts(spec: g.GrammarSpec | None, text: str) -> bool:
    from idlegrid.engines.grammar import check, grammar_text

    assert spec is not None
    check(spec)
    m = llg.LLMatcher(TOKENIZER, grammar_text(spec), log_level=0)
    return bool(m.consume_tokens(list(text.encode())) and m.is_accepting())


@pytest.mark.parametrize(
    ("choice", "parallel", "accepted", "refused"),
    [
        ("required", None, [CALL, TWO], ["hello", '{"tool_calls":[]}']),
        ("required", False, [CALL], [TWO, "hello"]),
        (
            {"type": "function", "function": {"name": "now"}},
            None,
            ['{"tool_calls":[{"name":"now","arguments":{}}]}'],
            [CALL, TWO],
        ),
        ("auto", None, [CALL, TWO, "It is sunny.", "a {b}"], ['{"x":1}', ""]),
    ],
)
def test_each_tool_choice_allows_exactly_its_answers(
    choice: Any, parallel: Any, accepted: list[str], refused: list[str]
) -> None:
    spec = _plan(choice, parallel).grammar()
    for text in accepted:
        assert _accepts(spec, text), text
    for text in refused:
        assert not _accepts(spec, text), text
    # Arguments validate against the function's schema; compact, name before arguments.
    for bad in (
        '{"tool_calls":[{"name":"get_weather","arguments":{"city":"x"}}]}',
        '{"tool_calls":[{"name":"get_weather","arguments":{"city":"x","days":"2"}}]}',
        '{"tool_calls":[{"name":"get_weather","arguments":{"city": "x","days":2}}]}',
        '{"tool_calls":[{"arguments":{"city":"x","days":2},"name":"get_weather"}]}',
        '{"tool_calls":[{"name":"other","arguments":{}}]}',
    ):
        assert not _accepts(spec, bad), bad


def test_auto_with_a_response_format_allows_calls_or_that_json() -> None:
    rf = g.from_response_format(
        {
            "type": "json_schema",
            "json_schema": {
                "name": "A",
                "schema": {
                    "type": "object",
                    "properties": {"answer": {"type": "string"}},
                    "required": ["answer"],
                },
            },
        }
    )
    spec = _plan("auto").grammar(rf)
    assert _accepts(spec, '{"answer":"hi"}') and _accepts(spec, CALL)
    assert not _accepts(spec, "hi") and not _accepts(spec, '{"x":1}')


# ---- reading the answer --------------------------------------------------------------------


def test_read_calls_keeps_the_arguments_as_written() -> None:
    assert t.read_calls(CALL) == [("get_weather", '{"city":"Oslo","days":2}')]
    calls = t.read_calls(TWO)
    assert calls == [("get_weather", '{"city":"a\\"}{","days":1}'), ("now", "{}")]
    assert json.loads(calls[0][1])["city"] == 'a"}{'
    assert t.read_calls("It is sunny.") is None
    assert t.read_calls(CALL[:-3]) is None  # cut short


def test_whole_message_is_openai_shaped() -> None:
    msg, finish = gw.whole_message(CALL, "stop", "task-1")
    assert finish == "tool_calls" and msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["id"] == gw.call_id("task-1", 0) and call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo","days":2}'}
    assert gw.whole_message("hi", "stop", "x") == ({"role": "assistant", "content": "hi"}, "stop")
    # Cut by max_tokens: returned as written, finish "length".
    assert gw.whole_message(CALL[:20], "length", "x")[1] == "length"


def _stream(text: str, size: int, finish: str = "stop") -> tuple[list[dict[str, Any]], Any]:
    ds = gw.DeltaStream("task-1")
    deltas = [d for i in range(0, len(text), size) for d in ds.feed(text[i : i + size])]
    held, finish_out = ds.end(finish)
    return deltas + held, finish_out


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_deltas_reassemble_to_the_whole_answer(size: int) -> None:
    deltas, finish = _stream(TWO, size)
    assert finish == "tool_calls"
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        assert "content" not in d
        (tc,) = d["tool_calls"]
        if "id" in tc:  # the first delta of a call: id, type, name and empty arguments
            assert tc["function"]["arguments"] == "" and tc["type"] == "function"
            calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "args": ""}
        else:
            calls[tc["index"]]["args"] += tc["function"]["arguments"]
    whole, _ = gw.whole_message(TWO, "stop", "task-1")
    assert [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
        for _, c in sorted(calls.items())
    ] == whole["tool_calls"]


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_streamed_text_of_an_auto_answer_is_content(size: int) -> None:
    for text in ("It is sunny.", '{"tool_x": 1}'):
        deltas, finish = _stream(text, size)
        assert finish == "stop"
        assert "".join(d["content"] for d in deltas) == text
    deltas, finish = _stream('{"tool_ca', 2, "length")  # cut while it could be a call
    assert finish == "length" and "".join(d["content"] for d in deltas) == '{"tool_ca'


# ---- the prompt ---------------------------------------------------------------------------


def test_tool_turns_are_rendered_faithfully() -> None:
    plan = _plan("auto")
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and the time?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ]
    out = render_messages(history, plan)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + preamble(plan)
    assert '"name":"get_weather","description":"Weather in a city."' in out[0]["content"]
    assert out[1]["content"] == "ann: Weather in Oslo and the time?"
    assert out[2]["content"] == (
        '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo","days":1}},'
        '{"name":"now","arguments":{}}]}'
    )
    assert out[3]["content"] == "Result of get_weather (c1): sunny\nResult of now (c2): noon"
    # No tools offered now: no preamble, the history still rendered.
    assert render_messages(history, None)[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "x"}, "messages[1].tool_call_id"),
        ({"role": "tool", "tool_call_id": "zz", "content": "x"}, "messages[1].tool_call_id"),
        ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[1].tool_call_id"),
        ({"role": "user", "content": "x", "audio": {"id": "a"}}, "messages[1].audio"),
        (
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{"}}],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        ({"role": "assistant", "tool_calls": []}, "messages[1].tool_calls"),
    ],
)
def test_message_fields_are_honoured_or_refused_by_name(
    message: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        render_messages([{"role": "user", "content": "hi"}, message], None)
    assert err.value.param == param
