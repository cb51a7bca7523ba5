"""Every documented OpenAI request field, sent through the real app to a real agent:
honoured (200, and its effect where one is observable), accepted without effect (200, the
same answer), or refused (400 naming it, nothing escrowed). A field added to the policy
table without a sample here fails `test_every_classified_field_has_a_sample`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_grid import MODEL, Grid, expected, start_grid, stop_grid

from idlegrid.coordinator.inference import fields
from idlegrid.coordinator.inference.choices import choice_seed
from idlegrid.engines.fake import FakeEngine

PROMPT = "The field test"
BASE: dict[str, dict[str, Any]] = {
    "completions": {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
    "chat": {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 6,
        "temperature": 0,
    },
}
PATH = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
TABLE = {"completions": fields.COMPLETIONS, "chat": fields.CHAT}

Check = Callable[[httpx.Response], None]


def _text(r: httpx.Response, index: int = 0) -> str:
    choice = r.json()["choices"][index]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def _events(r: httpx.Response) -> list[dict[str, Any]]:
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def _n2(r: httpx.Response) -> None:
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]


def _seeded(r: httpx.Response) -> None:
    if "message" not in r.json()["choices"][0]:
        want = expected(PROMPT, 6, temperature=0.9, seed=choice_seed(99, 0))
        assert _text(r) == want


def _stopped(r: httpx.Response) -> None:
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def _streamed(r: httpx.Response) -> None:
    assert r.headers["content-type"].startswith("text/event-stream")
    assert _events(r)


def _usage_chunk(r: httpx.Response) -> None:
    last = _events(r)[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6


def _tokens(n: int) -> Check:
    def check(r: httpx.Response) -> None:
        assert r.json()["usage"]["completion_tokens"] == n

    return check


def _two_prompts(r: httpx.Response) -> None:
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert _text(r, 1) == expected("second", 6, temperature=0.0)


def _ok(_: httpx.Response) -> None:
    pass


def _echoed(r: httpx.Response) -> None:
    text = r.json()["choices"][0]["text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), text


def _text_answer(r: httpx.Response) -> None:
    choice = r.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str) and not choice["message"]["tool_calls"]
    assert choice["finish_reason"] in ("stop", "length")


def _lp(r: httpx.Response) -> list[tuple[str, float, list[float]]]:
    """(token, logprob, alternatives' logprobs) per token, from either endpoint's shape."""
    lp = r.json()["choices"][0]["logprobs"]
    if "content" in lp:
        return [(e["token"], e["logprob"], [a["logprob"] for a in e["top_logprobs"]])
                for e in lp["content"]]  # fmt: skip
    assert lp["text_offset"][0] == 0
    tops = [list(d.values()) for d in lp["top_logprobs"]]
    return list(zip(lp["tokens"], lp["token_logprobs"], tops, strict=True))


def _logprobs(r: httpx.Response) -> None:
    # The fake's pick sits 90 above every other token (engines/fake.py).
    entries = _lp(r)
    assert "".join(t for t, _, _ in entries) == _text(r) and len(entries) == 6
    assert all(-1e-6 <= v <= 0 and all(-90.01 < a < -89.99 for a in alt)
               for _, v, alt in entries)  # fmt: skip


def _top3(r: httpx.Response) -> None:
    assert [len(alt) for _, _, alt in _lp(r)] == [3] * 6


def _penalised(r: httpx.Response) -> None:
    # A token seen c times before sits 2c (frequency) + 2 (presence) lower: its best
    # alternative's log-probability rises from -90 by as much.
    entries = _lp(r)
    seen: dict[str, int] = {}
    lifted = 0
    for token, _, alt in entries:
        c = seen.get(token, 0)
        want = -90.0 + (2.0 * c + 2.0 * (c > 0) if c else 0.0)
        assert abs(alt[1] - want) < 0.05, (token, alt)  # alt[0] is the token itself
        lifted += c > 0
        seen[token] = c + 1
    assert lifted  # some token repeated, so the penalty showed


BANNED = str(ord("q") + 3)  # the fake's id for "q"


def _biased(r: httpx.Response) -> None:
    assert _text(r) == "q" * 6


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# field -> (fields to send, check of the 200 answer); for refused fields only the 400 counts.
HONOURED: dict[str, tuple[dict[str, Any], Check]] = {
    "model": ({"model": MODEL}, _ok),
    "n": ({"n": 2}, _n2),
    "seed": ({"seed": 99, "temperature": 0.9}, _seeded),
    "stop": ({"stop": ["zzz"]}, _stopped),
    "stream": ({"stream": True}, _streamed),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, _usage_chunk),
    "temperature": ({"temperature": 0.5}, _ok),
    "top_p": ({"top_p": 0.5}, _ok),
    "max_tokens": ({"max_tokens": 3}, _tokens(3)),
    "max_completion_tokens": ({"max_tokens": None, "max_completion_tokens": 4}, _tokens(4)),
    "max_price": ({"max_price": {"prompt": 1000, "output": 1000}}, _ok),
    "messages": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, _ok),
    "prompt": ({"prompt": [PROMPT, "second"]}, _two_prompts),
    "echo": ({"echo": True}, _echoed),
    "logprobs": ({"logprobs": {"chat": True, "completions": 0}}, _logprobs),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 3}, _top3),
    "logit_bias": ({"logit_bias": {BANNED: 100}}, _biased),
    "presence_penalty": (
        {
            "presence_penalty": 2.0,
            "frequency_penalty": 2.0,
            "max_tokens": 12,
            "logprobs": {"chat": True, "completions": 2},
            "top_logprobs": {"chat": 2},
        },
        _penalised,
    ),  # fmt: skip
    "frequency_penalty": (
        {
            "presence_penalty": 2.0,
            "frequency_penalty": 2.0,
            "max_tokens": 12,
            "logprobs": {"chat": True, "completions": 2},
            "top_logprobs": {"chat": 2},
        },
        _penalised,
    ),  # fmt: skip
    # Its effect needs an engine that constrains: tests/integration/test_grammar_llamacpp.py;
    # here, that a grid of engines that cannot is never served it unconstrained (below).
    "response_format": ({"response_format": {"type": "text"}}, _ok),
    # Tools, as response_format: their effect on a real model is
    # tests/integration/test_tools_llamacpp.py; here, tool_choice "none" (text, the tools
    # written into the prompt) and never unconstrained otherwise (below).
    "tools": ({"tools": [TOOL], "tool_choice": "none"}, _text_answer),
    "tool_choice": ({"tools": [TOOL], "tool_choice": "none"}, _text_answer),
    "parallel_tool_calls": (
        {"tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": False},
        _text_answer,
    ),
}
NO_EFFECT: dict[str, Any] = {
    "user": "u-1",
    "metadata": {"k": "v"},
    "store": True,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "prompt_cache_options": {"ttl": "1h"},
    "prompt_cache_retention": "24h",
    "safety_identifier": "s-1",
}
REFUSED: dict[str, Any] = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
    "best_of": 3,
    "suffix": "tail",
}
CASES = [(ep, name) for ep, table in TABLE.items() for name in sorted(table)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    tmp: Path = tmp_path_factory.mktemp("fields")
    with (
        pytest.MonkeyPatch.context() as mp
    ):  # conftest's stake rule is per test; this is per module
        mp.setenv("IDLEGRID_INFERENCE_STAKE", "0")
        mp.setenv("IDLEGRID_TRUST_PROBATION_BUDGET_UCR", "-1")
        g = start_grid(tmp, f"sqlite:///{tmp / 'c.db'}", [FakeEngine(MODEL)], credits=100)
    yield g
    g.verify()
    stop_grid(g)


def _post(grid: Grid, endpoint: str, extra: dict[str, Any]) -> httpx.Response:
    # A value may differ per endpoint: {"chat": ..., "completions": ...}.
    extra = {
        k: v.get(endpoint) if isinstance(v, dict) and set(v) <= {"chat", "completions"} and v
        else v
        for k, v in extra.items()
    }  # fmt: skip
    body = {k: v for k, v in {**BASE[endpoint], **extra}.items() if v is not None}
    with grid.http() as c:
        return c.post(
            PATH[endpoint], json=body, headers={"Authorization": f"Bearer {grid.api_key}"}
        )


def test_every_classified_field_has_a_sample() -> None:
    for endpoint, table in TABLE.items():
        samples = set(HONOURED) | set(NO_EFFECT) | set(REFUSED)
        assert set(table) <= samples, endpoint
        for name, rule in table.items():
            kind = {fields.Policy.HONOURED: HONOURED, fields.Policy.NO_EFFECT: NO_EFFECT}
            assert name in kind.get(rule.policy, REFUSED), (endpoint, name)


@pytest.mark.parametrize(("endpoint", "name"), CASES)
def test_each_field_is_honoured_or_refused_by_name(grid: Grid, endpoint: str, name: str) -> None:
    rule = TABLE[endpoint][name]
    if rule.policy is fields.Policy.HONOURED:
        extra, check = HONOURED[name]
        if endpoint == "completions" and name == "top_logprobs":
            return  # a chat field
        r = _post(grid, endpoint, extra)
        assert r.status_code == 200, r.text
        check(r)
    elif rule.policy is fields.Policy.NO_EFFECT:
        plain = _post(grid, endpoint, {})
        r = _post(grid, endpoint, {name: NO_EFFECT[name]})
        assert r.status_code == 200, r.text
        assert _text(r) == _text(plain)
    else:
        value = REFUSED[name]
        value = value[endpoint] if isinstance(value, dict) and endpoint in value else value
        extra = {name: value}
        before = len(grid.entries())
        r = _post(grid, endpoint, extra)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["param"], error["type"]) == (name, "invalid_request_error"), error
        assert len(grid.entries()) == before  # nothing escrowed


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_unknown_fields_are_a_400_naming_them(grid: Grid, endpoint: str) -> None:
    for name in ("top_k", "repetition_penalty", "keep_alive"):
        r = _post(grid, endpoint, {name: 1})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == name
    r = _post(grid, endpoint, {"stream": True, "stream_options": {"include_usage": True, "x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.x"


@pytest.mark.parametrize("prompt", ["p", ["p"], ["p", "q"]])
def test_suffix_is_refused_for_every_prompt_shape(grid: Grid, prompt: Any) -> None:
    r = _post(grid, "completions", {"prompt": prompt, "suffix": "s"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


@pytest.mark.parametrize("prompt", ["p", ["p"], ["p", "q"]])
def test_echo_puts_each_prompt_before_its_choices_text(grid: Grid, prompt: Any) -> None:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    plain = _post(grid, "completions", {"prompt": prompt, "n": 2})
    echoed = _post(grid, "completions", {"prompt": prompt, "n": 2, "echo": True})
    assert plain.status_code == echoed.status_code == 200, echoed.text
    want = [prompts[i // 2] + c["text"] for i, c in enumerate(plain.json()["choices"])]
    assert [c["text"] for c in echoed.json()["choices"]] == want
    assert echoed.json()["usage"] == plain.json()["usage"]  # the echo is not billed


def test_echo_streams_the_prompt_first(grid: Grid) -> None:
    with grid.client() as client:
        kw: dict[str, Any] = {**BASE["completions"], "stream": True}
        plain = "".join(c.choices[0].text for c in client.completions.create(**kw) if c.choices)
        chunks = [c for c in client.completions.create(**kw, echo=True) if c.choices]
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain


def test_echo_not_a_boolean_is_a_400(grid: Grid) -> None:
    before = len(grid.entries())
    r = _post(grid, "completions", {"echo": "yes"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "echo" and "boolean" in error["message"], error
    assert len(grid.entries()) == before


def _scored(lp: dict[str, Any], prompt_tokens: int) -> None:
    """The prompt's part of an echoed choice's logprobs: the first token has none, each
    later one the fake's certainty (its pick sits 90 above the rest, engines/fake.py)."""
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    head = lp["token_logprobs"][1:prompt_tokens]
    assert len(head) == prompt_tokens - 1 and all(v <= 0 for v in head)
    assert all(len(d) == 2 for d in lp["top_logprobs"][1:prompt_tokens])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_echo_with_logprobs_scores_the_prompt_and_streams_it_first(grid: Grid) -> None:
    plain = _post(grid, "completions", {"logprobs": 2}).json()
    echoed = _post(grid, "completions", {"logprobs": 2, "echo": True}).json()
    n_prompt = echoed["usage"]["prompt_tokens"]
    assert echoed["usage"] == plain["usage"]  # the prompt's logprobs are not billed
    lp, choice = echoed["choices"][0]["logprobs"], echoed["choices"][0]
    assert choice["text"] == PROMPT + plain["choices"][0]["text"]
    assert "".join(lp["tokens"]) == choice["text"]
    _scored(lp, n_prompt)
    # The answer's own logprobs follow, unchanged, at offsets after the prompt.
    tail = plain["choices"][0]["logprobs"]
    assert lp["tokens"][n_prompt:] == tail["tokens"]
    assert lp["token_logprobs"][n_prompt:] == tail["token_logprobs"]
    assert lp["text_offset"][n_prompt] == len(PROMPT)
    chunks = [
        e["choices"][0]
        for e in _events(_post(grid, "completions", {"logprobs": 2, "echo": True, "stream": True}))
        if e.get("choices")
    ]
    assert chunks[0]["text"] == PROMPT
    _scored(chunks[0]["logprobs"], n_prompt)
    assert chunks[0]["logprobs"]["tokens"] == lp["tokens"][:n_prompt]
    streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]], [], ["a", 1]])
def test_token_id_and_empty_prompt_lists_are_refused(grid: Grid, prompt: Any) -> None:
    r = _post(grid, "completions", {"prompt": prompt})
    assert r.status_code == 400
    assert str(r.json()["error"]["param"]).startswith("prompt")


@pytest.mark.parametrize(("n", "ok"), [(0, False), (16, True), (17, False)])
def test_n_is_capped(grid: Grid, n: int, ok: bool) -> None:
    r = _post(grid, "chat", {"n": n, "max_tokens": 1})
    assert (r.status_code == 200) is ok, r.text
    if not ok:
        assert r.json()["error"]["param"] == "n"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_logprobs_are_the_whole_answers(grid: Grid, endpoint: str) -> None:
    lp = {"logprobs": True, "top_logprobs": 2} if endpoint == "chat" else {"logprobs": 2}
    whole = _lp(_post(grid, endpoint, lp))
    events = _events(_post(grid, endpoint, {**lp, "stream": True}))
    streamed: list[tuple[str, float, list[float]]] = []
    for e in events:
        for choice in e["choices"]:
            got = choice.get("logprobs")
            if not got:
                continue
            if "content" in got:
                streamed += [(c["token"], c["logprob"], [a["logprob"] for a in c["top_logprobs"]])
                             for c in got["content"]]  # fmt: skip
            else:
                tops = [list(d.values()) for d in got["top_logprobs"]]
                streamed += list(zip(got["tokens"], got["token_logprobs"], tops, strict=True))
    assert streamed == whole


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_bias_outside_the_vocabulary_is_a_400_naming_it(grid: Grid, endpoint: str) -> None:
    before = grid.entries()
    r = _post(grid, endpoint, {"logit_bias": {"100000": -100}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"
    new = grid.entries()[len(before) :]
    assert [e["memo"] for e in new] == ["hold", "release"], new  # found by the provider:
    # the escrow is released whole, nothing is charged


def test_response_format_is_never_served_unconstrained(grid: Grid) -> None:
    """No live provider here enforces grammars: a JSON request is refused, not served as
    plain text, and nothing is escrowed."""
    before = len(grid.entries())
    r = _post(grid, "chat", {"response_format": {"type": "json_object"}})
    assert r.status_code == 503, r.text
    assert "response_format" in r.json()["error"]["message"]
    assert len(grid.entries()) == before


@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "f"}}, None]
)
def test_tool_calls_are_never_served_unconstrained(grid: Grid, choice: Any) -> None:
    """No live provider here enforces grammars: a request that may answer with tool calls is
    refused (503), not served as text, and nothing is escrowed."""
    before = len(grid.entries())
    extra = {"tools": [TOOL], "tool_choice": choice}
    for stream in (False, True):
        r = _post(grid, "chat", {**extra, "stream": stream})
        assert r.status_code == 503, r.text
        assert "tools" in r.json()["error"]["message"]
    assert len(grid.entries()) == before


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
            "messages[1].tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
            "messages[0].audio",
        ),
    ],
)
def test_malformed_tool_fields_are_400s_naming_them(
    grid: Grid, extra: dict[str, Any], param: str
) -> None:
    before = len(grid.entries())
    r = _post(grid, "chat", extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert len(grid.entries()) == before


def test_a_tool_round_trip_is_served_as_text_with_tool_choice_none(grid: Grid) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    r = _post(grid, "chat", {"messages": messages, "tools": [TOOL], "tool_choice": "none"})
    assert r.status_code == 200, r.text
    _text_answer(r)


def test_max_tokens_zero_scores_the_prompt_and_nothing_else(grid: Grid) -> None:
    """OpenAI's scoring request (what lm-eval sends for log-likelihoods): echo, logprobs,
    max_tokens 0: the prompt and its logprobs, no generated text, the prompt billed."""
    before = len(grid.entries())
    refused = _post(grid, "completions", {"max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert len(grid.entries()) == before
    scored = _post(grid, "completions", {"max_tokens": 0, "echo": True, "logprobs": 2})
    assert scored.status_code == 200, scored.text
    body = scored.json()
    choice, usage = body["choices"][0], body["usage"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] > 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == usage["prompt_tokens"] and "".join(lp["tokens"]) == PROMPT
    _scored(lp, usage["prompt_tokens"])
