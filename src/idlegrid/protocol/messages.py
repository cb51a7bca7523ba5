"""Node API v1 messages, shared by the coordinator and the agent.

Additive changes only within a version: new optional fields with defaults, unknown fields
ignored, so agents and coordinators of neighbouring releases keep talking.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# 100,000 credits per 1M tokens (0.1 credit a token): far above any market price, and low
# enough that no hold of a request at the token limit comes near 2^63 µcr.
MAX_TOKEN_PRICE = 100_000 * 1_000_000
MAX_FACTS_BYTES = 16 << 10  # a node's hardware or engine facts, as JSON


class Message(BaseModel):
    """Base: ignore unknown fields (newer peers may send more)."""

    model_config = ConfigDict(extra="ignore")


class OfferMsg(Message):
    """A model the node serves and its prices, µcr per 1M tokens."""

    model: str = Field(min_length=1, max_length=128)
    prompt_price: int = Field(ge=0, le=MAX_TOKEN_PRICE)
    output_price: int = Field(ge=0, le=MAX_TOKEN_PRICE)


class DeviceOfferMsg(Message):
    """Devices of one model on sale per device-hour (µcr), or priced by a plug-in."""

    model: str = Field(min_length=1, max_length=64)
    count: int = Field(ge=1, le=1024)
    vram_gb: float = Field(ge=0, le=4096)
    price_h: int = Field(ge=0, le=10_000_000_000)
    plugin: str | None = Field(None, max_length=200, pattern=r"^[\w.]+:\w+$")


MAX_SWEPT = 256  # lease ids one registration may report swept


class RegisterMsg(Message):
    """Sent once at start-up (and again after a coordinator restart)."""

    protocol_version: int
    name: str = Field(min_length=1, max_length=128)
    hardware: dict[str, Any]
    engine: dict[str, Any]
    slots: int = Field(ge=1, le=256)
    prefill_tps: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    decode_tps: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    offers: list[OfferMsg] = Field(min_length=1, max_length=64)
    # Market (optional; older agents omit them and sell no device-hours).
    region: str = Field("local", min_length=1, max_length=32, pattern=r"^[a-z0-9-]+$")
    # peer node id -> measured Gbit/s
    links: dict[str, Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=256
    )
    # peer node id -> measured one-way latency in ms (optional; unreported counts as 0)
    link_latency_ms: dict[str, Annotated[float, Field(ge=0, le=1e5, allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=256
    )
    devices: list[DeviceOfferMsg] = Field(default_factory=list, max_length=64)
    # Lease controls (core/lease/controls.py; None from older agents: the defaults).
    lease: dict[str, Any] | None = None
    # Verifier mode: this node also re-checks other providers' answers (audits).
    verifier: bool = False
    # Batch work (docs/batch.md): whether it takes batch lines, and at what share of its
    # interactive prices in basis points (None: the grid's default, half).
    batch: bool = True
    batch_price_bps: int | None = Field(None, ge=0, le=10_000)
    # Leases whose workspaces this agent's start-up sweep wiped (a run that died left them):
    # the coordinator records those wipes as confirmed (docs/leases.md). Older agents omit it.
    swept: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]] = Field(
        default_factory=list, max_length=MAX_SWEPT
    )

    @field_validator("lease")
    @classmethod
    def _controls(cls, raw: dict[str, Any] | None) -> dict[str, Any] | None:
        from idlegrid.core.lease.controls import parse_controls
        from idlegrid.errors import InvalidRequest

        try:
            return None if raw is None else parse_controls(raw).to_dict()
        except InvalidRequest as e:
            raise ValueError(e.message) from e

    @field_validator("hardware", "engine")
    @classmethod
    def _bounded(cls, facts: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(facts, default=str)) > MAX_FACTS_BYTES:
            raise ValueError(f"at most {MAX_FACTS_BYTES} bytes as JSON")
        return facts


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
    # "embedding": embed `input` (only models advertised with `engine.embedding` get these).
    kind: Literal["completion", "chat", "embedding"]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    input: list[str] | list[list[int]] | None = None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = Field(default_factory=list)
    # Tokens an earlier attempt already delivered: continue after them.
    prior_ids: list[int] = Field(default_factory=list)
    # Whether the consumer reads the answer as it is made; if not, uploads can wait longer.
    stream: bool = True
    # OpenAI's penalties and logit_bias (token id as a string -> bias), applied in the
    # sampler and committed; logprobs: alternatives per token (None: no logprobs).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = Field(default_factory=dict)
    logprobs: int | None = Field(None, ge=0, le=20)
    # Completions with echo and logprobs: alternatives per prompt position (core/trust/
    # prompt_lp.py), uploaded before the answer's pieces and committed.
    prompt_logprobs: int | None = Field(None, ge=0, le=5)
    # Structured outputs (core/grammar.GrammarSpec.to_wire): sent only to agents whose engine
    # facts name a grammar engine; the answer must be sampled under it and commit to it.
    grammar: dict[str, str] | None = None
    # The consumer's request id (`x-request-id`), for the agent's log lines about this task.
    request_id: str | None = Field(None, max_length=64)
    # The W3C traceparent of the gateway's span (tracing on): the agent's span is its child.
    traceparent: str | None = Field(None, max_length=128)


class LogprobMsg(Message):
    """One token's logprobs as the consumer gets them: its log-probability, its bytes (hex)
    and the alternatives as [token id, log-probability, bytes (hex)]."""

    lp: float = Field(le=0, allow_inf_nan=False)
    bytes: str = Field("", max_length=512, pattern=r"^[0-9a-f]*$")
    top: list[tuple[int, float, str]] = Field(default_factory=list, max_length=20)


class PromptLogprobsMsg(Message):
    """The prompt's logprobs (echo with logprobs): its first token's bytes (hex; the first
    token has no log-probability), then each later token's logprobs."""

    first: str = Field("", max_length=512, pattern=r"^[0-9a-f]*$")
    rows: list[LogprobMsg] = Field(max_length=1 << 17)


class UploadMsg(Message):
    """Output pieces [token id, text]; `start` is the index of the first within the attempt."""

    start: int = Field(ge=0)
    pieces: list[tuple[int, str]] = Field(max_length=4096)
    # Aligned with `pieces` when the request asked for logprobs (null for a text-only piece).
    logprobs: list[LogprobMsg | None] | None = Field(None, max_length=4096)
    # Once per attempt, in an upload of its own before the first piece (HTTP only).
    prompt: PromptLogprobsMsg | None = None


class ChannelPollMsg(PollMsg):
    """On the channel: ask for a task for one engine slot (answered by `task` or `idle`)."""

    op: Literal["poll"]
    slot: int = Field(ge=0, le=1023)


class ChannelCancelMsg(Message):
    """On the channel: stop the poll of a slot (the agent is draining)."""

    op: Literal["cancel"]
    slot: int = Field(ge=0, le=1023)


class ChannelUploadMsg(UploadMsg):
    """On the channel: output pieces for an attempt (answered by `ack` or `refused`)."""

    op: Literal["upload"]
    task_id: str = Field(min_length=1, max_length=64)
    attempt: int = Field(ge=1)


class ChannelSyncMsg(Message):
    """On the channel: ask how far an attempt's uploads were accepted (answered by `ack`,
    or `refused` if the attempt is no longer this node's); uploads are not acked one by one."""

    op: Literal["sync"]
    task_id: str = Field(min_length=1, max_length=64)
    attempt: int = Field(ge=1)


class FinishMsg(Message):
    """The attempt is complete."""

    prompt_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length"]
    # Base64 of the inference commitment (core/trust/commitment.py), sent before the
    # provider can know whether the answer will be audited. Absent: the answer is unverified.
    # 4 MiB: top_logprobs=20 commits 164 B more per token.
    commitment: str | None = Field(None, max_length=1 << 22)
    # Energy the node spent on this attempt (its share when requests overlapped); optional.
    energy_j: float | None = Field(None, ge=0, allow_inf_nan=False)
    energy_estimated: bool = False


class FailMsg(Message):
    """The node could not complete the attempt (or is handing it back while draining)."""

    reason: str = Field(max_length=500)
    kind: Literal["engine", "invalid_request", "handback"] = "engine"
    # Base64 commitment to the tokens this attempt delivered before it stopped (failover):
    # the next provider continues from them, and this part can be audited on its own.
    commitment: str | None = Field(None, max_length=1 << 22)
    # The request field an invalid_request names (e.g. logit_bias outside the vocabulary).
    param: str | None = Field(None, max_length=64)


class StakeMsg(Message):
    """Lock (or release) provider credits as stake for one device class."""

    device_class: str = Field(min_length=1, max_length=64)
    amount: int = Field(gt=0, le=10**15)
    ref: str = Field(min_length=1, max_length=64, pattern=r"^[\w.:-]+$")


class TokensMsg(Message):
    """Output tokens produced for a batch order."""

    tokens: int = Field(gt=0, le=10**9)


class AuditPollMsg(Message):
    """A verifier asks for an audit of a model it serves."""

    models: list[str] = Field(min_length=1)


class AuditTaskMsg(Message):
    """An answer to re-check: the request as the provider saw it, and its commitment."""

    audit_id: str
    model: str
    kind: Literal["completion", "chat", "embedding"]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    input: list[str] | list[list[int]] | None = None  # kind "embedding"
    prior_ids: list[int] = Field(default_factory=list)
    max_new_tokens: int
    stop: list[str] = Field(default_factory=list)
    commitment: str
    grammar: dict[str, str] | None = None  # the request's grammar: replay its masks


class AuditReportMsg(Message):
    """What the verifier recomputed (base64 of core/trust/report_codec.encode_report)."""

    report: str = Field(max_length=1 << 20)


class HwCommitMsg(Message):
    """Hardware proof: the Merkle root of C (matmul), or an empty root once filled (memory)."""

    root: str = Field("", max_length=64, pattern=r"^[0-9a-f]*$")


class HwOpeningMsg(Message):
    """One opened row of C: float32 LE bytes (base64) and its Merkle path."""

    index: int = Field(ge=0)
    row: str = Field(max_length=1 << 17)
    siblings: list[str] = Field(max_length=40)
    right: list[bool] = Field(max_length=40)


class HwOpenMsg(Message):
    """Hardware proof answers: opened rows (matmul) or the chase trace (memory, base64)."""

    openings: list[HwOpeningMsg] = Field(default_factory=list, max_length=64)
    trace: str = Field("", max_length=1 << 22)
