"""The Files API's service: files owned by API keys, metadata in the database, content in
a `FileStore` (storage.py).

Order of writes (the invariant: a listed file always has its content):
- create: the content is checked (`core/files.JsonlScan`), then stored whole, and only
  then is the row inserted; if the insert fails the content is removed. A crash between
  the two leaves content that no row names: never listed, never served.
- delete: the row goes first (the file is gone for every caller at once), the content
  after; a crash between leaves, again, only unnamed content.

A file is its uploader's: every read takes the caller's key id, and another key's file is
"no such file" (404), never "forbidden", so ids cannot be probed. The operator key is not
an API key and reads no one's files here (docs/files.md).

Blocking methods (`save`, ...) run in a worker thread; the async ones are for routes.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from sqlalchemy import and_, delete, insert, or_, select

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.db.tables import table
from idlegrid.coordinator.files.storage import FileStore
from idlegrid.coordinator.files.tables import StoredFile
from idlegrid.core.files import JsonlScan, Limits, Purpose, check_purpose, refused
from idlegrid.errors import InvalidRequest, NotFound

log = logging.getLogger("idlegrid.files")
FILES = table(StoredFile)
MAX_FILENAME = 255
MAX_LIST = 10_000  # OpenAI's bound (and default) for `limit`


def _view(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": int(row["created_at"]),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
        "expires_at": None,
        "status_details": None,
    }


def _missing(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="file_id")


class Files:
    """Upload, list, read and delete the files of API keys."""

    def __init__(self, ctx: Context, content: FileStore) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.content = content
        s = ctx.settings
        self.limits = Limits(s.files_max_bytes, s.files_max_lines, s.files_max_line_bytes)

    # ---- blocking ------------------------------------------------------------------------

    def save(
        self, key_id: str, filename: str, purpose: str, src: BinaryIO, *, system: bool = False
    ) -> dict[str, Any]:
        """Check, store and record one file; its File object. `system`: written by the grid
        (a batch's output), so any purpose of ours and no upload limits."""
        purpose = Purpose(purpose).value if system else check_purpose(purpose)
        if not filename or len(filename) > MAX_FILENAME or "\x00" in filename:
            raise refused(f"file: the file name must be 1 to {MAX_FILENAME} characters")
        start = src.tell()
        size, lines = self._scan(src, system)
        src.seek(start)
        file_id = "file-" + secrets.token_hex(12)
        self.content.put(file_id, src)
        row = {
            "id": file_id,
            "key_id": key_id,
            "purpose": purpose,
            "filename": filename,
            "bytes": size,
            "lines": lines,
            "status": "processed",
            "created_at": self.ctx.clock(),
        }
        try:
            with self.store.tx() as s:
                s.execute(insert(FILES).values(**row))
        except BaseException:
            self._remove_content(file_id)
            raise
        return _view(row)

    def _scan(self, src: BinaryIO, system: bool) -> tuple[int, int]:
        if system:  # the grid's own output: counted, not judged
            size = lines = 0
            while chunk := src.read(1 << 20):
                size += len(chunk)
                lines += chunk.count(b"\n")
            return size, lines
        scan = JsonlScan(self.limits)
        while chunk := src.read(1 << 20):
            scan.feed(chunk)
        return scan.size, scan.end()

    def _row(self, key_id: str, file_id: str) -> Any:
        with self.store.read() as s:
            row = s.execute(
                select(FILES).where(FILES.c.id == file_id, FILES.c.key_id == key_id)
            ).first()
        if row is None:
            raise _missing(file_id)
        return row

    def get(self, key_id: str, file_id: str) -> dict[str, Any]:
        """The caller's file, or 404."""
        return _view(self._row(key_id, file_id)._mapping)

    def page(
        self,
        key_id: str,
        *,
        purpose: str | None = None,
        limit: int = MAX_LIST,
        after: str | None = None,
        order: str = "desc",
    ) -> dict[str, Any]:
        """One page of the caller's files, newest first by default (OpenAI's cursor list)."""
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequest(f"limit: must be 1 to {MAX_LIST}", param="limit")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order: must be 'asc' or 'desc'", param="order")
        q = select(FILES).where(FILES.c.key_id == key_id)
        if purpose is not None:
            q = q.where(FILES.c.purpose == purpose)
        with self.store.read() as s:
            if after is not None:
                cursor = s.execute(
                    select(FILES.c.created_at, FILES.c.id).where(
                        FILES.c.id == after, FILES.c.key_id == key_id
                    )
                ).first()
                if cursor is None:
                    raise InvalidRequest(f"after: no such file: {after}", param="after")
                t, i = cursor
                # (created_at, id) is the order, so ties of the clock page without gaps.
                if order == "asc":
                    q = q.where(
                        or_(FILES.c.created_at > t, and_(FILES.c.created_at == t, FILES.c.id > i))
                    )
                else:
                    q = q.where(
                        or_(FILES.c.created_at < t, and_(FILES.c.created_at == t, FILES.c.id < i))
                    )
            cols = (FILES.c.created_at, FILES.c.id)
            q = q.order_by(*(c.asc() if order == "asc" else c.desc() for c in cols))
            rows = s.execute(q.limit(limit + 1)).all()
        data = [_view(r._mapping) for r in rows[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }

    def open(self, key_id: str, file_id: str) -> Iterator[bytes]:
        """The caller's file's content, chunk by chunk; its first chunk is already read, so
        a missing content fails here, before any response starts."""
        self._row(key_id, file_id)
        chunks = self.content.chunks(file_id)
        try:
            first = next(chunks, b"")
        except FileNotFoundError:
            log.error("file %s is listed but its content is missing", file_id)
            raise _missing(file_id) from None

        def rest() -> Iterator[bytes]:
            yield first
            yield from chunks

        return rest()

    def remove(self, key_id: str, file_id: str) -> dict[str, Any]:
        """Delete the caller's file: its row, then its content."""
        with self.store.tx() as s:
            res = s.execute(delete(FILES).where(FILES.c.id == file_id, FILES.c.key_id == key_id))
            gone = res.rowcount  # type: ignore[attr-defined]
        if not gone:
            raise _missing(file_id)
        self._remove_content(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def _remove_content(self, file_id: str) -> None:
        try:
            self.content.delete(file_id)
        except Exception:  # the row is what lists a file: unnamed content harms nobody
            log.warning("could not remove the content of file %s", file_id, exc_info=True)

    # ---- for routes ----------------------------------------------------------------------

    async def create(
        self, key_id: str, filename: str, purpose: str, src: BinaryIO
    ) -> dict[str, Any]:
        """Upload: check, store and record a consumer's file."""
        return await self.ctx.db(self.save, key_id, filename, purpose, src)

    async def retrieve(self, key_id: str, file_id: str) -> dict[str, Any]:
        """The caller's file."""
        return await self.ctx.db(self.get, key_id, file_id)

    async def listing(self, key_id: str, **query: Any) -> dict[str, Any]:
        """A page of the caller's files."""
        return await self.ctx.db(lambda: self.page(key_id, **query))

    async def stream(self, key_id: str, file_id: str) -> Iterator[bytes]:
        """The caller's file's content (iterate it in a worker thread)."""
        return await self.ctx.db(self.open, key_id, file_id)

    async def delete(self, key_id: str, file_id: str) -> dict[str, Any]:
        """Delete the caller's file."""
        return await self.ctx.db(self.remove, key_id, file_id)
