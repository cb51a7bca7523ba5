"""The JSON log formatter (idlegrid/logs.py): one parseable object per record."""

from __future__ import annotations

import io
import json
import logging

import pytest

from idlegrid.logs import REQUEST_ID, JsonFormatter, LogFormatError, log_format


def _logged(emit: object) -> str:
    """What one call on a logger with a JSON handler wrote."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("idlegrid.test")
    logger.addHandler(handler)
    try:
        assert callable(emit)
        emit(logger)
    finally:
        logger.removeHandler(handler)
        handler.close()
    return stream.getvalue()


def test_a_record_is_one_json_line_with_the_request_being_served() -> None:
    token = REQUEST_ID.set("req_abc")
    try:
        line = _logged(lambda log: log.warning("served %s\nin %d ms", "x", 3)).rstrip("\n")
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "served x\nin 3 ms" and entry["request_id"] == "req_abc"
    assert entry["level"] == "WARNING" and entry["logger"] == "idlegrid.test"
    assert entry["time"].endswith("+00:00")
    assert "exception" not in entry


def test_extra_fields_and_the_traceback_are_their_own_keys() -> None:
    def fail(log: logging.Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"status": 500, "path": "/v1"})

    line = _logged(fail)
    assert line.count("\n") == 1
    entry = json.loads(line)
    assert entry["status"] == 500 and entry["path"] == "/v1"
    assert "request_id" not in entry
    assert "ValueError: boom" in entry["exception"] and "Traceback" in entry["exception"]


def test_the_format_comes_from_the_flag_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IDLEGRID_LOG_FORMAT", raising=False)
    assert log_format(None) == "text"
    monkeypatch.setenv("IDLEGRID_LOG_FORMAT", "JSON")
    assert log_format(None) == "json"
    assert log_format("text") == "text"
    with pytest.raises(LogFormatError, match="unknown log format 'yaml'"):
        log_format("yaml")
