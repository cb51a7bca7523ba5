"""Grid status, balances, the ledger, and operator actions (keys, credits)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from idlegrid.coordinator.deps import (
    is_operator,
    require_operator,
    services,
)
from idlegrid.coordinator.nodes import schemas as s
from idlegrid.coordinator.schemas import errors
from idlegrid.core import income, ledger
from idlegrid.errors import InvalidRequest

router = APIRouter(prefix="/api/v1", tags=["grid"])


class NewKey(BaseModel):
    """Body of POST /admin/keys."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("consumer", min_length=1, max_length=128)
    spend_cap: int | None = Field(None, ge=0, description="most µcr the key may ever spend")
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + most output) per minute")


class Mint(BaseModel):
    """Body of POST /admin/mint: credit an API key's account, or a provider's."""

    key_id: str | None = Field(None, min_length=1, max_length=64)
    node_id: str | None = Field(None, min_length=1, max_length=64)
    amount: int = Field(gt=0, description="µcr")
    reference: str = Field(min_length=1, max_length=100, description="idempotency reference")


@router.post("/admin/keys", response_model=s.NewKeyCreated, responses=errors(400, 401))
async def create_key(body: NewKey, request: Request) -> dict[str, str]:
    """Create a consumer API key; the secret is returned once."""
    require_operator(request)
    svc = services(request)
    key_id, secret = await svc.db(
        svc.store.create_api_key, body.name, body.spend_cap, body.rpm, body.tpm
    )
    return {"key_id": key_id, "api_key": secret}


@router.get("/admin/keys", response_model=s.KeyList, responses=errors(401))
async def list_keys(request: Request) -> dict[str, Any]:
    """Every consumer key with its balance, what it has spent, its limits and state."""
    require_operator(request)
    svc = services(request)
    return {"keys": await svc.db(svc.store.api_keys)}


class KeyLimitsBody(BaseModel):
    """Body of POST /admin/keys/{id}/limits: each field given replaces that limit; null
    lifts it; a field left out is kept."""

    model_config = ConfigDict(extra="forbid")

    spend_cap: int | None = Field(None, ge=0, description="most µcr the key may ever spend")
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + most output) per minute")


@router.post(
    "/admin/keys/{key_id}/limits", response_model=s.KeyInfo, responses=errors(400, 401, 404)
)
async def set_key_limits(key_id: str, body: KeyLimitsBody, request: Request) -> dict[str, Any]:
    """Change a key's spend cap or rate limits (seen by every coordinator within 30 s)."""
    require_operator(request)
    svc = services(request)
    await svc.db(svc.store.set_key_limits, key_id, body.model_dump(exclude_unset=True))
    svc.nodes.forget_limits(key_id)
    return next(k for k in await svc.db(svc.store.api_keys) if k["key_id"] == key_id)


@router.post("/admin/keys/{key_id}/revoke", response_model=s.KeyRevoked, responses=errors(401, 404))
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    """Revoke a consumer API key: refused from now on (its balance stays in the ledger)."""
    require_operator(request)
    changed = await services(request).nodes.revoke_key(key_id)
    return {"key_id": key_id, "revoked": True, "changed": changed}


@router.post("/admin/mint", response_model=s.Minted, responses=errors(400, 401))
async def mint(body: Mint, request: Request) -> dict[str, Any]:
    """Credit a key with new µcr; replaying the same reference credits once."""
    require_operator(request)
    svc = services(request)
    if (body.key_id is None) == (body.node_id is None):
        raise InvalidRequest("name exactly one of key_id and node_id", param="key_id")
    account = (
        ledger.consumer_account(body.key_id)
        if body.key_id
        else ledger.provider_account(body.node_id or "")
    )
    entry = ledger.mint(
        f"mint:{body.reference}", account, body.amount, ledger.Cause("deposit", body.reference)
    )
    created = await svc.db(svc.store.post, entry)
    svc.changes.bump()
    return {
        "created": created,
        "account": account,
        "balance": await svc.db(svc.store.balance, account),
    }


@router.get("/balance", response_model=s.Balance, responses=errors(401))
async def balance(request: Request) -> dict[str, Any]:
    """The calling key's balance, µcr."""
    svc = services(request)
    key_id = await svc.nodes.authenticate_key(request.headers.get("authorization"))
    account = ledger.consumer_account(key_id)
    return {
        "key_id": key_id,
        "account": account,
        "balance": await svc.db(svc.store.balance, account),
    }


@router.get("/status", response_model=s.GridStatus, response_model_exclude_unset=True)
async def status(request: Request) -> dict[str, Any]:
    """Nodes with their hardware, measured speed and earnings, and task counts; with the
    operator key also every account's balance (consumers' balances are nobody else's)."""
    svc = services(request)
    now = svc.clock()
    nodes = await svc.db(svc.store.nodes)
    balances = await svc.db(svc.store.balances)
    running = await svc.db(svc.store.running_by_node)
    worked = income.totals(balances, await svc.db(svc.store.deposits))
    view = {
        "nodes": [
            {
                "id": n.id,
                "name": n.name,
                "state": n.state,
                "live": n.present_since(now - svc.settings.node_timeout_s),
                "last_seen_s_ago": round(now - n.last_seen, 3),
                "slots": n.slots,
                "running": running.get(n.id, 0),
                "prefill_tps": n.prefill_tps,
                "decode_tps": n.decode_tps,
                "hardware": n.hardware,
                "engine": n.engine,
                "offers": {
                    mid: {"prompt_price": p.prompt, "output_price": p.output}
                    for mid, p in n.offers.items()
                },
                # Earnings accrue first (forfeitable while audits are open), then are paid out.
                # Income for work only: the provider account also holds faucet credits.
                "accrued": balances.get(ledger.accrual_account(n.id), 0),
                "paid": worked[n.id].paid if n.id in worked else 0,
                "earned": worked[n.id].earned if n.id in worked else 0,
            }
            for n in nodes
        ],
        "fee_bps": svc.settings.fee_bps,
        "inference_stake": svc.settings.inference_stake,
        "fees": balances.get(ledger.FEES, 0),
        "tasks": await svc.db(svc.store.task_counts),
        "trust": await svc.trust.status(),
    }
    if is_operator(request):
        view["balances"] = balances
    return view


@router.get("/ledger", response_model=s.LedgerEntries, responses=errors(401))
async def ledger_entries(request: Request, cause: str | None = None) -> dict[str, Any]:
    """Ledger entries, oldest first, optionally for one cause (request id, deposit ref)."""
    require_operator(request)
    svc = services(request)
    return {"entries": await svc.db(svc.store.entries, cause)}


@router.get("/ledger/verify", response_model=s.LedgerCheck, responses=errors(401))
async def ledger_verify(request: Request) -> dict[str, Any]:
    """Recompute the hash chain and balances; list any break."""
    require_operator(request)
    svc = services(request)
    problems = await svc.db(svc.store.verify_ledger)
    return {"ok": not problems, "problems": problems}
