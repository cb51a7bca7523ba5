"""Request bodies of the OpenAI-compatible gateway, and what they cost at most."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from idlegrid.errors import InvalidRequest

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_PRICE_CREDITS = 100_000.0  # per 1M tokens; the bound on any provider's price too


class MaxPrice(BaseModel):
    """The most a consumer will pay, in credits per 1M tokens (idlegrid's extension)."""

    model_config = ConfigDict(extra="forbid")
    prompt: float = Field(ge=0, le=MAX_PRICE_CREDITS, allow_inf_nan=False)
    output: float = Field(ge=0, le=MAX_PRICE_CREDITS, allow_inf_nan=False)


class _Common(BaseModel):
    # Unknown OpenAI fields are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # Requests go only to providers at or below this price, and are escrowed at the dearest
    # of those (default: the coordinator's IDLEGRID_DEFAULT_MAX_*_PRICE).
    max_price: MaxPrice | None = None

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

    def check_supported(self) -> None:
        """Refuse parameters whose meaning we would silently change."""
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        if self.presence_penalty or self.frequency_penalty:
            raise InvalidRequest(
                "presence/frequency penalties are not supported",
                param="presence_penalty" if self.presence_penalty else "frequency_penalty",
            )

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str:
        """The one prompt this request carries."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequest("exactly one prompt per request is supported", param="prompt")
            return self.prompt[0]
        if self.echo or self.logprobs or self.suffix:
            param = "echo" if self.echo else "logprobs" if self.logprobs else "suffix"
            raise InvalidRequest(f"{param} is not supported", param=param)
        return self.prompt


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
    # text | json_object | json_schema, enforced token by token (coordinator/inference/
    # structured.py); anything else is a 400 naming it.
    response_format: dict[str, Any] | None = None

    def plain_messages(self) -> list[dict[str, str]]:
        """Messages as role/content dicts for the chat template."""
        role = {"developer": "system"}
        return [
            {"role": role.get(m.role, m.role), "content": str(m.content or "")}
            for m in self.messages
        ]


def prompt_token_bound(text: str) -> int:
    """An upper bound on the tokens of `text`: a token covers at least one UTF-8 byte."""
    return len(text.encode()) + 2  # + BOS, and one spare


def chat_token_bound(messages: list[dict[str, str]]) -> int:
    """An upper bound on a chat prompt's tokens, template markup included."""
    return sum(len(m["content"].encode()) + len(m["role"]) + 16 for m in messages) + 16
