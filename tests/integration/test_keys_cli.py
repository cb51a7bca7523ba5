"""`idlegrid keys` against a real coordinator, and the limits it sets: requests and tokens
per minute answered 429 with Retry-After, a spend cap answered 429 insufficient_quota."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from typer.testing import CliRunner

from idlegrid.client.cli import app
from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

MODEL = "fake:1"
runner = CliRunner()


class Grid:
    def __init__(self, coordinator: CoordinatorThread, agent: AgentThread, data_dir: Path):
        self.coordinator, self.agent, self.data_dir = coordinator, agent, data_dir

    def cli(self, *args: str) -> Any:
        """Run the CLI as the operator: the operator key sits in the grid's data dir."""
        return runner.invoke(
            app, [*args, "--coordinator", self.coordinator.url, "--data-dir", str(self.data_dir)]
        )

    def client(self, api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.coordinator.url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, port=free_port(), heartbeat_interval_s=0.2
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    coordinator.operator_key  # noqa: B018 - written to tmp_path/operator-key for the CLI
    agent = AgentThread(make_agent(coordinator.url, [FakeEngine(MODEL)], "p0"))
    agent.start()
    tick = threading.Event()
    with coordinator.admin(timeout=30) as c:
        for _ in range(400):
            if any(n["live"] for n in c.get("/api/v1/status").json()["nodes"]):
                break
            tick.wait(0.05)
    yield Grid(coordinator, agent, tmp_path)
    agent.stop()
    coordinator.stop()


def _create(grid: Grid, *args: str) -> dict[str, Any]:
    res = grid.cli("keys", "create", "team-a", "--credits", "5", "--json", *args)
    assert res.exit_code == 0, res.output
    made: dict[str, Any] = json.loads(res.stdout)
    return made


def test_keys_create_list_fund_revoke(grid: Grid) -> None:
    made = _create(grid)
    assert made["balance"] == 5 * MICRO and made["api_key"].startswith("ig-")
    with grid.client(made["api_key"]) as c:
        c.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    funded = grid.cli("keys", "fund", made["key_id"], "2.5", "--reference", "pay-1")
    again = grid.cli("keys", "fund", made["key_id"], "2.5", "--reference", "pay-1")
    assert funded.exit_code == again.exit_code == 0
    assert "nothing added" in again.stdout and "nothing added" not in funded.stdout
    listed = json.loads(grid.cli("keys", "list", "--json").stdout)["keys"]
    row = [k for k in listed if k["key_id"] == made["key_id"]][0]
    assert row["spent"] > 0 and row["balance"] + row["spent"] == 7.5 * MICRO
    table = grid.cli("keys", "list")
    assert made["key_id"] in table.stdout and "…" not in table.stdout  # piped: never cut
    assert grid.cli("keys", "revoke", made["key_id"]).exit_code == 0
    with grid.client(made["api_key"]) as c, pytest.raises(openai.AuthenticationError):
        c.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert json.loads(grid.cli("keys", "list", "--json").stdout)["keys"] == [
        k for k in listed if k["key_id"] != made["key_id"]
    ]


def test_a_request_rate_limit_answers_429_with_retry_after(grid: Grid) -> None:
    made = _create(grid, "--rpm", "2")
    with grid.client(made["api_key"]) as c:
        for _ in range(2):
            c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    r = info.value.response
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.json()["error"]["data"]["limit"] == "requests_per_minute"


def test_a_token_rate_limit_counts_prompt_and_most_output(grid: Grid) -> None:
    made = _create(grid, "--tpm", "100")
    with grid.client(made["api_key"]) as c:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=60)
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=60)
    assert info.value.response.json()["error"]["data"]["limit"] == "tokens_per_minute"
    assert "retry-after" in info.value.response.headers


def test_a_spent_cap_refuses_further_requests(grid: Grid) -> None:
    made = _create(grid, "--spend-cap", "0.000001")
    with grid.client(made["api_key"]) as c:
        c.completions.create(model=MODEL, prompt="spend", max_tokens=4)  # reaches the cap
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model=MODEL, prompt="spend", max_tokens=4)
    body = info.value.response.json()["error"]
    assert body["code"] == "spend_cap_reached" and body["type"] == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers  # waiting does not help


def test_an_unknown_model_is_one_line_and_exit_1(grid: Grid) -> None:
    made = _create(grid)
    res = runner.invoke(
        app,
        ["complete", "hi", "--model", "llama3", "--coordinator", grid.coordinator.url],
        env={"IDLEGRID_API_KEY": made["api_key"]},
    )
    assert res.exit_code == 1
    assert [line for line in res.output.splitlines() if line] == [
        "error: HTTP 404: The model 'llama3' does not exist on this grid"
    ]


def test_keys_need_the_operator_key(grid: Grid, tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["keys", "list", "--coordinator", grid.coordinator.url, "--data-dir", str(tmp_path / "x")],
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "HTTP 401" in res.output


def test_limits_change_on_a_live_key(grid: Grid) -> None:
    made = _create(grid, "--rpm", "1")
    with grid.client(made["api_key"]) as c:
        c.completions.create(model=MODEL, prompt="one", max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=MODEL, prompt="two", max_tokens=2)
        res = grid.cli("keys", "limit", made["key_id"], "--lift", "rpm", "--tpm", "500", "--json")
        assert res.exit_code == 0, res.output
        assert (json.loads(res.stdout)["rpm"], json.loads(res.stdout)["tpm"]) == (None, 500)
        c.completions.create(model=MODEL, prompt="three", max_tokens=2)  # no rpm any more
    bad = grid.cli("keys", "limit", "key_nobody", "--rpm", "3")
    assert bad.exit_code == 1 and "no API key key_nobody" in bad.output
