"""What a consumer may send on a lease's exec WebSocket once the command started. Pure.

Binary `0x00 + bytes` is stdin; text is a JSON control frame: `{"type": "eof"}`,
`{"type": "signal", "signal": N}`, `{"type": "resize", "rows", "cols"}` (a shell only).
A frame that is none of these is refused with the field at fault (`frame`, `type`,
`signal`, `rows`, `cols`, `stdin`), and the command goes on: the relay answers a non-fatal
error frame (`Refused.frame`) instead of dropping it or ending the stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Linux's signal numbers (the provider's sandbox is Linux, whatever the coordinator runs
# on); 32 and 33 are glibc's own, as `signal.valid_signals()` leaves them out.
SIGNALS = frozenset(range(1, 32)) | frozenset(range(34, 65))
MAX_TERMINAL = 1000  # rows or columns (leases/shell.py's helper packs them as u16)


@dataclass(frozen=True)
class Stdin:
    """Bytes for the command's stdin."""

    data: bytes


@dataclass(frozen=True)
class Eof:
    """The end of the command's stdin."""


@dataclass(frozen=True)
class Signal:
    """A signal for the command."""

    signal: int


@dataclass(frozen=True)
class Resize:
    """A new size for a shell's terminal."""

    rows: int
    cols: int


@dataclass(frozen=True)
class Refused:
    """A frame the relay does not take: why, and the field at fault."""

    message: str
    param: str

    def frame(self) -> dict[str, Any]:
        """The consumer's answer: a 400 that ends nothing."""
        return {
            "type": "error",
            "status": 400,
            "message": self.message,
            "param": self.param,
            "fatal": False,
        }


Control = Stdin | Eof | Signal | Resize | Refused


def _closed(what: str, opened: bool) -> Refused:
    why = "it was closed by an eof" if opened else "the command was started without stdin"
    return Refused(f"{what}: stdin is not open ({why})", "stdin")


def _size(name: str, value: object) -> int | Refused:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TERMINAL:
        return Refused(f"{name}: a whole number from 1 to {MAX_TERMINAL}, got {value!r}", name)
    return value


def parse_control(
    message: str | bytes, *, stdin: bool, shell: bool, opened: bool | None = None
) -> Control:
    """The consumer's frame as what it asks for, or Refused naming the field at fault.
    `stdin`: stdin is open now; `opened`: it was opened at all (default: `stdin`);
    `shell`: the command is a shell (it has a terminal to resize)."""
    opened = stdin if opened is None else opened
    if isinstance(message, bytes):
        if message[:1] != b"\x00":
            head = message[:1].hex() or "nothing"
            return Refused(
                f"frame: a binary frame is 0x00 then stdin, it began with {head}", "frame"
            )
        return Stdin(message[1:]) if stdin else _closed("stdin bytes", opened)
    try:
        ctl = json.loads(message)
    except ValueError:
        return Refused("frame: a text frame is a JSON object (binary frames carry stdin)", "frame")
    if not isinstance(ctl, dict):
        return Refused(f"frame: a JSON object, got {type(ctl).__name__}", "frame")
    kind = ctl.get("type")
    if kind == "eof":
        return Eof() if stdin else _closed("eof", opened)
    if kind == "signal":
        sig = ctl.get("signal")
        if isinstance(sig, bool) or not isinstance(sig, int) or sig not in SIGNALS:
            return Refused(f"signal: a signal number (1-31, 34-64), got {sig!r}", "signal")
        return Signal(sig)
    if kind == "resize":
        if not shell:
            return Refused("type: resize is for a shell (this command has no terminal)", "type")
        rows, cols = _size("rows", ctl.get("rows")), _size("cols", ctl.get("cols"))
        if isinstance(rows, Refused):
            return rows
        if isinstance(cols, Refused):
            return cols
        return Resize(rows, cols)
    return Refused(f"type: one of eof, signal, resize; got {kind!r}", "type")
