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


# ---- downtime against the provider ----------------------------------------------------
#
# Reliability (the market's success ratio, `MarketStore.reliability`) counts trials: an
# inference attempt is one; every whole hour a lease ran on the provider is one that went
# well; a lost lease is LOSS_WEIGHT that failed. The stake SLO: within the trailing
# SLO_WINDOW_S a provider may lose 1 lease, plus one per HOURS_PER_LOSS hours it leased
# there; each loss past that allowance costs the lost lease's device-class stake
# PENALTY_HOURS of what the lease paid per hour, to the consumer who lost the workspace.

LOSS_WEIGHT = 5  # failed trials per lost lease: a newcomer's first loss takes 0.95 to 0.76
SLO_WINDOW_S = 30 * 24 * 3600.0
HOURS_PER_LOSS = 100.0  # leased hours per tolerated loss: 99 % of leased hours loss-free
FREE_LOSSES = 1  # a reboot happens: the first loss in a window costs no stake
PENALTY_HOURS = 24.0


def lease_trials(running_s: float, lost: bool) -> tuple[int, int]:
    """(good, total) trials a finished lease adds to its provider's reliability."""
    good = int(running_s // 3600)
    return good, good + (LOSS_WEIGHT if lost else 0)


def allowed_losses(leased_hours: float) -> float:
    """Losses a provider may have within the window without losing stake."""
    return FREE_LOSSES + max(0.0, leased_hours) / HOURS_PER_LOSS


def loss_penalty(losses: int, leased_hours: float, price_per_hour: int, staked: int) -> int:
    """µcr of stake a loss costs: nothing within the allowance (`losses` counts this one),
    else PENALTY_HOURS of the lease's hourly price, never more than is staked."""
    if losses <= allowed_losses(leased_hours):
        return 0
    return max(0, min(staked, round(PENALTY_HOURS * price_per_hour)))
