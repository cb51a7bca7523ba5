"""What a lost lease costs and what it leaves: the restart of its unused hours. Pure.

A lease is lost when its provider stops heartbeating (killed, unplugged, offline) while
the lease is provisioning or running. The lease fails, billed up to the provider's last
heartbeat (the last moment its workspace was known to run); the files are gone. With
`restart_on_loss` the hours not yet billed are ordered again, on another provider, with
the escrow that was held for them.
"""

from __future__ import annotations

MAX_RESTARTS = 5  # a chain of lost leases stops here: something is wrong beyond bad luck
MIN_RESTART_S = 1.0  # less than this left is not worth a new workspace


def hours_to_restart(hours: float, billed_s: int, restarts: int) -> float | None:
    """The hours a lost lease's restart buys (those paid for and not billed), or None when
    it is not restarted (too little left, or `restarts` already made in its chain)."""
    left = hours - billed_s / 3600
    if restarts >= MAX_RESTARTS or left * 3600 < MIN_RESTART_S:
        return None
    return left
