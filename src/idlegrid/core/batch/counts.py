"""A batch's `request_counts` (OpenAI's `{total, completed, failed}`), kept as lines end.

Pure. `completed` counts lines answered (their answer is in the output file), `failed`
lines that ended in the error file, whatever the reason: refused by the gateway, failed
on every provider, or left unfinished when the batch expired or was cancelled (`close`).
Counting a line twice, or past the total, is a bug in the caller and raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RequestCounts:
    """How many lines a batch holds, and how many have ended each way."""

    total: int
    completed: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        if min(self.total, self.completed, self.failed) < 0:
            raise ValueError(f"negative request counts: {self}")
        if self.completed + self.failed > self.total:
            raise ValueError(f"more lines ended than the batch holds: {self}")

    @property
    def remaining(self) -> int:
        """Lines that have not ended yet."""
        return self.total - self.completed - self.failed

    @property
    def done(self) -> bool:
        """Whether every line has ended (the batch may finalize)."""
        return self.remaining == 0

    def record(self, ok: bool, n: int = 1) -> RequestCounts:
        """The counts after `n` more lines ended, answered (`ok`) or in the error file."""
        if n < 0 or n > self.remaining:
            raise ValueError(f"{n} more lines cannot end: {self.remaining} remain of {self}")
        if ok:
            return replace(self, completed=self.completed + n)
        return replace(self, failed=self.failed + n)

    def close(self) -> RequestCounts:
        """The counts once the batch expired or was cancelled: every unfinished line
        failed (each goes to the error file, and is refunded)."""
        return self.record(False, self.remaining)

    def as_dict(self) -> dict[str, int]:
        """OpenAI's `request_counts` object."""
        return {"total": self.total, "completed": self.completed, "failed": self.failed}
