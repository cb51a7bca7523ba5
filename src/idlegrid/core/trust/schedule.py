"""The batch schedule of one batched answer: what a verifier needs to replay it bit for bit.

A sequence decoded in a batch gets numbers that depend on the batch's shape (its size and
the sequence's row: docs/continuous-batching.md), not on the other rows' contents. So a
batched answer commits, per generated token, the `(size, row)` of the step that produced it,
and the prompt chunk size its prompt was fed with. Consecutive steps mostly share a shape,
so the wire form is run-length encoded: `<HH` chunk size and run count, then per run
`<BBH` size, row, repeat. Not yet carried by `commitment.Header` (docs/continuous-batching.md,
"what is left").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAX_BATCH = 255
_HEAD = struct.Struct("<HH")
_RUN = struct.Struct("<BBH")


@dataclass(frozen=True)
class Schedule:
    """Prompt chunk size and each generated token's (batch size, row)."""

    chunk: int
    shapes: tuple[tuple[int, int], ...]

    def runs(self) -> list[tuple[int, int, int]]:
        """(size, row, repeat) runs, repeats at most 65535."""
        out: list[tuple[int, int, int]] = []
        for size, row in self.shapes:
            if out and out[-1][:2] == (size, row) and out[-1][2] < 0xFFFF:
                out[-1] = (size, row, out[-1][2] + 1)
            else:
                out.append((size, row, 1))
        return out

    def encode(self) -> bytes:
        """The wire form (see the module docstring)."""
        check(self.chunk, self.shapes)
        runs = self.runs()
        return _HEAD.pack(self.chunk, len(runs)) + b"".join(_RUN.pack(*r) for r in runs)

    @property
    def widest(self) -> int:
        """The largest batch any step ran in (the verifier needs 2·widest − 1 slots)."""
        return max((size for size, _ in self.shapes), default=1)


def check(chunk: int, shapes: Sequence[tuple[int, int]]) -> None:
    """ValueError unless every shape is a row inside a batch of 1..MAX_BATCH."""
    if not 1 <= chunk <= 0xFFFF:
        raise ValueError(f"prompt chunk {chunk} out of range")
    for size, row in shapes:
        if not (1 <= size <= MAX_BATCH and 0 <= row < size):
            raise ValueError(f"batch shape ({size}, {row}) out of range")


def decode(buf: bytes, pos: int, n_tokens: int) -> tuple[Schedule, int]:
    """A schedule at `pos` covering exactly `n_tokens` tokens, and the position after it."""
    chunk, n_runs = _HEAD.unpack_from(buf, pos)
    pos += _HEAD.size
    shapes: list[tuple[int, int]] = []
    for _ in range(n_runs):
        size, row, repeat = _RUN.unpack_from(buf, pos)
        pos += _RUN.size
        if repeat == 0:
            raise ValueError("empty run")
        shapes.extend([(size, row)] * repeat)
        if len(shapes) > n_tokens:
            raise ValueError("schedule longer than the answer")
    if len(shapes) != n_tokens:
        raise ValueError(f"schedule covers {len(shapes)} of {n_tokens} tokens")
    check(chunk, shapes)
    return Schedule(chunk, tuple(shapes)), pos
