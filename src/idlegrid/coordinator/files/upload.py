"""A `multipart/form-data` upload read as it streams in: the file part spooled (memory up
to 1 MiB, then a temporary file on disk), never held whole, its size bounded as it
arrives; the other parts are small text fields. HTTP parsing only: no database here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from idlegrid.core.files import refused
from idlegrid.errors import InvalidRequest

SPOOL_IN_MEMORY = 1 << 20
MAX_FIELD_BYTES = 4096  # `purpose` and the like
MAX_PARTS = 16
ENVELOPE_BYTES = 64 << 10  # boundaries and part headers around the file, generously


@dataclass
class Upload:
    """What a multipart body held: its text fields, and its one file, spooled."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0
    # Closed by `close()` (the route's `finally`), not a `with`: it outlives this parser.
    spool: Any = field(
        default_factory=lambda: tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)  # noqa: SIM115
    )

    def close(self) -> None:
        """Free the spool (its temporary file, if it went to disk)."""
        self.spool.close()


def _too_big(max_bytes: int) -> InvalidRequest:
    return refused(
        f"file: over the limit of {max_bytes} bytes", limit="files_max_bytes", max=max_bytes
    )


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """Parse the body as it arrives; a 400 naming the part (or the limit) for anything
    malformed or too large, before the rest of the body is read."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest("the body must be multipart/form-data", param="file")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + ENVELOPE_BYTES:
        raise _too_big(max_bytes)
    up = Upload()
    state: dict[str, Any] = {
        "headers": {},
        "name": "",
        "is_file": False,
        "field": b"",
        "ended": False,
    }
    header = [b"", b""]
    parts = 0

    def on_part_begin() -> None:
        nonlocal parts
        parts += 1
        if parts > MAX_PARTS:
            raise InvalidRequest(f"more than {MAX_PARTS} form parts", param="file")
        state.update(headers={}, name="", is_file=False, field=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        state["headers"][header[0].lower()] = header[1]
        header[0] = header[1] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if b"filename" in disp:
            if name != "file" or up.filename is not None:
                raise InvalidRequest(
                    "send exactly one file, in the part named 'file'", param="file"
                )
            state["is_file"] = True
            up.filename = disp[b"filename"].decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["is_file"]:
            up.size += end - start
            if up.size > max_bytes:
                raise _too_big(max_bytes)
            up.spool.write(data[start:end])
            return
        state["field"] += data[start:end]
        if len(state["field"]) > MAX_FIELD_BYTES:
            raise InvalidRequest(
                f"{state['name']}: over {MAX_FIELD_BYTES} bytes", param=state["name"]
            )

    def on_part_end() -> None:
        if not state["is_file"]:
            try:
                up.fields[state["name"]] = state["field"].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    f"{state['name']}: not UTF-8 text", param=state["name"]
                ) from None

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_end": on_end,
        },
    )
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + ENVELOPE_BYTES:
                raise _too_big(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        up.close()
        raise InvalidRequest(f"malformed multipart body: {exc}", param="file") from None
    except BaseException:
        up.close()
        raise
    if not state["ended"]:
        up.close()
        raise InvalidRequest(
            "malformed multipart body: it ends before its last boundary", param="file"
        )
    up.spool.seek(0)
    return up
