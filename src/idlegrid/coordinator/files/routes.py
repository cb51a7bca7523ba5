"""The Files API, as OpenAI's: `/v1/files` upload (multipart), list, retrieve, content,
delete. Each call is made with an API key and sees only that key's files."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from idlegrid.coordinator.deps import services
from idlegrid.coordinator.files import schemas as s
from idlegrid.coordinator.files.upload import read_upload
from idlegrid.coordinator.schemas import errors
from idlegrid.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["files"])

# The multipart fields OpenAI's upload takes that this grid does not honour (yet): refused
# by name rather than ignored.
UNHONOURED = ("expires_after",)


async def _key(request: Request) -> str:
    return await services(request).nodes.authenticate_key(request.headers.get("authorization"))


@router.post(
    "/files",
    response_model=s.FileObject,
    responses=errors(400, 401),
    openapi_extra=s.UPLOAD_BODY,
)
async def upload_file(request: Request) -> dict[str, Any]:
    """Upload a file (multipart `file` and `purpose`); batch input is checked as JSONL."""
    key_id = await _key(request)
    svc = services(request)
    upload = await read_upload(request, svc.settings.files_max_bytes)
    try:
        fields = upload.fields
        for name in fields:
            if name != "purpose":
                known = next((u for u in UNHONOURED if name.startswith(u)), None)
                raise InvalidRequest(
                    f"{known or name}: not supported by this grid", param=known or name
                )
        if "purpose" not in fields:
            raise InvalidRequest("purpose: required", param="purpose")
        if upload.filename is None:
            raise InvalidRequest(
                "file: required (a part named 'file' with a file name)", param="file"
            )
        return await svc.files.create(key_id, upload.filename, fields["purpose"], upload.spool)
    finally:
        upload.close()


@router.get("/files", response_model=s.FileList, responses=errors(400, 401))
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10_000),
    after: str | None = None,
    order: str = "desc",
) -> dict[str, Any]:
    """The caller's files, a cursor page (`after`, `limit`, `order` by creation)."""
    key_id = await _key(request)
    return await services(request).files.listing(
        key_id, purpose=purpose, limit=limit, after=after, order=order
    )


@router.get("/files/{file_id}", response_model=s.FileObject, responses=errors(401, 404))
async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    """One of the caller's files."""
    key_id = await _key(request)
    return await services(request).files.retrieve(key_id, file_id)


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={**s.CONTENT_RESPONSES, **errors(401, 404)},
)
async def file_content(file_id: str, request: Request) -> StreamingResponse:
    """The bytes of one of the caller's files, streamed from the file store."""
    key_id = await _key(request)
    chunks = await services(request).files.stream(key_id, file_id)
    # A plain iterator: Starlette reads it in a worker thread, chunk by chunk.
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=s.FileDeleted, responses=errors(401, 404))
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    """Delete one of the caller's files (its record, then its content)."""
    key_id = await _key(request)
    return await services(request).files.delete(key_id, file_id)
