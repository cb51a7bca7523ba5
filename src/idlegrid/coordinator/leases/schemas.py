"""HTTP bodies of the leases API: a lease, its moves, an exec's result, its logs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from idlegrid.coordinator.schemas import Number


class LeaseMove(BaseModel):
    """The lease entered `state` at `at` because of `cause`."""

    at: Number
    state: str
    cause: str


class LeaseOut(BaseModel):
    """A lease: where it is, on which provider, what ran and what was billed.

    `message` says plainly what the consumer must know (e.g. that a lost provider's
    workspace files are gone). `restart_on_loss`: a lost provider's lease is ordered again
    on another one; `restarted_as` names that new lease, `restarted_from` the lost one."""

    id: str
    state: str
    node_id: str
    spec: dict[str, Any]
    hours: Number
    billed_s: int
    running_s: Number
    message: str | None
    restart_on_loss: bool = False
    restarted_from: str | None = None
    restarted_as: str | None = None
    proofs: list[str] = []  # the hardware proofs (ids) of the leased class it started on
    transitions: list[LeaseMove]


class LeaseList(BaseModel):
    """A key's leases, newest first."""

    leases: list[LeaseOut]


class ExecIn(BaseModel):
    """A command to run in the workspace, to its end (REST; the WebSocket streams)."""

    model_config = ConfigDict(extra="forbid")
    argv: list[str] = Field(min_length=1, max_length=4096)
    env: dict[str, str] = {}
    cwd: str = "/work"
    stdin: str | None = Field(default=None, max_length=1 << 20)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)


class ExecOut(BaseModel):
    """What the command wrote (each stream cut at `limit` bytes) and how it ended."""

    exit_code: int
    stdout: str
    stderr: str
    truncated: bool


class LeaseLogs(BaseModel):
    """The last output of the lease's execs (64 KiB at most), as UTF-8 with replacements."""

    lease: str
    logs: str


class ExtendIn(BaseModel):
    """How many hours later the lease should end."""

    model_config = ConfigDict(extra="forbid")
    hours: float = Field(gt=0, le=720)
