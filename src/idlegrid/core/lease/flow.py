"""Credit-based flow control for streams relayed between a workspace and a consumer. Pure.

A sender may have at most `limit` bytes in flight (sent, not yet credited back); the
receiver credits bytes once it has passed them on. So every hop holds a bounded amount,
and a slow consumer slows the workload (its pipe fills) instead of growing a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

WINDOW = 1024 * 1024  # bytes in flight per stream: a few frames, a few ms on loopback


class CreditExceeded(ValueError):
    """A peer sent more than it was credited (a bug or a hostile peer: drop the stream)."""


@dataclass(frozen=True)
class Window:
    """Bytes in flight on one direction of one stream, against a fixed limit."""

    limit: int = WINDOW
    in_flight: int = 0

    def __post_init__(self) -> None:
        if self.limit <= 0 or not 0 <= self.in_flight <= self.limit:
            raise CreditExceeded(f"{self.in_flight} bytes in flight past a {self.limit} window")

    @property
    def room(self) -> int:
        """How many more bytes may be sent now."""
        return self.limit - self.in_flight

    def sent(self, n: int) -> Window:
        """After sending `n` bytes (CreditExceeded if there was no room for them)."""
        if n < 0 or n > self.room:
            raise CreditExceeded(f"sent {n} bytes with room for {self.room}")
        return replace(self, in_flight=self.in_flight + n)

    def credited(self, n: int) -> Window:
        """After the receiver passed `n` bytes on (never below zero in flight)."""
        if n < 0:
            raise CreditExceeded(f"a negative credit ({n})")
        return replace(self, in_flight=max(0, self.in_flight - n))


def chunks_within(data: bytes, room: int, size: int) -> tuple[bytes, bytes]:
    """The part of `data` that fits `room` (at most `size`), and what must wait."""
    take = max(0, min(len(data), room, size))
    return data[:take], data[take:]


@dataclass(frozen=True)
class Owed:
    """Bytes a receiver passed on but has not credited back yet, credited in batches of
    `batch` so that a stream of small frames does not answer each with a frame.

    No stall follows from holding credit back while `batch` is at most half the window: a
    sender out of room has a full window in flight, so more than half of it is still queued
    at the receiver, which passes it on and so reaches the batch."""

    batch: int
    owed: int = 0

    def __post_init__(self) -> None:
        if self.batch <= 0 or self.owed < 0:
            raise CreditExceeded(f"a batch of {self.batch} with {self.owed} owed")

    def passed(self, n: int) -> tuple[Owed, int]:
        """After passing `n` more bytes on: the new state and the credit to send now (0:
        none yet)."""
        if n < 0:
            raise CreditExceeded(f"passed a negative count ({n})")
        total = self.owed + n
        if total >= self.batch:
            return replace(self, owed=0), total
        return replace(self, owed=total), 0


def credit_batch(window: int) -> int:
    """How much a receiver passes on before crediting it back: a quarter of the window."""
    return max(1, window // 4)
