"""Node API v1 messages, shared by the coordinator and the agent.

Additive changes only within a version: new optional fields with defaults, unknown fields
ignored, so agents and coordinators of neighbouring releases keep talking.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    """Base: ignore unknown fields (newer peers may send more)."""

    model_config = ConfigDict(extra="ignore")


class OfferMsg(Message):
    """A model the node serves and its prices, µcr per 1M tokens."""

    model: str = Field(min_length=1, max_length=128)
    prompt_price: int = Field(ge=0)
    output_price: int = Field(ge=0)


class RegisterMsg(Message):
    """Sent once at start-up (and again after a coordinator restart)."""

    protocol_version: int
    name: str = Field(min_length=1, max_length=128)
    hardware: dict[str, Any]
    engine: dict[str, Any]
    slots: int = Field(ge=1, le=256)
    prefill_tps: float = Field(ge=0)
    decode_tps: float = Field(ge=0)
    offers: list[OfferMsg] = Field(min_length=1)


class PowerMsg(Message):
    """The node's energy counter: joules since its agent started, and the draw now."""

    joules_total: float = Field(ge=0, allow_inf_nan=False)
    watts: float | None = Field(None, ge=0, allow_inf_nan=False)
    source: Literal["nvml", "rapl", "estimate"]
    estimated: bool


class HeartbeatMsg(Message):
    """Liveness, and the node's intent (draining stops new work)."""

    state: Literal["live", "draining"] = "live"
    in_flight: int = Field(0, ge=0)
    # Optional: agents before the energy report send none.
    power: PowerMsg | None = None


class PollMsg(Message):
    """Ask for one task; the coordinator answers when it has one or after wait_s."""

    models: list[str] = Field(min_length=1)
    wait_s: float = Field(15.0, gt=0, le=60)


class TaskMsg(Message):
    """Work handed to a node."""

    task_id: str
    attempt: int
    model: str
    kind: Literal["completion", "chat"]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = Field(default_factory=list)
    # Tokens an earlier attempt already delivered: continue after them.
    prior_ids: list[int] = Field(default_factory=list)


class UploadMsg(Message):
    """Output pieces [token id, text]; `start` is the index of the first within the attempt."""

    start: int = Field(ge=0)
    pieces: list[tuple[int, str]] = Field(max_length=4096)


class FinishMsg(Message):
    """The attempt is complete."""

    prompt_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length"]
    # Energy the node spent on this attempt (its share when requests overlapped); optional.
    energy_j: float | None = Field(None, ge=0, allow_inf_nan=False)
    energy_estimated: bool = False


class FailMsg(Message):
    """The node could not complete the attempt (or is handing it back while draining)."""

    reason: str = Field(max_length=500)
    kind: Literal["engine", "invalid_request", "handback"] = "engine"
