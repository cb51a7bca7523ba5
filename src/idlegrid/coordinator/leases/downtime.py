"""What a lost lease costs its provider: stake past the SLO, in the lost move's transaction;
and what it leaves: a wipe the provider confirms when it comes back and sweeps.

The rule is pure (`core/lease/loss.py`: one loss forgiven per window, plus one per 100
leased hours; past that, 24 hours of the lease's price from the device class's stake, to
the consumer who lost the workspace). This reads what the rule needs: the provider's
losses and leased hours within the window, the lease's price and class, the stake.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from idlegrid.coordinator.db.store import Store
from idlegrid.coordinator.db.tables import Account, MarketOrder
from idlegrid.coordinator.leases.tables import Lease, LeaseTransition
from idlegrid.core.lease.lifecycle import LeaseCause, LeaseState
from idlegrid.core.lease.loss import SLO_WINDOW_S, loss_penalty
from idlegrid.core.ledger import consumer_account, stake_account
from idlegrid.core.market import settlement


def penalise(store: Store, s: Session, lease: Lease, now: float) -> int:
    """Slash the lost `lease`'s provider if this loss is past its SLO; the µcr taken."""
    order = s.get(MarketOrder, lease.id)
    legs = ((order.placement or {}) if order is not None else {}).get("legs") or []
    if not legs:
        return 0
    leg = legs[0]
    device_class = str(leg["offer_id"]).split("/", 1)[-1]
    since = now - SLO_WINDOW_S
    on_node = select(Lease.id).where(Lease.node_id == lease.node_id)
    losses = s.scalar(
        select(func.count(func.distinct(LeaseTransition.lease_id))).where(
            LeaseTransition.cause == LeaseCause.PROVIDER_LOST.value,
            LeaseTransition.at >= since,
            LeaseTransition.lease_id.in_(on_node),
        )
    )
    leased_s = s.scalar(
        select(func.sum(Lease.billed_s)).where(
            Lease.node_id == lease.node_id, Lease.updated_at >= since
        )
    )
    account = stake_account(lease.node_id, device_class)
    staked = s.scalar(select(Account.balance).where(Account.id == account)) or 0
    amount = loss_penalty(
        int(losses or 0),
        int(leased_s or 0) / 3600,
        int(leg["unit_price"]) * int(leg["devices"]),
        int(staked),
    )
    if amount <= 0:
        return 0
    ref = f"lease-loss:{lease.id}"
    entry = settlement.slash(
        ref, lease.node_id, device_class, amount, {consumer_account(lease.key_id): amount}
    )
    return amount if store._post(s, entry) else 0


UNCONFIRMED = "the wipe is unconfirmed until that provider comes back and sweeps it"
CONFIRMED = "the provider came back and confirmed the wipe (its start-up sweep)"


def confirm_wipes(s: Session, node_id: str, swept: list[str]) -> list[str]:
    """Record the wipes a returning provider's sweep reports, of its failed leases only
    (another node's lease, or one not failed, is not its to confirm); the ids recorded."""
    done = []
    for lease_id in swept:
        row = s.get(Lease, lease_id)
        if row is None or row.node_id != node_id or row.state != LeaseState.FAILED.value:
            continue
        message = row.message or ""
        if CONFIRMED in message:
            continue  # reported again by a later registration
        if UNCONFIRMED in message:
            row.message = message.replace(UNCONFIRMED, CONFIRMED)
        else:
            row.message = f"{message} {CONFIRMED[0].upper()}{CONFIRMED[1:]}.".strip()[:4000]
        done.append(lease_id)
    return done
