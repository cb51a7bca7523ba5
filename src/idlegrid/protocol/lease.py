"""Lease frames on the agent channel (version 1): provisioning, ending and exec streams.

Coordinator → agent (`type`): `provision` (spec) · `end` · `exec` (argv, env, cwd, stdin,
window) · `stdin` (data) · `stdin-eof` · `credit` (bytes the coordinator passed on) ·
`signal` (signal number).
Agent → coordinator (signed like every agent frame): `provisioned` · `provisioning-failed`
(reason) · `wiped` · `out` (stream, data) · `stdin-credit` (bytes written to the
workload) · `exit` (code) · `exec-failed` (reason).

Bytes travel base64-encoded in `data`. An agent or coordinator that meets a `v` it does not
know refuses the frame (the lease then fails as provisioning-failed or provider-lost).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LEASE_PROTOCOL = 1

TO_AGENT = ("provision", "end", "exec", "stdin", "stdin-eof", "credit", "signal")
TO_COORDINATOR = (
    "provisioned",
    "provisioning-failed",
    "wiped",
    "out",
    "stdin-credit",
    "exit",
    "exec-failed",
)


class LeaseSpecMsg(BaseModel):
    """What the workspace gets: CPU cores, memory, processes, disk, GPU indices, pip."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    pids: int = Field(gt=0)
    disk_bytes: int = Field(gt=0)
    gpus: list[int] = []
    pip: list[str] = []


class LeaseFrame(BaseModel):
    """One lease frame, either way; which fields matter depends on `type`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    op: Literal["lease"] = "lease"
    v: int = LEASE_PROTOCOL
    type: str
    lease: str = Field(max_length=64)
    exec: str | None = Field(default=None, max_length=64)
    spec: LeaseSpecMsg | None = None
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: bool | None = None
    window: int | None = None
    stream: Literal["stdout", "stderr"] | None = None
    data: str | None = None  # base64
    size: int | None = Field(default=None, alias="bytes")
    code: int | None = None
    signal: int | None = None
    reason: str | None = Field(default=None, max_length=4000)

    def payload(self) -> bytes:
        """The bytes `data` carries."""
        return base64.b64decode(self.data or "")

    def wire(self) -> dict[str, Any]:
        """The frame as JSON-ready dict, without the fields it does not use."""
        return self.model_dump(exclude_none=True, mode="json", by_alias=True)


def frame(type_: str, lease: str, *, data: bytes | None = None, **fields: Any) -> dict[str, Any]:
    """A lease frame ready to send (bytes in `data` base64-encoded)."""
    if data is not None:
        fields["data"] = base64.b64encode(data).decode()
    return LeaseFrame(type=type_, lease=lease, **fields).wire()
