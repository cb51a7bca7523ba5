"""Response models of the OpenAI-compatible gateway (request bodies: openai_schema.py).

A streamed answer (`stream: true`) is `text/event-stream`: `data:` lines holding
ChatCompletionChunk or CompletionChunk objects (the chat stream opens with the role of each
choice; chunks of several choices interleave, each with its index), an
optional usage chunk, an `{"error": ...}` object if the request failed midway, then
`data: [DONE]`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from idlegrid.coordinator.schemas import event_stream


class Model(BaseModel):
    """A model some live provider serves."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[Model]


class Usage(BaseModel):
    """Tokens of the request, summed over its choices (the providers' counts)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    """A function a tool call invokes; arguments are JSON text (whole, or a fragment)."""

    name: str | None = None
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an answer (`finish_reason: "tool_calls"`)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(BaseModel):
    """A streamed part of a tool call: the first carries id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class TopLogprob(BaseModel):
    """An alternative token and its log-probability (chat logprobs)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """The sampled token, its log-probability and the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """`choices[i].logprobs` of a chat completion or chunk."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """`choices[i].logprobs` of a text completion or chunk (OpenAI's legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: a prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    """The answer of a chat completion: text, or tool calls (content null)."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion (n > 1 and prompt lists give several, by index)."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions without streaming."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    """One choice of a text completion (index = prompt * n + j)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    """POST /v1/completions without streaming."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What a chunk adds: the role (first chunk), text, or parts of tool calls."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    """A choice's part in a streamed chat chunk (its index says which choice)."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (`choices` is empty in the usage
    chunk)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def _stream(chunk: type[BaseModel]) -> dict[str, Any]:
    return event_stream(
        f"JSON of a {chunk.__name__} (the last one may carry only `usage`), "
        "or of an error object if the request failed midway; then `[DONE]`"
    )


CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion, or with `stream: true` a stream of chunks",
        "content": _stream(ChatCompletionChunk),
    }
}
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion, or with `stream: true` a stream of chunks",
        "content": _stream(CompletionChunk),
    }
}


class Embedding(BaseModel):
    """One input's vector: floats, or base64 of float32 little-endian (encoding_format)."""

    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens of the inputs, as the provider's commitment fixes them (what was billed)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """POST /v1/embeddings."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
