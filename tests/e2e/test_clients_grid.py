"""Clients nobody here wrote, against `idlegrid up` with the real default model: LangChain's
`ChatOpenAI` (plain, `with_structured_output` and `bind_tools`) and LiteLLM (plain and
`response_format`).

Each must get what it asked for or a clear error: a structured answer that parses into the
caller's own pydantic model, never a silently unconstrained one. (instructor is not here:
its `jiter<0.15` pin makes pip resolve the `openai` package back to 1.x for the whole test
environment; see docs/openai.md.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import BaseModel, Field
from test_local_grid import MODEL, UpProcess

pytestmark = pytest.mark.slow


class City(BaseModel):
    """A short, closed object a 270M base model can finish inside the token limit."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    proc = UpProcess(tmp_path_factory.mktemp("clients"))
    try:
        key = proc.wait_ready()
        yield f"{proc.url}/v1", key
    finally:
        proc.stop()


def test_langchain_chat_and_structured_output(grid: tuple[str, str]) -> None:
    from langchain_openai import ChatOpenAI

    base, key = grid
    llm = ChatOpenAI(
        model=MODEL, base_url=base, api_key=key, max_tokens=48, temperature=0, max_retries=0
    )
    plain = llm.invoke("The capital of France is")
    assert isinstance(plain.content, str) and plain.content
    assert plain.response_metadata["finish_reason"] in ("stop", "length")
    structured = llm.with_structured_output(City, method="json_schema", strict=True)
    city = structured.invoke("Name a city and its country as JSON.")
    assert isinstance(city, City)  # parsed and validated by LangChain from our answer
    assert city.name and len(city.name) <= 24


class GetWeather(BaseModel):
    """The weather forecast for a city."""

    city: str = Field(max_length=16)
    days: int = Field(ge=1, le=7)


def test_langchain_bind_tools_with_tool_choice_any_returns_a_call(grid: tuple[str, str]) -> None:
    from langchain_core.messages import AIMessage
    from langchain_openai import ChatOpenAI

    base, key = grid
    llm = ChatOpenAI(
        model=MODEL, base_url=base, api_key=key, max_tokens=48, temperature=0, max_retries=0
    )
    bound = llm.bind_tools([GetWeather], tool_choice="any", parallel_tool_calls=False)
    assert bound.kwargs["tool_choice"] == "required"  # what langchain-openai sends for "any"
    answer = bound.invoke("What is the weather in Paris for the next 2 days?")
    assert isinstance(answer, AIMessage)
    assert answer.response_metadata["finish_reason"] == "tool_calls", answer
    (call,) = answer.tool_calls  # parsed by LangChain from our tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather.model_validate(call["args"])


def test_litellm_chat_and_response_format(grid: tuple[str, str]) -> None:
    import litellm

    base, key = grid
    common = {"model": f"openai/{MODEL}", "api_base": base, "api_key": key, "num_retries": 0}
    plain = litellm.completion(
        messages=[{"role": "user", "content": "The capital of France is"}],
        max_tokens=8,
        temperature=0,
        **common,
    )
    assert plain.choices[0].message.content
    assert 0 < plain.usage.completion_tokens <= 8
    shaped = litellm.completion(
        messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
        max_tokens=48,
        temperature=0,
        response_format=City,
        **common,
    )
    choice = shaped.choices[0]
    assert choice.finish_reason == "stop", choice
    city = City.model_validate_json(choice.message.content)
    assert city.name
