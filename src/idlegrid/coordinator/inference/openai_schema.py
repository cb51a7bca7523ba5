"""Request bodies of the OpenAI-compatible gateway, and what they cost at most."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from idlegrid.errors import InvalidRequest

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_PRICE_CREDITS = 100_000.0  # per 1M tokens; the bound on any provider's price too
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request (prompts x n): each is a task with its own escrow


def _sent(body: BaseModel) -> dict[str, Any]:
    # Declared fields in declaration order, then the others as sent: `model_fields_set` is a
    # set (it holds the extras too), and the first refused field must not depend on hashing.
    fields_set = body.model_fields_set
    declared = {n: getattr(body, n) for n in type(body).model_fields if n in fields_set}
    return {**declared, **(body.model_extra or {})}


class MaxPrice(BaseModel):
    """The most a consumer will pay, in credits per 1M tokens (idlegrid's extension)."""

    model_config = ConfigDict(extra="forbid")
    prompt: float = Field(ge=0, le=MAX_PRICE_CREDITS, allow_inf_nan=False)
    output: float = Field(ge=0, le=MAX_PRICE_CREDITS, allow_inf_nan=False)


class _Common(BaseModel):
    # Undeclared fields are kept (not dropped) so that fields.check can honour, accept or
    # refuse each by name: the routes refuse what the endpoint's table does not allow.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    # Requests go only to providers at or below this price, and are escrowed at the dearest
    # of those (default: the coordinator's IDLEGRID_DEFAULT_MAX_*_PRICE).
    max_price: MaxPrice | None = None
    # Applied in the sampler and committed (core/trust/adjust.py); ranges checked there.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    def sampler_fields(self, logprobs: int | None) -> dict[str, Any]:
        """Penalties, bias and logprobs for the task payload (only those that change
        anything, so a plain request's payload is what it always was)."""
        from idlegrid.core.trust.adjust import AdjustError, make

        try:
            adj = make(self.presence_penalty, self.frequency_penalty, self.logit_bias)
        except AdjustError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        out: dict[str, Any] = {}
        if adj.presence:
            out["presence_penalty"] = adj.presence
        if adj.frequency:
            out["frequency_penalty"] = adj.frequency
        if adj.bias:
            out["logit_bias"] = {str(t): b for t, b in adj.bias}
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out

    def stop_list(self) -> list[str]:
        """Stop strings as a list, validated."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise InvalidRequest(f"at most {MAX_STOP} stop sequences", param="stop")
        if any(not s for s in stops):
            raise InvalidRequest("stop sequences must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidRequest(
                f"stop sequences are at most {MAX_STOP_CHARS} characters", param="stop"
            )
        return stops

    def sent(self) -> dict[str, Any]:
        """The fields the client sent, by name (declared ones parsed, others as sent)."""
        return _sent(self)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # alternatives per token (OpenAI: ≤ 5)

    def prompts(self) -> list[str]:
        """The request's prompts, in order: one for a string, each of a list of strings."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise InvalidRequest("prompt must not be an empty list", param="prompt")
        if not all(isinstance(p, str) for p in self.prompt):
            # Providers tokenize text themselves, and the verifier replays from the text.
            raise InvalidRequest("token-id prompts are not supported: send text", param="prompt")
        prompts = [p for p in self.prompt if isinstance(p, str)]
        if len(prompts) * self.n > MAX_CHOICES:
            raise InvalidRequest(
                f"at most {MAX_CHOICES} choices per request (prompts x n)", param="prompt"
            )
        return prompts


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            parts = []
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return v


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    # text | json_object | json_schema, enforced token by token (coordinator/inference/
    # structured.py); anything else is a 400 naming it.
    response_format: dict[str, Any] | None = None
    # Tool calling, enforced as a grammar (coordinator/inference/tools.py, core/tools.py);
    # untyped here so that a malformed value is a 400 naming the field, not a 422.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    def logprobs_k(self) -> int | None:
        """Alternatives per token when logprobs are on (None: off)."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


def prompt_token_bound(text: str) -> int:
    """An upper bound on the tokens of `text`: a token covers at least one UTF-8 byte."""
    return len(text.encode()) + 2  # + BOS, and one spare


def chat_token_bound(messages: list[dict[str, str]]) -> int:
    """An upper bound on a chat prompt's tokens, template markup included."""
    return sum(len(m["content"].encode()) + len(m["role"]) + 16 for m in messages) + 16


MAX_EMBED_INPUTS = 256  # inputs per embeddings request (core/trust/embedding.MAX_INPUTS)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. `input` is checked by `inputs()`, so that every malformed shape
    is a 400 naming `input` (not pydantic's path through the union)."""

    model_config = ConfigDict(extra="allow")  # fields.EMBEDDINGS refuses the unknown ones

    model: str = Field(min_length=1, max_length=128)
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    max_price: MaxPrice | None = None

    def sent(self) -> dict[str, Any]:
        """The fields the client sent, by name."""
        return _sent(self)

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list of strings or a list of token-id lists, as OpenAI accepts."""
        raw = self.input
        if isinstance(raw, str):
            raw = [raw]
        elif isinstance(raw, list) and raw and all(_is_id(t) for t in raw):
            raw = [raw]  # one input given as token ids
        if not isinstance(raw, list) or not raw:
            raise InvalidRequest("input must be a non-empty string or list", param="input")
        if len(raw) > MAX_EMBED_INPUTS:
            raise InvalidRequest(
                f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(raw)}", param="input"
            )
        if all(isinstance(x, str) for x in raw):
            if any(not x for x in raw):
                raise InvalidRequest("an input is an empty string", param="input")
            return list(raw)
        if all(isinstance(x, list) and x and all(_is_id(t) for t in x) for x in raw):
            return [list(x) for x in raw]
        raise InvalidRequest(
            "input must be a string, a list of strings, a list of token ids or a list of "
            "non-empty token-id lists (not a mix)",
            param="input",
        )


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
