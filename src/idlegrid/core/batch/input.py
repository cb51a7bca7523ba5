"""The lines of a batch's input file: what each must be, checked before any line runs. Pure.

Each line is `{"custom_id": str, "method": "POST", "url": one of ENDPOINTS, "body": {...}}`,
its `url` the batch's `endpoint`, its `custom_id` unique in the file. A line that breaks
a rule becomes an OpenAI batch error `{code, message, param, line}`; a batch with any
fails validation (`validating -> failed`), its `errors` listing them (at most
`max_errors`, in line order), as OpenAI's does. What the `body` holds (the model, the
messages, the sampling fields) is the gateway's to judge, by the same request models as
an interactive request, when the line is run: a refused body becomes that line's entry
in the error file, not a failed batch.

Blank lines are skipped (as at upload, `core/files.py`); line numbers are physical.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
FIELDS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID = 512  # characters; it is echoed on every output line


@dataclass(frozen=True)
class LineError:
    """One broken rule: OpenAI's batch error object."""

    code: str
    message: str
    line: int
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The error as OpenAI's `errors.data[]` entry."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class BatchLine:
    """One valid line: what the batch will send, and where it came from."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class Checked:
    """The valid lines and the errors of an input file (valid only if `errors` is empty)."""

    lines: list[BatchLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0  # every error found, even past `max_errors`

    @property
    def ok(self) -> bool:
        """Whether the batch may run."""
        return self.error_count == 0

    def errors_object(self) -> dict[str, Any]:
        """OpenAI's batch `errors`: `{"object": "list", "data": [...]}`."""
        return {"object": "list", "data": [e.as_dict() for e in self.errors]}


def check_endpoint(endpoint: str) -> str:
    """A batch's endpoint, if this grid runs batches of it; else ValueError naming it."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint '{endpoint}' is not one of {', '.join(ENDPOINTS)}")
    return endpoint


def numbered(lines: Iterable[str | bytes]) -> Iterable[tuple[int, str | bytes]]:
    """(line number, line) for each non-blank line, numbered from 1 as an editor does."""
    for n, raw in enumerate(lines, start=1):
        if raw.strip():
            yield n, raw


def check_input(
    lines: Iterable[tuple[int, str | bytes]], endpoint: str, *, max_errors: int = 100
) -> Checked:
    """Check every line of an input file for a batch of `endpoint`."""
    out = Checked()
    seen: dict[str, int] = {}
    for n, raw in lines:
        found = _check_line(n, raw, endpoint, seen)
        if isinstance(found, BatchLine):
            out.lines.append(found)
            continue
        out.error_count += 1
        if len(out.errors) < max_errors:
            out.errors.append(found)
    return out


def _check_line(
    n: int, raw: str | bytes, endpoint: str, seen: dict[str, int]
) -> BatchLine | LineError:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return LineError("invalid_json_line", "This line is not UTF-8 text.", n)
    try:
        obj = json.loads(raw.removeprefix("\ufeff"))
    except (ValueError, RecursionError):
        return LineError("invalid_json_line", "This line is not parseable as valid JSON.", n)
    if not isinstance(obj, dict):
        return LineError("invalid_json_line", "This line is not a JSON object.", n)
    for name in FIELDS:
        if name not in obj:
            return LineError(
                "missing_required_parameter", f"Missing required parameter: '{name}'.", n, name
            )
    extra = sorted(k for k in obj if k not in FIELDS)
    if extra:
        return LineError("unknown_parameter", f"Unknown parameter: '{extra[0]}'.", n, extra[0])
    custom_id, method, url, body = (obj[k] for k in FIELDS)
    if not isinstance(custom_id, str) or not custom_id:
        return LineError("invalid_value", "'custom_id' must be a non-empty string.", n, "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        return LineError(
            "invalid_value",
            f"'custom_id' is longer than {MAX_CUSTOM_ID} characters.",
            n,
            "custom_id",
        )
    if method != "POST":
        return LineError("invalid_value", "'method' must be 'POST'.", n, "method")
    if not isinstance(url, str) or url not in ENDPOINTS:
        return LineError("invalid_url", f"'url' must be one of {', '.join(ENDPOINTS)}.", n, "url")
    if url != endpoint:
        return LineError(
            "mismatched_endpoint",
            f"'url' is {url}, but the batch's endpoint is {endpoint}.",
            n,
            "url",
        )
    if not isinstance(body, dict):
        return LineError("invalid_value", "'body' must be a JSON object.", n, "body")
    if custom_id in seen:
        return LineError(
            "duplicate_custom_id",
            f"'custom_id' {custom_id!r} was already used on line {seen[custom_id]}.",
            n,
            "custom_id",
        )
    seen[custom_id] = n
    return BatchLine(n, custom_id, url, body)
