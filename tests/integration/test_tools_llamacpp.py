"""Tool calling on the default engine (llama.cpp, gemma3:270m Q4_K_M), verified.

`tool_choice` "required" and a named function give calls whose arguments validate against
the function's schema, committed with the tools grammar and passing their audits; a
provider that samples without the masks (`cheats.LlamaSchemaIgnoring`) fails. On a real
loopback grid the official `openai` package gets `tool_calls` with `finish_reason:
"tool_calls"`, its stream helper reassembles the same calls from the deltas, a round trip
(assistant tool_calls + a tool message) is served, and every answer passes its audit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from idlegrid.core import tools
from idlegrid.core.grammar import GrammarSpec
from idlegrid.core.tool_prompt import render_messages
from idlegrid.core.trust import commitment as cm
from idlegrid.engines.base import Generation, SamplingParams, render_chat, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.grammar import engine_id
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import provider_and_verifier

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")
pytest.importorskip("llguidance")

CONTEXT = 1024
MAX_TOKENS = 48
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)


class Weather(BaseModel):
    """Bounded, so that a 270M base model closes the call within the limit."""

    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict tools
    city: str = Field(max_length=16)
    days: int = Field(ge=1, le=7)


class Clock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zone: str = Field(max_length=12)


def _tool(name: str, model: type[BaseModel], description: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": model.model_json_schema(),
        },
    }


TOOLS = [
    _tool("get_weather", Weather, "The weather forecast for a city."),
    _tool("get_time", Clock, "The time in a time zone."),
]
MODELS: dict[str, type[BaseModel]] = {"get_weather": Weather, "get_time": Clock}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    yield e
    e.close()


def _validate(name: str, arguments: str) -> None:
    MODELS[name].model_validate_json(arguments)
    assert isinstance(json.loads(arguments), dict)


def _serve_and_audit(
    provider: LlamaCppEngine,
    verifier: LlamaCppEngine,
    choice: Any,
    temperature: float,
    seed: int,
    parallel: bool | None = None,
) -> tuple[Generation, cm.Verdict]:
    plan = tools.from_request(TOOLS, choice, parallel)
    assert plan is not None
    spec = plan.grammar()
    assert spec is not None
    text = render_chat(provider, render_messages(ASK, plan))
    ids = provider.tokenize(text)
    rec, res = Recorder(), Generation()
    provider.recorder = rec
    params = SamplingParams(temperature, 1.0, seed, grammar=spec)
    try:
        for _ in stream_pieces(provider, ids, params, max_tokens=MAX_TOKENS, result=res):
            pass
        c = build_commitment(
            provider, DEFAULT_MODEL, ids, rec, seed, temperature, 1.0, res.finish_reason,
            constraint=cm.Constraint(spec.digest(), engine_id() or ""),
        )  # fmt: skip
    finally:
        provider.recorder = None
    c = cm.decode(c.encode())
    assert c.header.constraint is not None and c.header.constraint.digest == spec.digest()
    # The verifier rebuilds the grammar from the wire form, as an audit task carries it.
    wire = GrammarSpec.from_wire(spec.to_wire())
    report = verifier.audit(ids, c, MAX_TOKENS, (), verifier.matcher(wire))
    return res, cm.judge(c, report, TOL, MAX_TOKENS)


NAMED = {"type": "function", "function": {"name": "get_time"}}


def test_required_and_named_calls_validate_pass_and_ignoring_the_grammar_fails(engine) -> None:
    complete = 0
    # Greedy, a base model repeats calls while more are allowed: one call (parallel off).
    for choice, parallel, temperature, seed in (
        ("required", False, 0.0, 1),
        ("required", None, 1.0, 7),
        (NAMED, None, 0.0, 2),
        (NAMED, None, 0.9, 5),
    ):
        res, verdict = _serve_and_audit(engine, engine, choice, temperature, seed, parallel)
        assert verdict.passed, verdict.reasons
        assert verdict.worst_rel == 0.0  # same schedule, same masks: exact
        if res.finish_reason != "stop":  # cut by the token limit mid-call
            assert len([p for p in res.pieces if p.token_id >= 0]) == MAX_TOKENS
            continue
        calls = tools.read_calls(res.text)
        assert calls, res.text
        for name, arguments in calls:
            _validate(name, arguments)
            if choice is NAMED:
                assert name == "get_time"
        complete += 1
    assert complete >= 3  # most end at the grammar's accept state, not the token limit
    cheat = cheats.LlamaSchemaIgnoring(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    try:
        for seed in (7, 11):
            res, verdict = _serve_and_audit(cheat, engine, "required", 1.0, seed)
            assert not verdict.passed, res.text
            assert any("not the one the seed samples" in r for r in verdict.reasons)
    finally:
        cheat.close()


def _wait(cond, timeout_s: float = 240.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.1)):
        if cond():
            return
        ev.wait(0.1)
    raise TimeoutError("condition not reached")


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_openai_client_gets_validated_tool_calls_streams_them_and_audits_pass(
    tmp_path: Path, engine
) -> None:
    verifier = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    with provider_and_verifier(tmp_path, engine, verifier) as (coord, http, key, client):
        common: dict[str, Any] = {
            "model": DEFAULT_MODEL,
            "messages": ASK,
            "tools": TOOLS,
            "max_tokens": MAX_TOKENS,
            # Greedy: the same answer every time.
            "temperature": 0.0,
            "parallel_tool_calls": False,  # greedy, a base model would repeat calls
        }
        done = client.chat.completions.create(**common, tool_choice="required")
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        calls = _calls(choice.message)
        assert calls and all(c.id.startswith("call_") for c in choice.message.tool_calls or [])
        for name, arguments in calls:
            _validate(name, arguments)

        named = client.chat.completions.create(**common, tool_choice=NAMED)
        assert named.choices[0].finish_reason == "tool_calls", named.choices[0].message
        ((name, arguments),) = _calls(named.choices[0].message)
        assert name == "get_time"
        _validate(name, arguments)

        # Streamed (greedy): the client's stream helper reassembles the same calls.
        with client.chat.completions.stream(**common, tool_choice="required") as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        assert _calls(final.choices[0].message) == calls

        # Round trip: the assistant's calls and a tool result go back; text comes out.
        tc = choice.message.tool_calls or []
        history: list[Any] = [
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in tc
                ],
            },
            *({"role": "tool", "tool_call_id": c.id, "content": "Sunny, 24 C."} for c in tc),
        ]
        back = client.chat.completions.create(
            **{**common, "messages": history, "max_tokens": 16}, tool_choice="none"
        )
        assert back.choices[0].finish_reason in ("stop", "length")
        assert isinstance(back.choices[0].message.content, str)

        # With logprobs and penalties, seeded: logprobs are those of the generated tokens
        # (the call's format, `content` null), the same whole and streamed. The streamed
        # request is the same (one digest): each gets its own audit (ids per task).
        sampled: dict[str, Any] = {
            **common,
            "tool_choice": NAMED,
            "temperature": 0.7,
            "seed": 11,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.3,
            "logprobs": True,
            "top_logprobs": 2,
        }
        lp = client.chat.completions.create(**sampled)
        lpc = lp.choices[0]
        assert lpc.finish_reason == "tool_calls" and lpc.message.content is None, lpc
        ((name, arguments),) = _calls(lpc.message)
        _validate(name, arguments)
        entries = lpc.logprobs.content if lpc.logprobs else None
        assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
        raw = "".join(e.token for e in entries)
        assert (
            raw.startswith('{"tool_calls":[') and json.loads(raw)["tool_calls"][0]["name"] == name
        )
        streamed: list[Any] = []
        deltas: list[Any] = []
        for chunk in client.chat.completions.create(**sampled, stream=True):
            for c in chunk.choices:
                streamed += c.logprobs.content or [] if c.logprobs else []
                deltas += c.delta.tool_calls or []
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
        assert "".join(d.function.arguments or "" for d in deltas) == arguments

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        def judged() -> bool:
            got = audits()
            return len(got) == 6 and all(a["state"] in ("passed", "failed") for a in got)

        try:
            _wait(judged)
        except TimeoutError:
            pytest.fail(f"audits not judged: {json.dumps(audits())[:3000]}")
        for a in audits():
            assert a["state"] == "passed", a["verdict"]
