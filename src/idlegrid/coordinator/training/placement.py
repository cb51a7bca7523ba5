"""Training jobs placed by the market: each job that needs providers holds one market order
(kind `training`, naming the job), and only the providers of that order's placement may
claim the job.

The order is the market's to match, re-match on every tick, re-place when its provider is
lost and explain when nothing fits; this module keeps one live order per job in step with
the job: a queued or running job has one (a new one when the job excludes another
provider), a job that needs no provider (trained, ended) has none. Orders are numbered
`<job>:<n>`; the consumer's constraints live in the job's `submitted` event, so a new order
asks for the same as the first. The order costs nothing: the job pays per verified step.

A provider placed but not coming to claim within `claim_timeout_s` (it sells device-hours
but does not train, or cannot post the job stake) is a no-show: excluded from the job without
any fault, like a provider that declines it, so the next order avoids it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select

from idlegrid.coordinator.db.tables import MarketOrder
from idlegrid.coordinator.training.common import TrainingBase
from idlegrid.coordinator.training.tables import TrainEvent, TrainJob
from idlegrid.core.market.orders import TERMINAL, OrderState
from idlegrid.core.training.placement import job_order
from idlegrid.core.training.spec import JobSpec

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

NEEDS_PROVIDERS = ("queued", "running")  # job states that hold a market order
_LIVE_ORDER = [s.value for s in OrderState if s not in TERMINAL]


class JobMarket(Protocol):
    """What training needs of the market (handed in by `compose()`)."""

    def submit(self, key_id: str, raw: Any, internal: bool = False) -> Any:
        """Match and record an order."""
        ...

    def cancel(self, order_id: str, key_id: str | None) -> Any:
        """End an order and free its devices."""
        ...


class NoMarket:
    """A market that never places anything (a Jobs built without one places no job)."""

    def submit(self, key_id: str, raw: Any, internal: bool = False) -> Any:
        """Nothing is recorded."""
        return None

    def cancel(self, order_id: str, key_id: str | None) -> Any:
        """Nothing to end."""
        return None


def orders_of(s: Session, job_id: str) -> list[MarketOrder]:
    """Every order that placed (or tries to place) a job, oldest first."""
    q = select(MarketOrder).where(
        MarketOrder.id.like(f"{job_id}:%"), MarketOrder.kind == "training"
    )
    return sorted(s.scalars(q), key=lambda o: int(o.id.rsplit(":", 1)[1]))


def live_order(s: Session, job_id: str) -> MarketOrder | None:
    """The job's order that is not over, if any."""
    live = [o for o in orders_of(s, job_id) if o.state in _LIVE_ORDER]
    return live[-1] if live else None


def placed_on(order: MarketOrder | None) -> frozenset[str]:
    """Providers an active order placed its job on (none while it waits)."""
    if order is None or order.state != OrderState.ACTIVE.value or not order.placement:
        return frozenset()
    return frozenset(leg["provider"] for leg in order.placement.get("legs", []))


def gang_ranks(order: MarketOrder | None) -> list[str]:
    """The providers of an active order's planned gang in rank order ([] if none)."""
    if order is None or order.state != OrderState.ACTIVE.value or not order.placement:
        return []
    members = (order.placement.get("gang") or {}).get("members", [])
    return [m["provider"] for m in sorted(members, key=lambda m: m["rank"])]


def runs(order: MarketOrder | None) -> str | None:
    """What the placement runs, in words: the layout the verified trainer executes."""
    gang = ((order.placement if order is not None else None) or {}).get("gang")
    if not gang:
        return None
    n = len(gang["members"])
    if gang["layout"] != "data-parallel":  # never placed today (RUNNABLE_STAGES)
        return (
            f"{gang['stages']}-stage pipeline x {gang['data_parallel']}: "
            "not run by the verified trainer"
        )
    return (
        f"data-parallel over {n} providers: rank r trains shard r of each step's batch, "
        "rank 0 commits each segment, whose pay is split equally between the ranks"
    )


def market_view(order: MarketOrder | None) -> dict[str, Any] | None:
    """What the job view shows of its placement: where, or why it waits."""
    if order is None:
        return None
    legs = (order.placement or {}).get("legs", [])
    out: dict[str, Any] = {
        "order_id": order.id,
        "order_state": order.state,
        "waiting": not placed_on(order) and order.state not in {s.value for s in TERMINAL},
        "providers": sorted({leg["provider"] for leg in legs}),
    }
    if legs:
        out["placement"] = order.placement
        if (what := runs(order)) is not None:
            out["runs"] = what
    elif order.reasons:
        out["decisive"] = order.reasons.get("decisive")
        out["reasons"] = order.reasons.get("reasons", [])
    return out


class Placing(TrainingBase):
    """Keeps each job's market order in step with the job."""

    market: JobMarket = NoMarket()
    _gangs: dict[str, Any]  # the gathering gangs (gangs.py), by job
    # One pass at a time (the tick and a request may both run one): two passes would both
    # see a job without an order and place it twice.
    _place_lock = threading.Lock()

    def place_jobs(self, job_ids: list[str] | None = None) -> None:
        """Give every job that needs providers a live order (one that avoids the providers
        it excludes) and end the orders of jobs that need none. Runs outside any training
        transaction: the market writes in its own."""
        with self._place_lock:
            self._place(job_ids)

    def _place(self, job_ids: list[str] | None) -> None:
        self._no_shows()
        submit: list[tuple[str, dict[str, Any], str | None]] = []  # key, order, replaced
        cancel: list[tuple[str, str]] = []
        with self.store.read() as s:
            q = select(TrainJob).where(TrainJob.state.in_(NEEDS_PROVIDERS))
            if job_ids is not None:
                q = select(TrainJob).where(TrainJob.id.in_(job_ids))
            jobs = {j.id: j for j in s.scalars(q)}
            orders = select(MarketOrder).where(
                MarketOrder.kind == "training", MarketOrder.state.in_(_LIVE_ORDER)
            )
            for o in s.scalars(orders):
                job_id = str(o.body.get("job") or "")
                if job_id and job_id not in jobs and (j := s.get(TrainJob, job_id)) is not None:
                    jobs[job_id] = j
            for job in jobs.values():
                mine = orders_of(s, job.id)
                live = [o for o in mine if o.state in _LIVE_ORDER]
                if job.state not in NEEDS_PROVIDERS:
                    cancel += [(o.id, job.key_id) for o in live]
                    continue
                avoid = frozenset(job.excluded)
                current = live[-1] if live else None
                # A new order when the job excludes another provider, or no longer
                # excludes one (a dispute it won).
                if current is not None and avoid == set(current.body.get("avoid", [])):
                    continue
                order = job_order(
                    job.id,
                    len(mine),
                    JobSpec.parse(job.spec),
                    self._resources(s, job.id),
                    self.settings.max_price,
                    avoid,
                )
                submit.append((job.key_id, order.to_dict(), current.id if current else None))
        for order_id, key_id in cancel:
            self._end_order(order_id, key_id)
        for key_id, raw, replaced in submit:
            if replaced is not None:
                self._end_order(replaced, key_id)
            try:
                self.market.submit(key_id, raw, internal=True)
            except Exception:  # the next tick tries again; the job simply waits meanwhile
                log.warning("placing training order %s failed", raw["id"], exc_info=True)
        if submit:
            self.new_work.set()

    def _no_shows(self) -> None:
        """Exclude placed providers that left a queued job unclaimed past the timeout."""
        now = self.ctx.clock()
        late: dict[str, frozenset[str]] = {}
        with self.store.read() as s:
            for job in s.scalars(select(TrainJob).where(TrainJob.state == "queued")):
                order = live_order(s, job.id)
                placed = placed_on(order)
                if order is None or not placed:
                    continue
                # From the placement, or from the job's last holder giving it back.
                since = max(order.started_at or 0.0, job.lease_at)
                if now - since > self.settings.claim_timeout_s:
                    gang = self._gangs.get(job.id)
                    joined = {n for n, _ in gang.members} if gang is not None else set()
                    late[job.id] = placed - joined
        if not late:
            return
        with self.store.tx() as s:
            for job_id, nodes in late.items():
                job = s.get(TrainJob, job_id)
                if job is None or job.state != "queued" or not nodes:
                    continue
                job.excluded = sorted({*job.excluded, *nodes})
                self._event(
                    s,
                    job_id,
                    "no-show",
                    f"placed {self.settings.claim_timeout_s:g} s ago, never claimed",
                    nodes=sorted(nodes),
                )

    def _end_order(self, order_id: str, key_id: str) -> None:
        try:
            self.market.cancel(order_id, key_id)
        except Exception:  # ended meanwhile (cancelled by its consumer, expired)
            log.debug("training order %s already over", order_id, exc_info=True)

    @staticmethod
    def _resources(s: Session, job_id: str) -> Any:
        """The consumer's constraints, as the job was submitted with them."""
        e = s.scalars(
            select(TrainEvent).where(TrainEvent.job_id == job_id, TrainEvent.kind == "submitted")
        ).first()
        return (e.detail.get("resources") if e is not None else None) or {}
