"""Log setup for the long-running commands (`idlegrid coordinator`, `provide`): plain
text for a terminal, or one JSON object per line for a log shipper (journald, Loki,
Elasticsearch) with `IDLEGRID_LOG_FORMAT=json` or `--log-format json`.

A JSON line has `time` (UTC, ISO 8601), `level`, `logger`, `message`, `request_id` when the
line belongs to a request, `exception` with the traceback when there is one, and any
`extra=` fields the call gave (the access log's method, path, status, duration_ms).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
from typing import Any

from idlegrid.errors import IdlegridError

LOG_FORMAT_ENV = "IDLEGRID_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The request being served (set by the coordinator's request-id middleware), so that any
# line logged while serving it carries its id.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "idlegrid_request_id", default=None
)
# Every attribute a plain LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class LogFormatError(IdlegridError):
    """The log format named is not one of FORMATS."""

    code = "unknown_log_format"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format(given: str | None) -> str:
    """The format to use: the flag, else IDLEGRID_LOG_FORMAT, else text."""
    chosen = (given or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        raise LogFormatError(
            f"unknown log format {chosen!r}: use one of {', '.join(FORMATS)} "
            f"(--log-format or {LOG_FORMAT_ENV})",
            given=chosen,
        )
    return chosen


def setup_logging(verbose: bool, fmt: str = "text") -> None:
    """Send every logger's records to stderr, as text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # One httpx line per heartbeat was 83% of a provider's log; failures still show.
        logging.getLogger("httpx").setLevel(logging.WARNING)
