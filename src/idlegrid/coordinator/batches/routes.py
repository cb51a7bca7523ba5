"""The Batch API, as OpenAI's: `/v1/batches` create, retrieve, list, cancel. Each call is
made with an API key and sees only that key's batches (and files)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from idlegrid.coordinator.batches import schemas as s
from idlegrid.coordinator.deps import services
from idlegrid.coordinator.schemas import errors

router = APIRouter(prefix="/v1", tags=["batches"])


async def _key(request: Request) -> str:
    return await services(request).nodes.authenticate_key(request.headers.get("authorization"))


@router.post("/batches", response_model=s.BatchObject, responses=errors(400, 401, 402, 404))
async def create_batch(body: s.CreateBatch, request: Request) -> dict[str, Any]:
    """Create a batch from an uploaded file: every line checked, the whole batch's worst
    case escrowed (402 if the balance cannot cover it), the lines queued on the grid."""
    key_id = await _key(request)
    return await services(request).batches.create(
        key_id, body.input_file_id, body.endpoint, body.completion_window, body.metadata
    )


@router.get("/batches", response_model=s.BatchList, responses=errors(400, 401))
async def list_batches(
    request: Request, after: str | None = None, limit: int = Query(20)
) -> dict[str, Any]:
    """The caller's batches, newest first (a cursor page: `after`, `limit` 1 to 100)."""
    key_id = await _key(request)
    return await services(request).batches.listing(key_id, after, limit)


@router.get("/batches/{batch_id}", response_model=s.BatchObject, responses=errors(401, 404))
async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
    """One of the caller's batches, its `request_counts` live."""
    key_id = await _key(request)
    return await services(request).batches.retrieve(key_id, batch_id)


@router.post(
    "/batches/{batch_id}/cancel", response_model=s.BatchObject, responses=errors(401, 404, 409)
)
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    """Cancel a batch that is validating or in progress (409 once it is finalizing or
    ended): its running lines stop, the undone ones are refunded."""
    key_id = await _key(request)
    return await services(request).batches.cancel(key_id, batch_id)
