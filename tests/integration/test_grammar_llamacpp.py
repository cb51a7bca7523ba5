"""Structured outputs on the default engine (llama.cpp, gemma3:270m Q4_K_M), verified.

A json_schema answer parses and validates, is committed with its grammar and passes its
audit (the verifier replays the same masks); a provider that samples without the masks
(`cheats.LlamaSchemaIgnoring`) fails. On a real loopback grid the official `openai`
package's `chat.completions.parse(response_format=PydanticModel)` returns a parsed object,
`json_object` returns a JSON object, an unsupported schema is a 400 naming response_format,
and every constrained answer passes its audit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import openai
import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel, Field

from idlegrid.core import grammar
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

CONTEXT = 512
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)


class Person(BaseModel):
    """Small enough that a 270M base model reaches the closing brace within the limit."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]


SPEC = grammar.from_response_format(
    {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": Person.model_json_schema(), "strict": True},
    }
)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    yield e
    e.close()


def _serve_and_audit(
    provider: LlamaCppEngine, verifier: LlamaCppEngine, temperature: float, seed: int
) -> tuple[Generation, cm.Verdict]:
    assert SPEC is not None
    text = render_chat(provider, [{"role": "user", "content": "Describe a person as JSON."}])
    ids = provider.tokenize(text)
    rec, res = Recorder(), Generation()
    provider.recorder = rec
    params = SamplingParams(temperature, 1.0, seed, grammar=SPEC)
    try:
        for _ in stream_pieces(provider, ids, params, max_tokens=48, result=res):
            pass
        c = build_commitment(
            provider, DEFAULT_MODEL, ids, rec, seed, temperature, 1.0, res.finish_reason,
            constraint=cm.Constraint(SPEC.digest(), engine_id() or ""),
        )  # fmt: skip
    finally:
        provider.recorder = None
    c = cm.decode(c.encode())
    assert c.header.constraint is not None and c.header.constraint.digest == SPEC.digest()
    report = verifier.audit(ids, c, 48, (), verifier.matcher(SPEC))
    return res, cm.judge(c, report, TOL, 48)


def test_constrained_answers_validate_and_pass_and_ignoring_the_schema_fails(engine) -> None:
    for temperature, seed in ((0.0, 1), (1.0, 7), (1.0, 8), (0.8, 9)):
        res, verdict = _serve_and_audit(engine, engine, temperature, seed)
        assert verdict.passed, verdict.reasons
        assert verdict.worst_rel == 0.0  # same schedule, same masks: exact
        if res.finish_reason == "stop":  # ended at the grammar's accept state
            Person.model_validate_json(res.text)
        else:
            assert len([p for p in res.pieces if p.token_id >= 0]) == 48
    cheat = cheats.LlamaSchemaIgnoring(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    try:
        for seed in (7, 11):
            res, verdict = _serve_and_audit(cheat, engine, 1.0, seed)
            assert not verdict.passed, res.text
            assert any("not the one the seed samples" in r for r in verdict.reasons)
            assert verdict.worst_rel == 0.0  # an honest fingerprint: only the masks were skipped
    finally:
        cheat.close()


def _wait(cond, timeout_s: float = 180.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.1)):
        if cond():
            return
        ev.wait(0.1)
    raise TimeoutError("condition not reached")


def test_openai_parse_on_a_grid_returns_a_validated_object_and_audits_pass(
    tmp_path: Path, engine
) -> None:
    verifier = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    with provider_and_verifier(tmp_path, engine, verifier) as (coord, http, key, client):
        messages = [{"role": "user", "content": "Describe a person as JSON."}]
        done = client.chat.completions.parse(
            model=DEFAULT_MODEL,
            messages=messages,  # type: ignore[arg-type]
            response_format=Person,
            max_tokens=48,
            temperature=0.0,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)
        assert Person.model_validate_json(choice.message.content or "") == choice.message.parsed

        # Streamed: the same answer (greedy, same grammar) arrives in content deltas.
        chunks = list(
            client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=messages,  # type: ignore[arg-type]
                response_format=type_to_response_format_param(Person),  # type: ignore[arg-type]
                max_tokens=48,
                temperature=0.0,
                stream=True,
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content
        assert chunks[-1].choices[0].finish_reason == "stop"

        obj = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=messages,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
            max_tokens=48,
            seed=3,
        )
        if obj.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
        else:
            assert obj.choices[0].finish_reason == "length" and obj.usage is not None
            assert obj.usage.completion_tokens == 48

        bad = {"name": "x", "schema": {"type": "array", "uniqueItems": True}}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=messages,  # type: ignore[arg-type]
                response_format={"type": "json_schema", "json_schema": bad},  # type: ignore[typeddict-item]
                max_tokens=8,
            )
        assert err.value.body["param"] == "response_format"  # type: ignore[index]

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        def judged() -> bool:
            got = audits()
            return len(got) == 3 and all(a["state"] in ("passed", "failed") for a in got)

        try:
            _wait(judged)
        except TimeoutError:
            pytest.fail(f"audits not judged: {json.dumps(audits())[:3000]}")
        nodes = {n["name"]: n["id"] for n in http.get("/api/v1/status").json()["nodes"]}
        for a in audits():
            assert a["state"] == "passed", a["verdict"]
            assert a["node_id"] == nodes["provider"]


class _OtherGrammarVersion(LlamaCppEngine):
    """A verifier whose grammar engine is another version than the provider's."""

    def describe(self) -> dict:
        return {**super().describe(), "grammar": "llguidance/0.0.0"}


def test_a_verifier_with_another_grammar_engine_version_is_not_drawn(
    tmp_path: Path, engine
) -> None:
    """Another llguidance may mask differently, failing an honest answer: a constrained
    answer waits for a verifier of its own version; an unconstrained one does not."""
    verifier = _OtherGrammarVersion(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    with provider_and_verifier(tmp_path, engine, verifier) as (_, http, _key, client):
        messages = [{"role": "user", "content": "A person as JSON."}]
        fmt = type_to_response_format_param(Person)
        bound = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=messages,
            response_format=fmt,
            max_tokens=24,  # type: ignore[arg-type]
        )
        plain = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=messages,
            max_tokens=8,  # type: ignore[arg-type]
        )
        tasks = {r.id for r in (bound, plain)}

        def audits() -> dict[str, dict]:
            got = http.get("/api/v1/audits").json()["audits"]
            return {a["task_id"]: a for a in got if not a["canary"] and a["task_id"] in tasks}

        _wait(lambda: audits().get(plain.id, {}).get("state") == "passed")
        waiting = audits()[bound.id]
        assert waiting["state"] == "pending" and waiting["verifier_id"] is None, waiting
