"""Market API: consumers order and inspect, providers stake and report, operators pay out.

Consumers authenticate with their API key (the same Bearer key as /v1); providers sign like
every node request; payouts are operator routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from idlegrid.coordinator.deps import (
    parse,
    require_operator,
    services,
    signed,
)
from idlegrid.coordinator.market import schemas as s
from idlegrid.coordinator.schemas import errors
from idlegrid.core import ledger
from idlegrid.core.lease.controls import AMOUNTS
from idlegrid.errors import Gone, InvalidRequest
from idlegrid.protocol import messages as m

router = APIRouter(prefix="/api/v1", tags=["market"])


async def _key(request: Request) -> str:
    return await services(request).nodes.authenticate_key(request.headers.get("authorization"))


ORDER_EXAMPLE = {
    "id": "train-42",
    "kind": "lease",
    "hours": 2,
    "resources": {
        "accelerators": ["RTX-4090", "A100-80GB"],
        "vram_gb": ">=16",
        "count": 1,
        "region": {"not_in": ["ap-south"]},
        "reliability": ">=0.95",
        "max_price": 0.8,
    },
}


@router.post(
    "/orders",
    status_code=201,
    response_class=JSONResponse,
    response_model=s.Order,
    responses=errors(400, 401, 402, 409),
)
async def submit_order(
    request: Request, body: Any = Body(..., examples=[ORDER_EXAMPLE])
) -> JSONResponse:
    """Submit an order: matched at once if the book allows, else open (prepaid) with reasons.

    400 for a malformed spec (the error names the field), 402 when the budget exceeds the
    balance, 409 for an order id that was used before. Nothing is posted on any error.
    A `lease` order may ask `"restart_on_loss": true`: if its provider is lost, the hours
    not yet billed are ordered again on another provider, the escrow carried over (the
    lost lease's `restarted_as` names the new one; docs/leases.md).
    """
    key_id = await _key(request)
    svc = services(request)
    view = await svc.db(svc.market.submit, key_id, body)
    # Plain JSON types already: skip FastAPI's generic encoder on the hot path.
    return JSONResponse(view.to_dict(), status_code=201)


@router.post(
    "/orders/batch",
    status_code=201,
    response_model=s.OrderList,
    responses=errors(400, 401, 402, 409),
)
async def submit_orders(request: Request, body: Any = Body(...)) -> dict[str, Any]:
    """Submit up to 1,000 orders cleared together as one exact assignment (better total
    price than one at a time); all are recorded and prepaid, or none (400/402/409)."""
    key_id = await _key(request)
    svc = services(request)
    orders = body.get("orders") if isinstance(body, dict) else None
    views = await svc.db(svc.market.submit_many, key_id, orders)
    return {"orders": [v.to_dict() for v in views]}


@router.get("/orders", response_model=s.OrderList, responses=errors(401))
async def list_orders(request: Request, state: str | None = None) -> dict[str, Any]:
    """The caller's orders, newest first."""
    key_id = await _key(request)
    svc = services(request)
    views = await svc.db(svc.market.store.orders, key_id, [state] if state else None)
    return {"orders": [v.to_dict() for v in views]}


@router.get("/orders/{order_id}", response_model=s.Order, responses=errors(401, 404))
async def get_order(order_id: str, request: Request) -> dict[str, Any]:
    """One of the caller's orders."""
    key_id = await _key(request)
    svc = services(request)
    return (await svc.db(svc.market.store.get_order, order_id, key_id)).to_dict()


@router.get(
    "/orders/{order_id}/explain",
    response_model=s.Explanation,
    response_model_exclude_unset=True,
    responses=errors(401, 404),
)
async def explain_order(order_id: str, request: Request) -> dict[str, Any]:
    """Why the order matched where it did, or which constraints eliminated how many offers."""
    key_id = await _key(request)
    svc = services(request)
    return await svc.db(svc.market.explain, order_id, key_id)


@router.post("/orders/{order_id}/cancel", response_model=s.Order, responses=errors(401, 404, 409))
async def cancel_order(order_id: str, request: Request) -> dict[str, Any]:
    """Cancel: pay for service so far, refund the rest of the escrow (409 if already over)."""
    key_id = await _key(request)
    svc = services(request)
    return (await svc.db(svc.market.cancel, order_id, key_id)).to_dict()


@router.get("/offers", response_model=s.Book, responses=errors(400, 401))
async def list_offers(
    request: Request,
    accelerator: str | None = None,
    region: str | None = None,
    model: str | None = None,
    limit: int = 200,
) -> dict[str, Any]:
    """The live book: device offers with price, free devices, region, reliability, stake."""
    await _key(request)
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("limit: between 1 and 10000", param="limit")
    svc = services(request)
    book = await svc.db(svc.market.current_book)
    out = []
    for i, o in enumerate(book.offers):
        if accelerator and o.device.model != accelerator:
            continue
        if region and o.hardware.region != region:
            continue
        if model and model not in o.model_prices:
            continue
        out.append(
            {
                "id": o.id,
                "provider": o.provider,
                "device": o.device.model,
                "count": o.device.count,
                "free": int(book.free[i]),
                "vram_gb": o.device.vram_gb,
                "region": o.hardware.region,
                "price_per_device_hour": o.device_hour,
                "plugin": o.plugin,
                "staked": o.staked,
                "reliability": o.hardware.reliability,
                "verified": o.hardware.verified,
                "models": {
                    mid: {"prompt_price": p.prompt, "output_price": p.output}
                    for mid, p in o.model_prices.items()
                },
                "tokens_per_s": dict(o.hardware.tokens_per_s),
                "lease": {
                    **{k: v for k, v in o.lease.to_dict().items() if k != "devices"},
                    "leases": o.lease.leases(o.device.model),
                    "leased": dict(zip(AMOUNTS, book.leased[i].tolist(), strict=True)),
                },
            }
        )
        if len(out) >= limit:
            break
    return {"offers": out, "total": len(book)}


# ---- providers (signed) ----------------------------------------------------------------


async def _stake_move(request: Request, move: str) -> dict[str, Any]:
    node_id, body = await signed(request)
    msg = parse(m.StakeMsg, body)
    svc = services(request)
    fn = svc.market.store.stake if move == "stake" else svc.market.store.unstake
    posted = await svc.db(fn, f"{node_id}:{msg.ref}", node_id, msg.device_class, msg.amount)
    svc.market.invalidate()
    return {"ok": True, "posted": posted}


@router.post("/nodes/stake", response_model=s.StakeMoved, responses=errors(400, 401, 402))
async def stake(request: Request) -> dict[str, Any]:
    """Lock provider credits as stake for a device class (idempotent on `ref`)."""
    return await _stake_move(request, "stake")


@router.post("/nodes/unstake", response_model=s.StakeMoved, responses=errors(400, 401, 402, 409))
async def unstake(request: Request) -> dict[str, Any]:
    """Release stake (409 while an active order relies on the node)."""
    return await _stake_move(request, "unstake")


@router.post("/nodes/account", response_model=s.NodeAccount, responses=errors(401))
async def node_account(request: Request) -> dict[str, Any]:
    """A provider's money: accrued (not yet paid out), paid, and stakes per device class."""
    node_id, _ = await signed(request)
    svc = services(request)
    balances = await svc.db(svc.store.balances)
    prefix = f"stake:{node_id}:"
    return {
        "node_id": node_id,
        "accrued": balances.get(ledger.accrual_account(node_id), 0),
        "paid": balances.get(ledger.provider_account(node_id), 0),
        "stakes": {a[len(prefix) :]: v for a, v in balances.items() if a.startswith(prefix)},
    }


@router.post("/nodes/orders", response_model=s.OrderList, responses=errors(401))
async def node_orders(request: Request) -> dict[str, Any]:
    """Active orders holding this node's devices."""
    node_id, _ = await signed(request)
    svc = services(request)
    views = await svc.db(svc.market.orders_for_node, node_id)
    return {"orders": [v.to_dict() for v in views]}


@router.post("/nodes/orders/{order_id}/tokens", response_model=s.Order, responses=errors(401, 410))
async def node_tokens(order_id: str, request: Request) -> dict[str, Any]:
    """Gone: batch work is no longer paid for tokens a provider reports itself. Batches
    run as ordinary, audited grid work through `/v1/batches` (docs/batch.md)."""
    await signed(request)
    raise Gone(
        "self-reported batch tokens are no longer paid: batches run as audited grid work "
        "through /v1/batches (docs/batch.md)",
        use="/v1/batches",
    )


# ---- operators -------------------------------------------------------------------------


@router.post("/admin/payouts", response_model=s.Payouts, responses=errors(401))
async def payouts(request: Request) -> dict[str, Any]:
    """Run a payout batch now (normally every payout_interval_s)."""
    require_operator(request)
    svc = services(request)
    paid = await svc.db(svc.market.payout)
    return {"paid": paid, "total": sum(paid.values())}
