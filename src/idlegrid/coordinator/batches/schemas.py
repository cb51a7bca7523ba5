"""HTTP bodies of the Batch API: OpenAI's `Batch`, its list page, the create request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CreateBatch(BaseModel):
    """POST /v1/batches. Fields OpenAI takes that this grid does not honour
    (`output_expires_after`) are refused by name, not ignored."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = Field(None, max_length=16)


class RequestCounts(BaseModel):
    """How many lines the batch holds, and how many have ended each way."""

    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    """One input line that broke a rule (OpenAI's batch error)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    """The lines that failed validation (the first 100)."""

    object: Literal["list"] = "list"
    data: list[BatchError]


class Waiting(BaseModel):
    """Why a batch's lines are not running now (an idlegrid field, beside OpenAI's)."""

    reason: str  # the grid's refusal, as an interactive request would get it (503)
    since: int  # when its lines started waiting


class BatchObject(BaseModel):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None = None
    waiting: Waiting | None = None


class BatchList(BaseModel):
    """GET /v1/batches: a cursor page, newest first (`after` = the last id of this page)."""

    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
