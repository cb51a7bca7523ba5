"""Disputes: narrow a disagreement over committed chunks (or positions) to the first one.

The provider's commitment is a Merkle tree over chunks; the challenger holds its own
recomputation. Each round the referee asks about the middle of the open interval and the
challenger says whether it agrees with the provider there (agreement at i means the
recomputed state at i is within tolerance of the committed one). Because every chunk's
state depends on all earlier ones, agreement is monotone up to the first fault: after
⌈log₂ n⌉ rounds one position is left, and a third party recomputes just that one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Bisection:
    """Search state over positions [0, n): `lo` is known good (or -1), `hi` known bad."""

    n: int
    lo: int = -1
    hi: int = -1
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("nothing to bisect")
        if self.hi < 0:
            self.hi = self.n - 1  # the challenger asserts the last position disagrees

    @property
    def done(self) -> bool:
        """True when `hi` is the first disagreeing position."""
        return self.hi - self.lo <= 1

    def query(self) -> int:
        """The position to ask about next."""
        if self.done:
            raise ValueError("bisection is over")
        return (self.lo + self.hi) // 2

    def answer(self, agree: bool) -> None:
        """Record whether the parties agree at the queried position."""
        mid = self.query()
        self.rounds += 1
        if agree:
            self.lo = mid
        else:
            self.hi = mid

    @property
    def first_bad(self) -> int:
        """The first disagreeing position (only once done)."""
        if not self.done:
            raise ValueError("bisection is not over")
        return self.hi


def max_rounds(n: int) -> int:
    """Rounds a bisection over n positions can take."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def run(n: int, agrees: Callable[[int], bool]) -> tuple[int, int]:
    """Bisect with an answering function; returns (first bad position, rounds used)."""
    b = Bisection(n)
    while not b.done:
        b.answer(agrees(b.query()))
    return b.first_bad, b.rounds


@dataclass(frozen=True)
class Ruling:
    """Who was right at the disputed position."""

    provider_right: bool
    position: int
    detail: str


def settle(position: int, provider_ok: bool, challenger_ok: bool) -> Ruling:
    """The referee recomputed one position: did it match the provider, the challenger, or neither?

    If the referee matches neither, the challenger's fault finding stands (the provider's
    value is still wrong), so the provider loses unless the referee matched it.
    """
    if provider_ok:
        return Ruling(True, position, "referee matches the provider: the audit was wrong")
    detail = "referee matches the verifier" if challenger_ok else "referee matches neither"
    return Ruling(False, position, detail)
