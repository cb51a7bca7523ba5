"""Request ids, the access log and the Prometheus families an operator expects, against
a real coordinator and an in-process agent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

MODEL = "fake:1"


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[tuple[CoordinatorThread, str, str]]:
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, port=free_port(), heartbeat_interval_s=0.2
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agent = AgentThread(make_agent(coordinator.url, [FakeEngine(MODEL)], "p0"))
    agent.start()
    tick = threading.Event()
    with coordinator.admin(timeout=30) as c:
        for _ in range(400):
            nodes = c.get("/api/v1/status").json()["nodes"]
            if any(n["live"] for n in nodes):
                break
            tick.wait(0.05)
        key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "t"},
        ).raise_for_status()
    yield coordinator, key["api_key"], nodes[0]["id"]
    agent.stop()
    coordinator.stop()


def test_a_request_id_is_returned_logged_and_reaches_the_provider(
    grid: tuple[CoordinatorThread, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    coordinator, api_key, _ = grid
    caplog.set_level(logging.INFO, logger="idlegrid")
    caplog.set_level(logging.DEBUG, logger="idlegrid.access")
    with openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=api_key, max_retries=0) as client:
        fresh = client.completions.with_raw_response.create(model=MODEL, prompt="a", max_tokens=3)
        assert fresh.headers["x-request-id"].startswith("req_")
        assert fresh.parse()._request_id == fresh.headers["x-request-id"]  # openai reads it
        mine = client.completions.with_raw_response.create(
            model=MODEL, prompt="b", max_tokens=3, extra_headers={"x-request-id": "trace-42"}
        )
        assert mine.headers["x-request-id"] == "trace-42"
    with httpx.Client(trust_env=False) as c:
        odd = c.get(f"{coordinator.url}/healthz", headers={"x-request-id": "a b\tc" * 30})
    assert odd.headers["x-request-id"].startswith("req_")  # not a plain short token: replaced
    # The access line is written once the response is sent: the client may read the
    # response first, so wait (with a deadline) for the last request's line.
    tick = threading.Event()
    for _ in range(200):
        if any("GET /healthz" in r.getMessage() for r in caplog.records):
            break
        tick.wait(0.05)
    access = [r for r in caplog.records if r.name == "idlegrid.access"]
    assert any(
        "POST /v1/completions 200" in r.getMessage() and r.getMessage().endswith("trace-42")
        for r in access
    )
    # Routine requests (heartbeats, polls, health probes) are logged at debug, not info;
    # the probe is the one this test made, so it is there however quick the test ran.
    probes = [r for r in access if "GET /healthz 200" in r.getMessage()]
    assert probes and all(r.levelno == logging.DEBUG for r in probes)
    agent_lines = [r.getMessage() for r in caplog.records if r.name.startswith("idlegrid.agent")]
    assert any("request_id=trace-42" in m for m in agent_lines), agent_lines


def test_metrics_have_latency_histograms_by_provider_statuses_queue_and_process(
    grid: tuple[CoordinatorThread, str, str],
) -> None:
    coordinator, api_key, node_id = grid
    with openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=api_key, max_retries=0) as client:
        client.completions.create(model=MODEL, prompt="metrics", max_tokens=6)
        stream = client.completions.create(model=MODEL, prompt="s", max_tokens=6, stream=True)
        assert "".join(ch.choices[0].text for ch in stream if ch.choices)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
    route = 'method="POST",route="/v1/completions"'
    not_found = f'idlegrid_http_responses_total{{{route},status="404"}} 1.0'
    tick = threading.Event()
    with httpx.Client(trust_env=False) as c:
        # A response is counted once it is sent: the client may ask before that.
        for _ in range(100):
            text = c.get(f"{coordinator.url}/metrics").text
            if not_found in text:
                break
            tick.wait(0.05)
    labels = f'model="{MODEL}",provider="{node_id}"'
    assert f'idlegrid_e2e_request_latency_seconds_count{{model="{MODEL}"}} 2.0' in text
    assert f'idlegrid_time_per_output_token_seconds_count{{model="{MODEL}"}} 2.0' in text
    assert f"idlegrid_provider_e2e_request_latency_seconds_count{{{labels}}} 2.0" in text
    assert "_created" not in text  # no second series per counter
    assert f'idlegrid_http_responses_total{{{route},status="200"}} 2.0' in text
    assert not_found in text
    assert "idlegrid_requests_waiting 0.0" in text and "idlegrid_requests_running 0.0" in text
    assert "process_resident_memory_bytes" in text and "python_gc_collections_total" in text
