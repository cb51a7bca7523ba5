"""Orders: what a consumer buys, and the enumerated moves of its life. Pure.

    open ──match──▶ matched ──start──▶ active ──complete──▶ completed
     │  ▲              │                  │
     │  └──requeue─────┴──────────────────┘ (provider lost: placed again)
     ├──expire──▶ expired         matched/active ──fail──▶ failed
     └──cancel──▶ cancelled ◀── matched/active

Kinds: `inference` reserves a provider serving a model with an SLO (tokens/s, time to
first token) for some hours; `training` and `lease` reserve N devices for H hours;
`batch` buys a number of output tokens of a model, done when they are.

A `training` order that names a `job` is that training job's placement: it decides which
providers may run the job and costs nothing itself (budget 0, no accrual), because the
job is billed per verified step by the training domain. Only the training domain makes
such orders (`internal` fields are refused from the public order routes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from idlegrid.core.ledger import MICRO, TOKENS_PER_PRICE_UNIT
from idlegrid.core.market.spec import ResourceSpec, parse_spec
from idlegrid.errors import IllegalTransition, InvalidRequest


class OrderKind(StrEnum):
    """What is being bought."""

    INFERENCE = "inference"
    TRAINING = "training"
    BATCH = "batch"
    LEASE = "lease"


class OrderState(StrEnum):
    """Where an order is in its life."""

    OPEN = "open"
    MATCHED = "matched"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    EXPIRED = "expired"


_O, _M, _A = OrderState.OPEN, OrderState.MATCHED, OrderState.ACTIVE
MOVES: dict[str, tuple[frozenset[OrderState], OrderState]] = {
    "match": (frozenset({_O}), _M),
    "start": (frozenset({_M}), _A),
    "complete": (frozenset({_A}), OrderState.COMPLETED),
    "cancel": (frozenset({_O, _M, _A}), OrderState.CANCELLED),
    "fail": (frozenset({_M, _A}), OrderState.FAILED),
    "expire": (frozenset({_O}), OrderState.EXPIRED),
    "requeue": (frozenset({_M, _A}), _O),
}
TERMINAL = frozenset(
    {OrderState.COMPLETED, OrderState.CANCELLED, OrderState.FAILED, OrderState.EXPIRED}
)


def order_transition(state: OrderState, move: str) -> OrderState:
    """The state after `move`, or IllegalTransition naming both ends."""
    rule = MOVES.get(move)
    if rule is None or state not in rule[0]:
        raise IllegalTransition("order", state.value, rule[1].value if rule else move)
    return rule[1]


@dataclass(frozen=True)
class Order:
    """A consumer's order; prices are ceilings in µcr, the escrow is its worst case."""

    id: str
    kind: OrderKind
    spec: ResourceSpec
    model: str | None = None
    hours: float = 0.0  # inference, training, lease
    tokens: int = 0  # batch: output tokens wanted
    work_pflop: float = 0.0  # training: optional work; runtime then follows measured speed
    vram_need_gb: float = 0.0  # per device, filled from the model catalog where known
    max_price: int = 0  # µcr per device-hour, or per 1M output tokens for batch
    job: str | None = None  # the training job this order places (billed per step there)
    avoid: frozenset[str] = frozenset()  # providers excluded from that job
    # A data-parallel job's shape (layers, hidden, seq, batch, params, steps): the book
    # prices its candidate gangs with the planner's cost model over their links.
    gang_shape: tuple[tuple[str, float], ...] = ()
    # A lease whose provider is lost is ordered again elsewhere for its unused hours, its
    # escrow carried over (the leases domain; docs/leases.md).
    restart_on_loss: bool = False

    @property
    def devices(self) -> int:
        """Devices placed together."""
        return self.spec.count

    def budget(self) -> int:
        """µcr escrowed at submission: the most the order can cost at its price ceiling."""
        if self.job is not None:
            return 0  # a job's placement: the job pays per verified step, never the order
        if self.kind is OrderKind.BATCH:
            return math.ceil(self.tokens * self.max_price / TOKENS_PER_PRICE_UNIT)
        return math.ceil(self.max_price * self.devices * self.hours)

    def to_dict(self) -> dict[str, Any]:
        """The order as `parse_order` reads it (prices back in credits)."""
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind.value,
            "resources": self.spec.to_dict(),
        }
        if self.model:
            out["model"] = self.model
        if self.hours:
            out["hours"] = self.hours
        if self.tokens:
            out["tokens"] = self.tokens
        if self.work_pflop:
            out["work_pflop"] = self.work_pflop
        out["resources"]["max_price"] = self.max_price / MICRO
        if self.job is not None:
            out["job"] = self.job
            out["avoid"] = sorted(self.avoid)
        if self.gang_shape:
            out["gang_shape"] = dict(self.gang_shape)
        if self.avoid and self.job is None:
            out["avoid"] = sorted(self.avoid)  # a restarted lease avoids the lost providers
        if self.restart_on_loss:
            out["restart_on_loss"] = True
        return out


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ORDER_FIELDS = {
    "id",
    "kind",
    "resources",
    "model",
    "hours",
    "tokens",
    "work_pflop",
    "restart_on_loss",
}
INTERNAL_FIELDS = {
    "job",
    "avoid",
    "gang_shape",
}  # a training job's placement; set by the coordinator only
MAX_HOURS = 24 * 366
MAX_TOKENS = 10**12


def parse_order(
    raw: Any, order_id: str | None = None, vram_need_gb: float = 0.0, internal: bool = False
) -> Order:
    """An Order from JSON-like data; InvalidRequest naming the bad field. `internal` admits
    the fields only the coordinator sets (a training job's placement)."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest("order: expected an object", param="order")
    unknown = sorted(set(raw) - ORDER_FIELDS - (INTERNAL_FIELDS if internal else set()))
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown field", param=unknown[0])
    oid = raw.get("id", order_id)
    if not isinstance(oid, str) or not _ID.match(oid):
        raise InvalidRequest("id: 1-64 characters of letters, digits and ._:-", param="id")
    try:
        kind = OrderKind(str(raw.get("kind")))
    except ValueError:
        raise InvalidRequest(
            f"kind: one of {', '.join(k.value for k in OrderKind)}", param="kind"
        ) from None
    spec = parse_spec(raw.get("resources"))
    if spec.max_price is None:
        raise InvalidRequest(
            "resources.max_price: an order needs a price ceiling (credits "
            "per device-hour, or per 1M output tokens for batch)",
            param="resources.max_price",
        )
    if kind is not OrderKind.LEASE:
        for name in ("disk_gb", "pip", "egress", "runtime", "image"):
            if name in (raw.get("resources") or {}):
                raise InvalidRequest(
                    f"resources.{name}: only a lease order has a workspace",
                    param=f"resources.{name}",
                )
    model = raw.get("model")
    if kind in (OrderKind.INFERENCE, OrderKind.BATCH):
        if not isinstance(model, str) or not model:
            raise InvalidRequest(f"model: a {kind.value} order names a model", param="model")
    elif model is not None and not isinstance(model, str):
        raise InvalidRequest("model: expected a model id", param="model")
    hours = raw.get("hours", 0)
    tokens = raw.get("tokens", 0)
    work = raw.get("work_pflop", 0)
    for name, value, cap in (
        ("hours", hours, MAX_HOURS),
        ("tokens", tokens, MAX_TOKENS),
        ("work_pflop", work, 1e9),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (0 <= value <= cap)
            or value != value
        ):
            raise InvalidRequest(f"{name}: out of range [0, {cap:g}]", param=name)
    if kind is OrderKind.BATCH:
        if not tokens or tokens != int(tokens):
            raise InvalidRequest(
                "tokens: a batch order buys a whole number of tokens > 0", param="tokens"
            )
    elif not hours:
        raise InvalidRequest(f"hours: a {kind.value} order reserves hours > 0", param="hours")
    if spec.vram_gb is not None and spec.vram_gb.op in (">=", ">", "=="):
        vram_need_gb = max(vram_need_gb, spec.vram_gb.limit)
    job, avoid = raw.get("job"), raw.get("avoid", [])
    if job is not None and (kind is not OrderKind.TRAINING or not isinstance(job, str)):
        raise InvalidRequest("job: only a training order places a job", param="job")
    if not isinstance(avoid, list) or not all(isinstance(a, str) for a in avoid):
        raise InvalidRequest("avoid: a list of provider ids", param="avoid")
    restart = raw.get("restart_on_loss", False)
    if not isinstance(restart, bool) or (restart and kind is not OrderKind.LEASE):
        raise InvalidRequest(
            "restart_on_loss: true or false, and only for a lease", param="restart_on_loss"
        )
    shape = raw.get("gang_shape") or {}
    if not isinstance(shape, Mapping) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in shape.values()
    ):
        raise InvalidRequest("gang_shape: positive numbers by name", param="gang_shape")
    return Order(
        id=oid,
        kind=kind,
        spec=spec,
        model=model,
        hours=float(hours),
        tokens=int(tokens),
        work_pflop=float(work),
        vram_need_gb=vram_need_gb,
        max_price=round(spec.max_price * MICRO),
        job=job,
        avoid=frozenset(avoid),
        gang_shape=tuple(sorted((str(k), float(v)) for k, v in shape.items())),
        restart_on_loss=restart,
    )
