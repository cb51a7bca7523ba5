"""`IDLEGRID_LOG_FORMAT=json`: a real coordinator process writes one JSON object per line,
and the access line of a request carries the `x-request-id` the caller sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from idlegrid.testbed.inprocess import free_port, wait_until


def _ready(url: str) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=2) as c:
            return c.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _lines(path: Path) -> list[dict[str, Any]]:
    # Every line must parse: a single plain-text line fails the test here.
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_coordinator_logs_are_json_lines_with_the_request_id(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "coordinator.log"
    env = {**os.environ, "IDLEGRID_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "idlegrid", "coordinator", "--port", str(port)]
            + ["--data-dir", str(tmp_path / "data")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: proc.poll() is None and _ready(url), timeout_s=60, interval_s=0.1)
        with httpx.Client(trust_env=False, timeout=10) as c:
            ok = c.get(f"{url}/api/v1/status", headers={"x-request-id": "deploy-json-1"})
            refused = c.get(f"{url}/v1/models")  # no API key
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "deploy-json-1"
        assert refused.status_code == 401
        generated = refused.headers["x-request-id"]
        assert generated.startswith("req_")

        def logged() -> bool:
            ids = {line.get("request_id") for line in _lines(log_path)}
            return {"deploy-json-1", generated} <= ids

        wait_until(logged, timeout_s=10, interval_s=0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = _lines(log_path)
    assert lines, "the coordinator wrote no log lines"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    access = {line["request_id"]: line for line in lines if line["logger"] == "idlegrid.access"}
    first = access["deploy-json-1"]
    assert first["level"] == "INFO" and first["method"] == "GET"
    assert first["path"] == "/api/v1/status" and first["status"] == 200
    assert first["duration_ms"] >= 0 and "deploy-json-1" in first["message"]
    assert access[generated]["status"] == 401 and access[generated]["path"] == "/v1/models"
    assert any(line["message"].startswith("operator key: ") for line in lines)


def test_an_unknown_log_format_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "idlegrid", "coordinator", "--log-format", "xml"]
        + ["--port", str(free_port()), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2
    assert "unknown log format 'xml'" in done.stderr
