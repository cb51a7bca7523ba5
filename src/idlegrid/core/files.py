"""What an uploaded file must be before it is stored: the Files API's rules. Pure.

A `batch` file is UTF-8 JSON Lines, one JSON object per line, within the limits (bytes,
lines, bytes of one line). `JsonlScan` checks it as it streams past, chunk by chunk, and
holds at most one line in memory: an upload is never read whole. What each object must
hold (`custom_id`, `method`, `url`, `body`) is the batch's business, checked when a batch
is created from the file (`core/batch/input.py`), where a bad line names itself in the
batch's `errors`; here a line that is not a JSON object at all is refused at upload, by
its number, since no batch could ever read it.

Blank lines (only whitespace) are skipped and not counted, as JSONL readers do; line
numbers are physical (the first line is 1), so an editor finds the line an error names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum

from idlegrid.errors import InvalidRequest


class Purpose(StrEnum):
    """The purposes this grid stores files for (OpenAI's names)."""

    BATCH = "batch"  # a batch's input, uploaded by a consumer
    BATCH_OUTPUT = "batch_output"  # a batch's output or error file, written by the grid


# What a consumer may upload; `batch_output` files are only ever written by the grid.
UPLOADABLE = frozenset({Purpose.BATCH.value})


def refused(
    message: str, *, param: str = "file", limit: str | None = None, **data: object
) -> InvalidRequest:
    """A 400 naming the parameter and, for a limit, the setting and its value."""
    exc = InvalidRequest(message, param=param)
    if limit is not None:
        exc.data["limit"] = limit
    exc.data.update(data)
    return exc


def check_purpose(purpose: str) -> str:
    """The purpose of an upload, or a 400 naming `purpose`."""
    if purpose in UPLOADABLE:
        return purpose
    if purpose == Purpose.BATCH_OUTPUT:
        raise refused(
            "purpose: 'batch_output' files are written by the grid, not uploaded",
            param="purpose",
        )
    raise refused(
        f"purpose: '{purpose}' is not stored on this grid; upload batch input with purpose 'batch'",
        param="purpose",
    )


@dataclass
class Limits:
    """The limits one upload is held to (settings `files_max_*`)."""

    max_bytes: int
    max_lines: int
    max_line_bytes: int


@dataclass
class JsonlScan:
    """Checks a JSONL upload chunk by chunk; `feed` then `end`, each may raise a 400."""

    limits: Limits
    size: int = 0  # bytes seen
    lines: int = 0  # non-blank lines seen (the requests a batch would hold)
    _line_no: int = 0  # physical line number of the last complete line
    _partial: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the file."""
        self.size += len(chunk)
        if self.size > self.limits.max_bytes:
            raise refused(
                f"file: over the limit of {self.limits.max_bytes} bytes",
                limit="files_max_bytes",
                max=self.limits.max_bytes,
            )
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            self._add(chunk[start:nl])
            self._line(bytes(self._partial))
            self._partial.clear()
            start = nl + 1
        self._add(chunk[start:])

    def end(self) -> int:
        """The file is complete: the last line (without a newline) is checked; the number
        of lines is returned (a file with none is refused)."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()
        if self.lines == 0:
            raise refused("file: holds no JSON lines")
        return self.lines

    def _add(self, piece: bytes) -> None:
        # One line is held in memory at most, so it is bounded before it grows.
        if len(self._partial) + len(piece) > self.limits.max_line_bytes:
            raise refused(
                f"file: line {self._line_no + 1} is over the limit of "
                f"{self.limits.max_line_bytes} bytes",
                limit="files_max_line_bytes",
                max=self.limits.max_line_bytes,
                line=self._line_no + 1,
            )
        self._partial += piece

    def _line(self, raw: bytes) -> None:
        self._line_no += 1
        n = self._line_no
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise refused(f"file: line {n} is not UTF-8 text", line=n) from None
        if n == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not text.strip():
            return
        self.lines += 1
        if self.lines > self.limits.max_lines:
            raise refused(
                f"file: over the limit of {self.limits.max_lines} lines",
                limit="files_max_lines",
                max=self.limits.max_lines,
            )
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise refused(f"file: line {n} is not valid JSON", line=n) from None
        if not isinstance(value, dict):
            raise refused(f"file: line {n} is not a JSON object", line=n)
