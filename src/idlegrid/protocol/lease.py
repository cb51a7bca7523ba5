"""Lease frames on the agent channel (version 3): provisioning, ending and exec streams.

Control frames are JSON. Coordinator → agent (`type`): `provision` (spec) · `end` ·
`exec` (argv, env, cwd, stdin, window; `forward`: a port the agent may connect to
inside the workspace itself rather than run `argv`, the relay script) · `stdin-eof` ·
`credit` (bytes the coordinator passed on) · `signal` (signal number).
Agent → coordinator (signed like every agent frame): `provisioned` · `provisioning-failed`
(reason) · `wiped` · `stdin-credit` (bytes written to the workload) · `exit` (code, and
`bytes`: how many output bytes it sent) · `exec-failed` (reason).

Stream bytes (stdin one way, stdout/stderr the other) travel as **binary data frames**: a
10-byte header (`DATA_MARK`, the exec id's 8 bytes, the stream) then the raw bytes. The
stream byte comes last (version 3; version 2 had it second, under mark 0xB2) so that a
frame from byte 9 on, the stream then its bytes, is already the consumer's WebSocket frame
(`0x01` stdout / `0x02` stderr + bytes, coordinator/leases/routes.py): the coordinator
passes a view of it on without building a new one. They
are not signed one by one: signing was most of the cost of a byte on its way (an Ed25519
signature and a SHA-256 per frame, plus base64 and JSON), and a data frame needs no
signature of its own to be trusted as far as a signed one. It rides a channel whose
handshake the agent signed; the coordinator takes it only for an exec it opened on that
agent's channel, only within the credit it gave, and the agent's signed `exit` states how
many bytes it sent, so a lost or injected frame fails the exec. (Frames from the
coordinator were never signed: the transport, TLS outside loopback, carries their
integrity, and now that of data frames too.)

An agent or coordinator that meets a `v` it does not know refuses the frame (the lease then
fails as provisioning-failed or provider-lost): a version-1 agent (base64 `out` frames)
fails its leases' provisioning.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from idlegrid.core.market.spec import IMAGE_REF

LEASE_PROTOCOL = 3
EXEC_ID = r"^ex_[0-9a-f]{16}$"  # 8 random bytes, hex: the id a data frame carries raw
# First byte of a data frame: never that of a signed frame (a digit) or JSON. One mark per
# header layout, so a peer of another version refuses the frame rather than misread it.
DATA_MARK = 0xB3
STDIN, STDOUT, STDERR = 0, 1, 2
STREAMS = {STDOUT: "stdout", STDERR: "stderr"}
_HEADER = struct.Struct("!B8sB")
CONSUMER_AT = 9  # a data frame from here on: the stream byte, then the bytes

TO_AGENT = ("provision", "end", "exec", "stdin-eof", "credit", "signal")
TO_COORDINATOR = (
    "provisioned",
    "provisioning-failed",
    "wiped",
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
    egress: bool = False  # outbound network (egress only), where the provider allows it
    runtime: str | None = None  # the workspace runtime asked; None: the provider's own
    # podman: an image it has; checked here too, as it goes into podman's argv
    image: str | None = Field(default=None, max_length=255, pattern=IMAGE_REF.pattern)


class LeaseFrame(BaseModel):
    """One lease frame, either way; which fields matter depends on `type`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    op: Literal["lease"] = "lease"
    v: int = LEASE_PROTOCOL
    type: str
    lease: str = Field(max_length=64)
    exec: str | None = Field(default=None, pattern=EXEC_ID)
    spec: LeaseSpecMsg | None = None
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: bool | None = None
    window: int | None = None
    forward: int | None = Field(default=None, ge=1, le=65535)
    size: int | None = Field(default=None, alias="bytes")
    code: int | None = None
    signal: int | None = None
    reason: str | None = Field(default=None, max_length=4000)

    def wire(self) -> dict[str, Any]:
        """The frame as JSON-ready dict, without the fields it does not use."""
        return self.model_dump(exclude_none=True, mode="json", by_alias=True)


def frame(type_: str, lease: str, **fields: Any) -> dict[str, Any]:
    """A lease control frame ready to send."""
    return LeaseFrame(type=type_, lease=lease, **fields).wire()


class BadDataFrame(ValueError):
    """Bytes that are not a lease data frame (the channel that sent them is closed)."""


def is_data(raw: bytes) -> bool:
    """Whether a channel message is a data frame (rather than a signed or JSON frame)."""
    return raw[:1] == b"\xb3"


def data_frame(exec_id: str, stream: int, payload: bytes) -> bytes:
    """A data frame: `payload` of `stream` (STDIN, STDOUT or STDERR) of exec `exec_id`."""
    return data_header(exec_id, stream) + payload


def data_header(exec_id: str, stream: int) -> bytes:
    """The 10 bytes a data frame of `stream` of exec `exec_id` starts with."""
    return _HEADER.pack(DATA_MARK, bytes.fromhex(exec_id[3:]), stream)


def read_data(raw: bytes) -> tuple[str, int, memoryview]:
    """(exec id, stream, payload) of a data frame; BadDataFrame if it is not one."""
    exec_id, stream, view = read_frame(raw)
    return exec_id, stream, view[1:]


def read_frame(raw: bytes) -> tuple[str, int, memoryview]:
    """(exec id, stream, the frame from its stream byte on): what a consumer is sent, as a
    view of `raw` (no copy); BadDataFrame if it is not a data frame."""
    if len(raw) < _HEADER.size or raw[0] != DATA_MARK or raw[9] not in (STDIN, STDOUT, STDERR):
        head = raw[:10].hex()
        raise BadDataFrame(f"not a lease data frame ({len(raw)} bytes, first {head})")
    _, ident, stream = _HEADER.unpack_from(raw)
    return "ex_" + ident.hex(), stream, memoryview(raw)[CONSUMER_AT:]
