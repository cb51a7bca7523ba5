"""Per-key limits on consumer requests: requests and tokens per minute, and a spend cap.

Counting is the `limits` library's moving window (docs/decisions.md): one window per key
and kind, in the storage `rate_limit_storage` names (memory per process by default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute, storage, strategies

from idlegrid.errors import RateLimited


@dataclass(frozen=True)
class KeyLimits:
    """What an operator allowed one key; None means no limit."""

    spend_cap: int | None = None  # µcr ever spent
    rpm: int | None = None
    tpm: int | None = None


class KeyLimiter:
    """Admits a key's request or raises RateLimited with when to retry."""

    def __init__(self, storage_url: str) -> None:
        self.limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_url))

    def admit(self, key_id: str, limits: KeyLimits, tokens: int) -> None:
        """Count one request of `tokens` (prompt bound + most output) against the key."""
        checks = []
        if limits.rpm:
            checks.append(("requests", RateLimitItemPerMinute(limits.rpm), 1))
        if limits.tpm:
            # A request larger than the whole budget still passes alone in an empty window.
            checks.append(("tokens", RateLimitItemPerMinute(limits.tpm), min(tokens, limits.tpm)))
        # Test every window before hitting any: a refused request must not use up the other.
        for kind, item, cost in checks:
            if not self.limiter.test(item, key_id, kind, cost=cost):
                self._refuse(key_id, kind, item)
        for kind, item, cost in checks:
            if not self.limiter.hit(item, key_id, kind, cost=cost):
                self._refuse(key_id, kind, item)

    def _refuse(self, key_id: str, kind: str, item: RateLimitItemPerMinute) -> None:
        reset, _ = self.limiter.get_window_stats(item, key_id, kind)
        wait = max(reset - time.time(), 0.0)
        raise RateLimited(
            f"API key {key_id} is over its limit of {item.amount} {kind} per minute; "
            f"retry in {wait:.0f} s",
            limit=f"{kind}_per_minute",
            retry_after_s=wait,
        )
