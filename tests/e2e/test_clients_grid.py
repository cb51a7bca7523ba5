"""Clients nobody here wrote, against `idlegrid up` with the real default model: LangChain's
`ChatOpenAI` (plain, `with_structured_output` and `bind_tools`) and LiteLLM (plain and
`response_format`).

Each must get what it asked for or a clear error: a structured answer that parses into the
caller's own pydantic model, never a silently unconstrained one. instructor runs from its
own virtual environment: its `jiter<0.15` pin would pull the test environment's `openai`
package back to an older release.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from test_local_grid import MODEL, UpProcess

pytestmark = pytest.mark.slow

# Each client runs as its own process, as a user's script would: LiteLLM leaves an event
# loop open behind it, which would surface as a ResourceWarning in some later test here.
CITY = """
from pydantic import BaseModel, ConfigDict, Field


class City(BaseModel):
    # A short, closed object a 270M base model can finish inside the token limit: without
    # additionalProperties false (extra="forbid") JSON Schema allows more keys, and a base
    # model keeps writing them until the limit.
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
"""

LANGCHAIN = (
    CITY
    + """
import json, os
from langchain_openai import ChatOpenAI

llm = ChatOpenAI(model=os.environ["MODEL"], base_url=os.environ["BASE"],
                 api_key=os.environ["KEY"], max_tokens=48, temperature=0, max_retries=0)
plain = llm.invoke("The capital of France is")
city = llm.with_structured_output(City, method="json_schema", strict=True).invoke(
    "Name a city and its country as JSON.")
print(json.dumps({"text": plain.content,
                  "finish": plain.response_metadata["finish_reason"],
                  "type": type(city).__name__, "city": city.model_dump()}))
"""
)

LITELLM = (
    CITY
    + """
import json, os
import litellm

common = {"model": "openai/" + os.environ["MODEL"], "api_base": os.environ["BASE"],
          "api_key": os.environ["KEY"], "num_retries": 0, "temperature": 0}
plain = litellm.completion(messages=[{"role": "user", "content": "The capital of France is"}],
                           max_tokens=8, **common)
shaped = litellm.completion(
    messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
    max_tokens=48, response_format=City, **common)
city = City.model_validate_json(shaped.choices[0].message.content)
print(json.dumps({"text": plain.choices[0].message.content,
                  "tokens": plain.usage.completion_tokens,
                  "finish": shaped.choices[0].finish_reason, "city": city.model_dump()}))
"""
)


BIND_TOOLS = """
import json, os
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class GetWeather(BaseModel):
    \"\"\"The weather forecast for a city.\"\"\"

    city: str = Field(max_length=16)
    days: int = Field(ge=1, le=7)


llm = ChatOpenAI(model=os.environ["MODEL"], base_url=os.environ["BASE"],
                 api_key=os.environ["KEY"], max_tokens=48, temperature=0, max_retries=0)
bound = llm.bind_tools([GetWeather], tool_choice="any", parallel_tool_calls=False)
answer = bound.invoke("What is the weather in Paris for the next 2 days?")
calls = answer.tool_calls  # parsed by LangChain from our tool_calls
print(json.dumps({"sent_choice": bound.kwargs["tool_choice"],
                  "finish": answer.response_metadata["finish_reason"],
                  "calls": calls,
                  "valid": [GetWeather.model_validate(c["args"]).model_dump() for c in calls]}))
"""


INSTRUCTOR = (
    CITY
    + """
import json, os
import instructor
from openai import OpenAI

client = instructor.from_openai(
    OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0),
    mode=getattr(instructor.Mode, os.environ["MODE"]),
)
city = client.chat.completions.create(
    model=os.environ["MODEL"], response_model=City, max_retries=0, max_tokens=128,
    temperature=0, messages=[{"role": "user", "content": "Name a city and its country."}])
print(json.dumps({"type": type(city).__name__, "city": city.model_dump()}))
"""
)


@pytest.fixture(scope="module")
def instructor_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python with instructor installed, in its own virtual environment: instructor's
    `jiter<0.15` pin resolves `openai` back to an older release, which the test environment
    must not take (pip picks openai 3.3 here, against 3.63 in the test extra)."""
    venv = tmp_path_factory.mktemp("instructor") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "instructor>=1.10"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return python


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    proc = UpProcess(tmp_path_factory.mktemp("clients"))
    try:
        key = proc.wait_ready()
        yield {"BASE": f"{proc.url}/v1", "KEY": key, "MODEL": MODEL}
    finally:
        proc.stop()


def run_client(script: str, env: dict[str, str], python: str = sys.executable) -> dict[str, object]:
    """Run one client script against the grid; its one JSON line of results."""
    out = subprocess.run(
        [python, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_langchain_chat_and_structured_output(grid: dict[str, str]) -> None:
    r = run_client(LANGCHAIN, grid)
    assert isinstance(r["text"], str) and r["text"]
    assert r["finish"] in ("stop", "length")
    assert r["type"] == "City"  # parsed and validated by LangChain from our answer
    city = r["city"]
    assert isinstance(city, dict) and city["name"] and len(city["name"]) <= 24


def test_langchain_bind_tools_with_tool_choice_any_returns_a_call(grid: dict[str, str]) -> None:
    r = run_client(BIND_TOOLS, grid)
    assert r["sent_choice"] == "required"  # what langchain-openai sends for "any"
    assert r["finish"] == "tool_calls", r
    calls = r["calls"]
    assert isinstance(calls, list) and len(calls) == 1, r
    assert calls[0]["name"] == "GetWeather" and calls[0]["id"].startswith("call_")
    assert r["valid"]  # the arguments validate against the caller's own model


def test_litellm_chat_and_response_format(grid: dict[str, str]) -> None:
    r = run_client(LITELLM, grid)
    assert r["text"]
    assert isinstance(r["tokens"], int) and 0 < r["tokens"] <= 8
    assert r["finish"] == "stop", r
    city = r["city"]
    assert isinstance(city, dict) and city["name"]


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_returns_the_callers_model(
    grid: dict[str, str], instructor_python: str, mode: str
) -> None:
    """instructor's default mode (a named tool call) and its JSON-schema mode (response_format),
    with retries off: the first answer must validate."""
    r = run_client(INSTRUCTOR, {**grid, "MODE": mode}, instructor_python)
    assert r["type"] == "City"
    city = r["city"]
    assert isinstance(city, dict) and city["name"] and len(city["name"]) <= 24
