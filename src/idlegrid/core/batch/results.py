"""A batch's output and error lines in OpenAI's format, and when a batch has run out of
time. Pure.

Every line of the input ends as exactly one line of the output file (answered, status 200)
or of the error file: a body the gateway refused (its 4xx and message), a request no
provider could serve, or a line left unfinished by an expiry or a cancel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

WINDOWS = {"24h": 24 * 3600.0}  # OpenAI's only completion window


def window_seconds(window: str, windows: Mapping[str, float] = WINDOWS) -> float:
    """Seconds in a completion window; ValueError naming the ones allowed."""
    if window not in windows:
        raise ValueError(f"completion_window must be one of {', '.join(windows)}")
    return float(windows[window])


def answered(line_id: str, custom_id: str, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """An output-file line: the answer as the endpoint would have sent it."""
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def refused(
    line_id: str, custom_id: str, request_id: str, status: int, error: dict[str, Any]
) -> dict[str, Any]:
    """An error-file line for a request the gateway answered with an error (`error`: its
    OpenAI error object, `{message, type, param, code}`)."""
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
        "error": None,
    }


def unfinished(line_id: str, custom_id: str, state: str) -> dict[str, Any]:
    """An error-file line for a line that never ran: the batch `state` (expired, cancelled)
    ended it first; nothing was charged for it."""
    code = "batch_expired" if state == "expired" else "batch_cancelled"
    message = (
        "This line was not executed before the batch's completion window ended."
        if state == "expired"
        else "This line was not executed before the batch was cancelled."
    )
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def expired(created_at: float, window_s: float, now: float) -> bool:
    """Whether a batch created at `created_at` has run past its completion window."""
    return now >= created_at + window_s
